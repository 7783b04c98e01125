"""Glue shared by the node modules: input checks, error and warning wording, IMAGE <-> pixel conversions,
progress reporting."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from comfy_api.v0_0_2 import Input, InputImpl, io

import keyface
from keyface.errors import InputError, KeyFaceError

from . import host

CATEGORY = "KeyFace"
# A node error is one or two lines: longer library messages are cut here (ComfyUI stores and sends each error).
MAX_MESSAGE = 600
_CHOICES_SHOWN = 12  # a combo's choices named in a message (a models folder may hold hundreds of files)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ input checks


def check_widgets(node_class, values: Mapping[str, Any]) -> None:
    """Check widget values against the node's own INPUT_TYPES (derived from its V3 schema) (numbers in range, combo choices), raising one
    InputError naming the input. ComfyUI checks the same before queueing; this covers direct calls and
    values its check skips."""
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            if name not in values or values[name] is None:
                continue
            options = rest[0] if rest else {}
            value = values[name]
            if kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InputError(f"{name}: expected a finite number, got {value!r}")
                if kind == "INT" and value != int(value):
                    raise InputError(f"{name}: expected a whole number, got {value!r}")
                low, high = options.get("min", -math.inf), options.get("max", math.inf)
                if not low <= value <= high:
                    raise InputError(f"{name}: {value} is outside the allowed range {low} .. {high}")
            elif kind == "COMBO" and value not in (choices := options.get("options", [])):
                shown = ", ".join(map(repr, choices[:_CHOICES_SHOWN]))
                more = f" and {len(choices) - _CHOICES_SHOWN} more" if len(choices) > _CHOICES_SHOWN else ""
                raise InputError(f"{name}: {value!r} is not one of {shown}{more}")


# --------------------------------------------------------------------------------- errors and messages

# The artist messages of the node running now (None outside a node_function call).
_messages: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("keyface_node_messages", default=None)
# Where KeyFace's own code lives: warnings raised from there are for the artist.
_OWN_CODE = (str(Path(keyface.__file__).resolve().parent), str(Path(__file__).resolve().parent))


def _show(text: str) -> None:
    shown = _messages.get()
    if shown is not None:
        shown.append(text)
        host.show_node_text("\n".join(shown))


def tell_artist(text: str) -> None:
    """Show ``text`` on the running node (with the node's earlier messages of this run) and log it."""
    logger.warning("KeyFace: %s", text)
    _show(text)


def _show_warning(previous, message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning while a node runs: KeyFace's own warnings (raised from the library or the nodes)
    reach the artist; other libraries' go where they always go."""
    if str(Path(filename).resolve()).startswith(_OWN_CODE):
        tell_artist(str(message))
    else:
        previous(message, category, filename, lineno, file, line)


class _LibraryLogWarnings(logging.Handler):
    """The library's logged warnings (e.g. a checkpoint's assumed head width) also go onto the running node."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        _show(record.getMessage())


def node_function(labels: Mapping[str, str] | None = None) -> Callable:
    """Decorator for a node's FUNCTION: what the library says reaches the artist in the node's own words.

    * A :class:`~keyface.errors.KeyFaceError` names its input by the widget (``labels``: library input name ->
      widget name, e.g. ``{"num_steps": "steps"}``) and stays short (at most :data:`MAX_MESSAGE` characters).
    * Library warnings (crop enlarged, several faces, ...) become messages on the node (:func:`tell_artist`), not
      Python ``UserWarning`` lines with a source path; the library's logged warnings are shown there too.
    """
    labels = dict(labels or {})

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            token = _messages.set([])
            library_log, handler = logging.getLogger(keyface.__name__), _LibraryLogWarnings()
            library_log.addHandler(handler)
            try:
                with warnings.catch_warnings():  # also forgets which warnings an earlier run showed
                    warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
                    return function(*args, **kwargs)
            except KeyFaceError as error:
                worded = error.naming(labels)
                message = str(worded)
                if len(message) > MAX_MESSAGE:
                    worded = worded.with_message(message[: MAX_MESSAGE - 4].rstrip() + " ...")
                if worded is error:
                    raise
                raise worded from None
            finally:
                library_log.removeHandler(handler)
                _messages.reset(token)

        return run

    return decorate


@contextlib.contextmanager
def file_named_as_chosen(path: Path, chosen: str) -> Iterator[None]:
    """Library errors about the file ``path`` call it ``chosen`` (the name in the widget), not by its full path
    on the server."""
    try:
        yield
    except KeyFaceError as error:
        message = str(error)
        if str(path) not in message:
            raise
        raise error.with_message(message.replace(str(path), chosen)) from None


def widget_problem(node_class, values: Mapping[str, Any]) -> str | None:
    """:func:`check_widgets` for a ``validate_inputs``: the message, or None when the values are fine. (ComfyUI
    skips its own range check for every input a ``validate_inputs`` names, and passes a linked one as None.)"""
    try:
        check_widgets(node_class, values)
    except InputError as error:
        return str(error)
    return None


def portrait_input(tooltip: str) -> io.MultiType.Input:
    """The ``image`` input of a node that takes the portrait: an ``IMAGE``, or a core ``VIDEO`` whose first frame
    is the portrait (:func:`single_image`). Its classic type ``"IMAGE,VIDEO"`` still accepts every IMAGE link of
    a workflow saved when it was ``IMAGE``."""
    return io.MultiType.Input("image", types=[io.Image, io.Video], tooltip=tooltip)


def first_video_frame(video, name: str):
    """The first frame of a core ``VIDEO`` as uint8 RGB (H, W, 3). A file-backed video (``VideoFromFile``: a path or
    an in-memory file) decodes that frame only, never the whole video; other videos hold their frames already."""
    if isinstance(video, InputImpl.VideoFromFile):
        frame = _first_decoded_frame(video.get_stream_source(), name)
    else:
        images = video.get_components().images
        frame = image_to_uint8(images[0]) if images.ndim == 4 and images.shape[0] > 0 else None
    if frame is None:
        raise InputError(f"{name}: the connected video has no frames; connect a video with at least one, or an image")
    return frame


def _first_decoded_frame(source, name: str):
    """The first picture of the video file ``source`` (a path or a file object), or None when it has none."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{name}: the connected video has no picture, only sound; connect one with frames")
            for frame in container.decode(container.streams.video[0]):
                return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError) as error:
        raise InputError(f"{name}: the connected video cannot be read ({error}); check its file") from None
    return None


