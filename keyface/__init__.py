"""KeyFace: long, expressive, audio-driven talking-head video (arXiv 2503.01715).

The library reads top-down as the data flows: audio and emotion inputs (``keyface.audio``,
``keyface.emotion``) -> the plan of keyframes and segments (``keyface.schedule``) -> keyframes and
interpolated segments (``keyface.models``, ``keyface.sampling``) -> frames -> file (``keyface.video``).
Importing the package is cheap: heavy modules are imported where they are used.
"""

from .errors import CheckpointError, InputError, Interrupted, KeyFaceError, MissingWeightsError

__version__ = "0.2.0"

__all__ = [
    "CheckpointError",
    "InputError",
    "Interrupted",
    "KeyFaceError",
    "MissingWeightsError",
    "__version__",
]
