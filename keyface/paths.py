"""Where KeyFace keeps its caches: ``$KEYFACE_CACHE_DIR`` if set, else ``~/.cache/keyface``.

Below it: ``features/`` (audio features, :mod:`keyface.audio.cache`) and ``jobs/`` (resumable generation
jobs, :mod:`keyface.jobs`). Both are capped in size, least recently used entries first out. Inside ComfyUI the
nodes keep their jobs in ComfyUI's user folder instead, unless ``$KEYFACE_CACHE_DIR`` is set
(``nodes/job_folders.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "KEYFACE_CACHE_DIR"


def default_cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "keyface"
