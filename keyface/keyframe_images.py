"""The keyframes as images between the two stages: decoded for inspection and editing, and edits put back.

After stage 1 a host may show every keyframe as an image (ComfyUI: the Keyframe Sampler's ``keyframe_images``),
let the artist retouch some and hand the batch back before stage 2. This module sizes that batch under a memory
budget (:func:`keyframe_image_side`), decodes it (:func:`decode_keyframe_images`), tells edited keyframes from
untouched ones (:func:`edited_keyframes`) and gives the job the edited ones (:func:`apply_keyframe_edits`).
Images are ComfyUI-style float batches ``(n, side, side, 3)`` in [0, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .pipeline import TalkingHeadJob

# The decoded keyframes stay in RAM (a host keeps node outputs): at most this many bytes of float32 pixels;
# longer videos get smaller images (10 minutes of video = 1154 keyframes -> about 272 px).
KEYFRAME_IMAGES_BUDGET = 1024**3
# Keyframes decoded per VAE call.
DECODE_BLOCK = 16
# An edited keyframe differs from the decoded one somewhere by more than this (in [0, 1] units): above 8-bit
# rounding (a PNG save and reload of an unedited keyframe stays below), below any visible retouch.
EDIT_TOLERANCE = 1.5 / 255


def keyframe_image_side(count: int, requested: int, model_size: int, budget: int = KEYFRAME_IMAGES_BUDGET) -> int:
    """Side in pixels of ``count`` keyframe images: ``requested`` capped at the model resolution, and made
    smaller (a multiple of 8, at least 8) with a warning when ``count`` float32 RGB images would exceed
    ``budget`` bytes."""
    side = min(requested, model_size)
    affordable = int((budget / (max(count, 1) * 3 * 4)) ** 0.5) // 8 * 8
    if affordable < side:
        warnings.warn(
            f"keyframe_image_size: {count} keyframes; the keyframe images are made {max(affordable, 8)} px wide "
            f"to stay under {budget / 1024**3:g} GiB",
            stacklevel=2,
        )
        side = max(affordable, 8)
    return side


def _resized(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """``(n, 3, H, W)`` -> ``(n, 3, side, side)`` (antialiased bilinear, clamped to [0, 1])."""
    if pixels.shape[-2:] == (side, side):
        return pixels
    resized = torch.nn.functional.interpolate(
        pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp(0.0, 1.0)


def decode_keyframe_images(
    job: TalkingHeadJob, side: int, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Every keyframe of ``job`` (:meth:`~keyface.pipeline.TalkingHeadJob.keyframe_slots`, frame order) decoded
    as float32 images ``(n, side, side, 3)`` on the CPU; ``progress(done, total)`` after each decoder call."""
    slots = job.keyframe_slots()
    images = torch.empty((len(slots), side, side, 3))
    for first in range(0, len(slots), DECODE_BLOCK):
        block = slots[first : first + DECODE_BLOCK]
        pixels = job.decode_keyframes(torch.stack([job.slot_latent(slot_id) for _, slot_id in block]))
        images[first : first + len(block)] = _resized(pixels, side).float().permute(0, 2, 3, 1).cpu()
        if progress is not None:
            progress(first + len(block), len(slots))
    return images


def edited_keyframes(
    original: torch.Tensor, edited: torch.Tensor, tolerance: float = EDIT_TOLERANCE, name: str = "edited_keyframes"
) -> list[int]:
    """Indices of the images in ``edited`` that differ from ``original`` (the decoded keyframes, ``(n, s, s, 3)``)
    by more than ``tolerance`` anywhere. ``edited`` must hold as many square images, any size (compared at the
    size of ``original``)."""
    if getattr(edited, "ndim", 0) != 4 or edited.shape[-1] != 3:
        raise InputError(f"{name}: expected an image batch (count, height, width, 3)", input_name=name)
    if len(edited) != len(original):
        raise InputError(
            f"{name}: got {len(edited)} images; the sampler made {len(original)} keyframes. Give back the whole "
            "keyframe_images batch, in order, with your edits",
            input_name=name,
        )
    if edited.shape[1] != edited.shape[2]:
        raise InputError(
            f"{name}: images must be square like the keyframes, got {edited.shape[2]}x{edited.shape[1]}",
            input_name=name,
        )
    compared = _resized(edited.float().permute(0, 3, 1, 2), original.shape[1])
    difference = (compared - original.permute(0, 3, 1, 2)).abs().amax(dim=(1, 2, 3))
    return (difference > tolerance).nonzero().flatten().tolist()


def apply_keyframe_edits(
    job: TalkingHeadJob,
    frames: Sequence[int],
    original: torch.Tensor,
    edited: torch.Tensor,
    name: str = "edited_keyframes",
) -> list[int]:
    """Give ``job`` the keyframes of ``edited`` that differ from ``original`` (image ``i`` depicts video frame
    ``frames[i]``), VAE-encoded; returns the frames replaced. An edit smaller than the model resolution is
    enlarged (with a warning: it will look soft)."""
    changed = edited_keyframes(original, edited, name=name)
    size = job.models.image_size
    if changed and edited.shape[1] < size:
        warnings.warn(
            f"{name}: the edited keyframes are {edited.shape[1]} px; enlarged to the model's {size} px "
            "(they will look soft)",
            stacklevel=2,
        )
    for index in changed:
        job.replace_keyframe(frames[index], job.models.encode_image(edited[index].float())[0])
    return [frames[index] for index in changed]
