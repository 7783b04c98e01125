"""``python -m keyface``: see :mod:`keyface.cli`."""

import sys

from .cli import main

sys.exit(main())