def single_image(image, name: str):
    """The portrait of an ``image`` input as uint8 RGB (H, W, 3): a ComfyUI ``IMAGE`` (1, H, W, C), or the first
    frame of a core ``VIDEO``; a missing input or a batch of several images is refused."""
    from keyface.identity import load_identity_image

    if image is None:
        raise InputError(f"{name}: no image is connected; connect a portrait (e.g. Load Image -> KeyFace Crop Face)")
    if isinstance(image, Input.Video):
        return load_identity_image(first_video_frame(image, name), name=name)
    if getattr(image, "ndim", 0) != 4:
        raise InputError(
            f"{name}: expected a ComfyUI IMAGE (batch, height, width, channels), got {type(image).__name__}"
        )
    if image.shape[0] != 1:
        raise InputError(
            f"{name}: got a batch of {image.shape[0]} images; KeyFace animates one portrait. Pick one with "
            "'Image From Batch' (batch_index) before this node"
        )
    return load_identity_image(image, name=name)


def images_from_pixels(pixels):
    """Float frames (n, 3, H, W) in [0, 1] -> ComfyUI ``IMAGE`` (n, H, W, 3) float32 on the CPU."""
    return pixels.detach().to("cpu").float().permute(0, 2, 3, 1).contiguous()


def image_to_uint8(image):
    """One ``IMAGE`` frame (H, W, 3) float in [0, 1] -> uint8 numpy (rounded)."""
    import torch

    return image.detach().to("cpu").float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).numpy()


def uint8_to_image(frame):
    """uint8 numpy (H, W, 3) -> one ``IMAGE`` frame (H, W, 3) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(frame).float().div(255.0)


# --------------------------------------------------------------------------------------------------- progress


class NodeProgress:
    """The running node's ComfyUI progress bar, fed by KeyFace progress events or plain counts.

    Every update also checks for Cancel: ComfyUI's progress hook raises its interruption exception, which
    stops the library's loops (finished keyframes and segments stay in the job folder).
    """

    def __init__(self, total: int = 1):
        self.bar = host.progress_bar(max(total, 1))

    def update(self, completed: int, total: int, preview=None) -> None:
        self.bar.update_absolute(completed, max(total, 1), preview)
        host.check_interrupted()

    def on_event(self, event) -> None:
        """A :class:`keyface.progress.ProgressEvent`; a finished keyframe's picture is shown on the node, the
        expected duration of a run on the CPU is a message on it."""
        from keyface.progress import ESTIMATE

        if event.stage == ESTIMATE:
            tell_artist(event.detail)
        preview = None
        if event.preview is not None:
            from PIL import Image

            preview = ("JPEG", Image.fromarray(event.preview), host.preview_max_size())
        self.update(event.completed, event.total, preview)


@contextlib.contextmanager
def reporting(job, progress: NodeProgress, *listeners: Callable) -> Iterator[None]:
    """Send ``job``'s progress events to this node's bar, then to each of ``listeners``, while the block runs
    (the job may be a cached output of an earlier node, whose bar it would otherwise keep using)."""

    def on_event(event) -> None:
        progress.on_event(event)
        for listener in listeners:
            listener(event)

    previous = job.progress_callback
    job.progress_callback = on_event if listeners else progress.on_event
    try:
        yield
    finally:
        job.progress_callback = previous
