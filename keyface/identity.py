"""The identity picture: load it from any common source and cut the square the model animates.

KeyFace animates a square face crop at the model resolution (512 px; docs/models.md#identity-image: the original
stretches whatever it gets to 512x512, so it must be given a square). This module turns a file, an array,
a tensor or a ComfyUI ``IMAGE`` into uint8 RGB (height, width, 3), and cuts a square from it, centred or
at an explicit box, together with the :class:`CropInfo` that paste-back needs. Mapping the square to the
VAE's [-1, 1] input is done by ``keyface.models.vae``; face detection lives in ``keyface.face``.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .constants import RELEASED_IMAGE_SIZE
from .errors import InputError

# Transparent pixels are composited on mid grey: neither a white nor a black halo around cut-out portraits.
RGBA_BACKGROUND = (128, 128, 128)
UINT16_TO_UINT8 = 257  # 65535 / 255


@dataclass(frozen=True)
class CropInfo:
    """Where a square crop came from, in source pixels, and the size it was resized to.

    The box ``(x, y, size)`` is the crop's top-left corner and side in the source image; it may reach
    outside the image (those pixels were padded). ``output_size`` is the side of the resized crop.
    """

    x: int
    y: int
    size: int
    source_width: int
    source_height: int
    output_size: int

    @property
    def box(self) -> tuple[int, int, int]:
        """``(x, y, size)`` in source pixels."""
        return (self.x, self.y, self.size)

    @property
    def scale(self) -> float:
        """Output pixels per source pixel (> 1 when the crop was enlarged)."""
        return self.output_size / self.size

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CropInfo:
        """Rebuild from :meth:`to_dict` output."""
        try:
            return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"crop info: expected the keys {list(cls.__dataclass_fields__)}, got {data!r}") from error


# ---------------------------------------------------------------------------------------------------------
# loading


def load_identity_image(source: Any, *, name: str = "identity image") -> np.ndarray:
    """Load one picture as uint8 RGB (height, width, 3).

    Args:
        source: one of
            * a path to an image or a PIL image (PNG, JPEG, WebP, BMP, TIFF, GIF, ...: any mode, 16-bit, palette,
              transparency; the EXIF orientation is applied; for animations the first frame) or to a video
              (the first frame);
            * a numpy array or torch tensor, channels last: (height, width), (height, width, 1|3|4) or a
              ComfyUI ``IMAGE`` batch (batch, height, width, channels). uint8 is taken as is, uint16 is
              scaled by 1/257, float is read as [0, 1]. Of a batch with several images the first is used
              (with a warning).
        name: how error messages call the input.

    Transparent pixels are composited on mid grey :data:`RGBA_BACKGROUND`.
    """
    from PIL import Image, ImageOps

    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), name)
    if isinstance(source, np.ndarray) or hasattr(source, "detach"):
        return _array_to_rgb(source, name)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(source), name)
    raise InputError(
        f"{name}: expected a file path, a PIL image, a numpy array or a torch tensor, got {type(source).__name__}"
    )


def _load_file(path: Path, name: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise InputError(f"{name} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{name} {path} is not a file")
    try:
        with Image.open(path) as stored:
            stored.load()
            image = ImageOps.exif_transpose(stored)  # a new, upright image
    except UnidentifiedImageError:  # not an image Pillow knows: maybe a video
        return _first_video_frame(path, name)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as error:
        # Pillow's plugins report damaged files with any of these
        raise InputError(f"{name} {path} cannot be read as an image: {error}") from error
    return _pil_to_rgb(image, f"{name} {path}")


def _first_video_frame(path: Path, name: str) -> np.ndarray:
    from .media import iter_video_frames

    try:
        return _check_size(next(iter_video_frames(path)), f"{name} {path}")
    except (InputError, StopIteration) as error:
        raise InputError(
            f"{name} {path} is neither an image nor a video with frames; give a PNG/JPEG/WebP image or a video"
        ) from error


def _pil_to_rgb(image, name: str) -> np.ndarray:
    """Any Pillow image -> uint8 RGB (height, width, 3), 16-bit scaled down, transparency composited."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / UINT16_TO_UINT8
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return _check_size(np.repeat(gray[..., None], 3, axis=2), name)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        return _composite(np.asarray(image.convert("RGBA")), name)
    return _check_size(np.asarray(image.convert("RGB")), name)


