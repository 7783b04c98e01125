"""The container of every loaded part (:class:`KeyFaceModels`) and which parts each pipeline step needs.

Steps and the parts they use (``STEP_PARTS``)::

    identity   identity_encoder                     portrait / edited keyframes -> latents
    keyframes  keyframe                             stage 1 sampling
    segments   interpolation, autoguidance          stage 2 sampling
    decode     decoder                              output frames
    preview    keyframe_decoder                     keyframe previews

Offload modes (:data:`OFFLOAD_MODES`), given a compute ``device`` and a resting ``offload_device``:

* ``none``: every part stays on ``device`` the whole time (peak = sum of all parts).
* ``stage``: before a step, the parts it uses move to ``device`` and every other part moves to
  ``offload_device`` (peak = the largest step's parts + its activations).
* ``sequential``: like ``stage``, and the parts also return to ``offload_device`` as soon as the step ends,
  so nothing stays resident between steps (lowest residency, one move per step).
* ``stream``: for a step that does not fit even alone: its parts stay on ``offload_device`` and each block of
  them moves to ``device`` just for its own forward (:mod:`keyface.models.streaming`; peak = one or two blocks +
  the activations). Slowest: every network call moves every weight once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from .streaming import STREAM_BLOCK_ELEMENTS, LayerStreamer, stream_layout

if TYPE_CHECKING:
    from ..files import ModelFiles
    from .stages import InterpolationModel, InterpolationNetwork, KeyframeModel
    from .vae import FrameDecoder, IdentityEncoder

# KeyFaceModels attributes holding torch modules.
MODEL_PARTS = ("keyframe", "interpolation", "autoguidance", "decoder", "keyframe_decoder", "identity_encoder")
STEP_PARTS = {
    "identity": ("identity_encoder",),
    "keyframes": ("keyframe",),
    "segments": ("interpolation", "autoguidance"),
    "decode": ("decoder",),
    "preview": ("keyframe_decoder",),
}
OFFLOAD_MODES = ("none", "stage", "sequential", "stream")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass
class KeyFaceModels:
    """Everything the pipeline runs: both stages, the autoguidance network and the VAE parts.

    ``decoder`` (the interpolation checkpoint's VAE decoder) makes the output frames; ``keyframe_decoder`` (the
    keyframe checkpoint's) only previews keyframes. ``identity_encoder`` turns images into latents (identity,
    edited keyframes). ``files``: identities of the weight files, part of every job's fingerprint; ``sources``:
    the :class:`~keyface.files.ModelFiles` they were loaded from (what a Ray worker loads), ``None`` when built
    in memory.
    """

    keyframe: KeyframeModel
    interpolation: InterpolationModel
    autoguidance: InterpolationNetwork | None
    decoder: FrameDecoder
    keyframe_decoder: FrameDecoder | None = None
    identity_encoder: IdentityEncoder | None = None
    files: dict[str, str] = field(default_factory=dict)
    sources: ModelFiles | None = field(default=None, repr=False, compare=False)
    residency: Residency | None = field(default=None, repr=False, compare=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents (from the interpolation model's learned mask)."""
        return tuple(self.interpolation.learned_mask.shape)

    @property
    def image_size(self) -> int:
        return self.interpolation.config.image_size

    def __repr__(self) -> str:
        """Parts, resolution, dtype and device; never the networks' text (a repr can reach an error report)."""
        weight = next(self.interpolation.parameters(), None)
        where = "" if weight is None else f"; {weight.dtype} on {weight.device}"
        return f"KeyFaceModels({', '.join(self.parts())}; {self.image_size} px{where})"

    def parts(self, names=MODEL_PARTS) -> dict[str, torch.nn.Module]:
        """The loaded modules among ``names`` (absent optional parts left out)."""
        return {name: module for name in names if (module := getattr(self, name)) is not None}

    def size_bytes(self, names=MODEL_PARTS) -> int:
        """Bytes of the parameters and buffers of the parts ``names``."""
        return sum(module_bytes(module) for module in self.parts(names).values())

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """The parts step ``name`` uses are on the compute device for the block (see the module docstring);
        without a :attr:`residency` nothing moves."""
        if self.residency is None:
            yield
            return
        with self.residency.step(self, STEP_PARTS[name]):
            yield

    def encode_image(self, image: np.ndarray, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sampler-space latent ``(1, C, h, w)`` of a square uint8 RGB image ``(S, S, 3)`` (posterior mean, or
        the posterior sample for a given standard-normal ``noise``)."""
        from .vae import preprocess_image

        if self.identity_encoder is None:
            raise InputError("no VAE encoder is loaded: load the SVD VAE to turn images into latents")
        with self.step("identity"), torch.inference_mode():
            return self.identity_encoder.encode(preprocess_image(image, self.image_size), noise).cpu()


@dataclass
class Residency:
    """Where the parts live between and during steps (the offload ``mode``, see the module docstring).

    By default parts move with ``module.to``. A host passes its own ``load`` / ``unload`` hooks instead
    (ComfyUI: its model management, which frees other models first and may offload ours when it needs the
    room): ``load(parts)`` is called before every step with all the parts the step uses, ``{name: module}``,
    resident or not (the host knows whether it moved them since); ``unload(parts)`` with the parts to leave
    the device. ``resident`` names the parts on ``device`` as far as this residency moved them.

    Mode ``stream`` uses neither hook: ``make_room(bytes)`` (ComfyUI: free its own models) is called before each
    step with the step's streaming peak of weights, blocks hold at most ``block_elements`` elements, the next
    block is prefetched when ``prefetch``, and ``move`` replaces the default weight move
    (:class:`~keyface.models.streaming.LayerStreamer`). ``streamer``: the last step's streamer.
    """

    device: torch.device
    offload_device: torch.device
    mode: str = "stage"
    load: Callable[[dict[str, torch.nn.Module]], None] | None = None
    unload: Callable[[dict[str, torch.nn.Module]], None] | None = None
    resident: set[str] = field(default_factory=set)
    make_room: Callable[[int], None] | None = None
    block_elements: int = STREAM_BLOCK_ELEMENTS
    prefetch: bool = True
    move: Callable[..., None] | None = None
    streamer: LayerStreamer | None = None

    def __post_init__(self):
        if self.mode not in OFFLOAD_MODES:
            raise InputError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.mode!r}")

    @property
    def active(self) -> bool:
        """False when nothing ever moves (mode ``none``, or one device and no host hooks)."""
        hooked = self.load is not None or (self.mode == "stream" and (self.move, self.make_room) != (None, None))
        return self.mode != "none" and (self.device != self.offload_device or hooked)

    def _load(self, parts: dict[str, torch.nn.Module]) -> None:
        if self.load is not None:
            self.load(parts)
        else:
            for name, module in parts.items():
                if name not in self.resident:
                    module.to(self.device)
        self.resident.update(parts)

    def _unload(self, parts: dict[str, torch.nn.Module]) -> None:
        if not parts:
            return
        if self.unload is not None:
            self.unload(parts)
        else:
            for module in parts.values():
                module.to(self.offload_device)
        self.resident.difference_update(parts)

    @contextlib.contextmanager
    def step(self, models: KeyFaceModels, names: tuple[str, ...]) -> Iterator[None]:
        if not self.active:
            yield
            return
        wanted = models.parts(names)
        keep = set() if self.mode == "stream" else set(wanted)
        self._unload({name: module for name, module in models.parts().items() if name in self.resident - keep})
        if self.mode == "stream":
            layout = stream_layout(wanted.values(), self.block_elements)
            if self.make_room is not None:
                self.make_room(layout.peak_bytes(self.prefetch))
            self.streamer = LayerStreamer(
                layout, wanted.values(), self.device, self.offload_device, prefetch=self.prefetch, move=self.move
            )
            with self.streamer:
                yield
            return
        self._load(wanted)
        try:
            yield
        finally:
            if self.mode == "sequential":
                self._unload(wanted)