def _array_to_rgb(data: Any, name: str) -> np.ndarray:
    if hasattr(data, "detach"):
        data = data.detach().to("cpu")
        data = data.float().numpy() if data.is_floating_point() else data.numpy()
    array = np.asarray(data)
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise InputError(f"{name}: the image batch is empty")
        if array.shape[0] > 1:
            warnings.warn(
                f"{name}: got a batch of {array.shape[0]} images; using the first one (index 0)", stacklevel=3
            )
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name}: expected an image shaped (height, width), (height, width, 1|3|4) or a ComfyUI IMAGE "
            f"(batch, height, width, channels), got {tuple(array.shape)}"
        )
    array = _to_uint8_levels(array, name)
    if array.shape[2] == 4:
        return _composite(array, name)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return _check_size(np.ascontiguousarray(array), name)


def _to_uint8_levels(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.rint(array / UINT16_TO_UINT8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{name}: the image holds NaN or infinite values")
        return np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    raise InputError(f"{name}: unsupported pixel type {array.dtype}; use uint8, uint16 or float in [0, 1]")


def _composite(rgba: np.ndarray, name: str) -> np.ndarray:
    """uint8 RGBA (height, width, 4) over :data:`RGBA_BACKGROUND` -> uint8 RGB."""
    rgba = _check_size(rgba, name)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    background = np.asarray(RGBA_BACKGROUND, np.float32)
    blended = rgba[..., :3].astype(np.float32) * alpha + background * (1 - alpha)
    return np.rint(blended).astype(np.uint8)


def _check_size(image: np.ndarray, name: str) -> np.ndarray:
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    return image


# ---------------------------------------------------------------------------------------------------------
# cropping and resizing


def center_box(width: int, height: int) -> tuple[int, int, int]:
    """The largest centred square ``(x, y, size)`` inside a width x height image."""
    size = min(width, height)
    return ((width - size) // 2, (height - size) // 2, size)


def check_box(box: Any, name: str = "box") -> tuple[int, int, int]:
    """Validate ``(x, y, size)`` (numbers, size > 0); values are rounded to whole pixels."""
    try:
        x, y, size = (float(value) for value in box)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name}: expected (x, y, size) in source pixels, got {box!r}") from error
    if not all(np.isfinite((x, y, size))):
        raise InputError(f"{name}: values must be finite, got {box!r}")
    if round(size) <= 0:
        raise InputError(f"{name}: size must be a positive number of pixels, got {size:g}")
    return (round(x), round(y), round(size))


def cut_box(image: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """The ``size`` x ``size`` square at ``(x, y)``; parts outside the image repeat its nearest edge pixels."""
    x, y, size = box
    height, width = image.shape[:2]
    if x >= 0 and x + size <= width and y >= 0 and y + size <= height:
        return image[y : y + size, x : x + size]
    rows = np.clip(np.arange(y, y + size), 0, height - 1)
    cols = np.clip(np.arange(x, x + size), 0, width - 1)
    return image[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize uint8 (h, w, 3) to (height, width, 3): bilinear, ``align_corners=False``, antialiased when shrinking.

    Enlarging is exactly the original's resize (docs/models.md#identity-image: bilinear, align_corners=False, no
    antialias); shrinking a large photo with that filter would alias, so the same bilinear kernel is widened
    (``antialias=True``, like the antialiased resize the training data got). Same size returns the input.
    """
    import torch

    if image.shape[:2] == (height, width):
        return image
    shrinking = width < image.shape[1] or height < image.shape[0]
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch only wraps writable memory
        image = image.copy()
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(
        pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
    )
    return resized[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def square_crop(
    image: np.ndarray, box: tuple[float, float, float] | None = None, size: int = RELEASED_IMAGE_SIZE
) -> tuple[np.ndarray, CropInfo]:
    """Cut a square from a uint8 RGB image and resize it to ``size`` x ``size`` for the model.

    Args:
        image: uint8 (height, width, 3), e.g. from :func:`load_identity_image`.
        box: ``(x, y, side)`` in source pixels, or None for the largest centred square. A box reaching
            outside the image is padded by repeating the image's edge pixels (with a warning when it lies
            entirely outside).
        size: output side in pixels (the model resolution).

    Returns:
        the crop, uint8 (size, size, 3), and its :class:`CropInfo`.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError("square_crop: image must be uint8 (height, width, 3); load it with load_identity_image")
    image = _check_size(image, "square_crop image")
    if int(size) <= 0:
        raise InputError(f"size: the output side must be a positive number of pixels, got {size}")
    height, width = image.shape[:2]
    box = center_box(width, height) if box is None else check_box(box)
    x, y, side = box
    if x >= width or y >= height or x + side <= 0 or y + side <= 0:
        warnings.warn(
            f"crop box {box} lies entirely outside the {width}x{height} image; the crop only repeats edge pixels",
            stacklevel=2,
        )
    crop = resize_image(cut_box(image, box), int(size), int(size))
    return np.ascontiguousarray(crop), CropInfo(x, y, side, width, height, int(size))
