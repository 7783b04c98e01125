"""What travels along KeyFace's own wire types between nodes.

==================== ================================================================================
``KEYFACE_MODEL``     :class:`ModelBundle`: the loaded networks, the audio feature extractor, device policy
``KEYFACE_AUDIO``     :class:`AudioInput`: the clip, its per-frame features (memory-mapped cache entry)
``KEYFACE_EMOTION``   a :class:`keyface.emotion.EmotionCurve`
``KEYFACE_CROP``      :class:`FaceCropHandle`: where the face crop came from + the original picture
``KEYFACE_KEYFRAMES`` :class:`KeyframesHandle`: the job after stage 1 (keyframes in its job folder)
``KEYFACE_VIDEO``     :class:`VideoHandle`: the job after stage 2; frames are decoded on demand, never all in RAM
==================== ================================================================================

ComfyUI keeps node outputs between runs, so these objects must stay valid: everything large lives on disk
(feature cache, job folder) and is read back or recomputed when asked for.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from comfy_api.v0_0_2 import io

from . import host

if TYPE_CHECKING:
    import numpy as np
    import torch

    from keyface.audio.features import AudioFeatureExtractor, AudioFeatures
    from keyface.audio.io import AudioClip
    from keyface.identity import CropInfo
    from keyface.models.bundle import KeyFaceModels
    from keyface.pipeline import TalkingHeadJob

# The pack's socket types (V3 custom types; the strings are what saved workflows store)
MODEL = io.Custom("KEYFACE_MODEL")
AUDIO_FEATURES = io.Custom("KEYFACE_AUDIO")
EMOTION = io.Custom("KEYFACE_EMOTION")
CROP = io.Custom("KEYFACE_CROP")
KEYFRAMES = io.Custom("KEYFACE_KEYFRAMES")
VIDEO = io.Custom("KEYFACE_VIDEO")


@dataclass
class ModelBundle:
    """The loaded KeyFace models and where they run.

    Inside ComfyUI (:func:`host.manages_models`) each part is handed to ComfyUI's model management as a
    ModelPatcher (:attr:`patchers`, made on first use): inside :meth:`on_device` every pipeline step asks it to
    load the parts that step uses; the rest stay where ComfyUI left them (offloaded when it needed the room).
    Outside ComfyUI the networks wait on ``offload_device`` and each step brings only its own parts to
    ``device`` (offload mode ``stage``, see :mod:`keyface.models.bundle`); with both devices equal nothing moves.
    """

    models: KeyFaceModels
    extractor: AudioFeatureExtractor
    device: torch.device
    offload_device: torch.device
    dtype: torch.dtype
    patchers: dict[str, object] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # short: ComfyUI puts str() of every node input into its error reports
        return f"ModelBundle({self.models!r}, device {self.device}, offload device {self.offload_device})"

    @property
    def offloads(self) -> bool:
        return self.device != self.offload_device

    def modules(self) -> list[torch.nn.Module]:
        return list(self.models.parts().values())

    def move_to(self, device: torch.device) -> None:
        for module in self.modules():
            module.to(device)

    def release(self) -> None:
        """Hand every part back: inside ComfyUI its model management unloads them now; the audio encoders are
        dropped (loaded again when needed)."""
        host.release_models(self.patchers.values())
        self.patchers.clear()
        self.extractor.unload()

    def _load_step(self, parts: dict[str, torch.nn.Module]) -> None:
        for name, module in parts.items():
            if name not in self.patchers:
                self.patchers[name] = host.model_patcher(module, self.device, self.offload_device)
        host.load_models(self.patchers[name] for name in parts)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[KeyFaceModels]:
        """The models, each step's parts on ``device`` while it runs (see the class docstring); outside
        ComfyUI all back on the offload device afterwards."""
        from keyface.models.bundle import Residency

        if host.manages_models() and host.streams_layers():
            host.release_models(self.patchers.values())  # parts loaded whole before go back; blocks stream in
            self.patchers.clear()
            self.models.residency = Residency(
                self.device, self.offload_device, "stream", make_room=lambda size: host.free_memory(size, self.device)
            )
            try:
                yield self.models
            finally:
                self.models.residency = None
            return
        if host.manages_models():
            # ComfyUI offloads our other parts when (and only when) it needs their memory
            self.models.residency = Residency(
                self.device, self.offload_device, "stage", load=self._load_step, unload=lambda parts: None
            )
            try:
                yield self.models
            finally:
                self.models.residency = None
            return
        if not self.offloads:
            yield self.models
            return
        self.models.residency = Residency(self.device, self.offload_device, "stage")
        try:
            yield self.models
        finally:
            self.models.residency = None
            self.move_to(self.offload_device)
            host.empty_cache()


def managed_feature_extractor(audio: dict, device: torch.device, offload_device: torch.device):
    """An audio feature extractor whose encoders (``audio``: role -> weights path) ComfyUI places: loaded onto
    ``offload_device``, all three handed to its model management before they encode (none on a cache hit)."""
    return _managed_extractor_class()(**audio, device=offload_device, load_device=device)


@functools.cache
def _managed_extractor_class():
    from keyface.audio.features import AudioFeatureExtractor

    class ManagedFeatureExtractor(AudioFeatureExtractor):
        """:class:`AudioFeatureExtractor` whose encoders are ComfyUI ModelPatchers (see
        :func:`managed_feature_extractor`)."""

        def __init__(self, *args, load_device: torch.device, **kwargs):
            super().__init__(*args, **kwargs)
            self.load_device = load_device
            self.patchers: dict[str, object] = {}
            self._placed = False

        def extract(self, *args, **kwargs):
            self._placed = False  # ComfyUI may have offloaded the encoders since the last clip
            return super().extract(*args, **kwargs)

        def encoder(self, role: str):
            if not self._placed:
                self._placed = True
                for name in ("wavlm", "beats", "wav2vec2"):
                    if name not in self.patchers:
                        module = super().encoder(name).module
                        self.patchers[name] = host.model_patcher(module, self.load_device, self.device)
                host.load_models(self.patchers.values())
            return super().encoder(role)

        def unload(self) -> None:
            host.release_models(self.patchers.values())
            self.patchers.clear()
            super().unload()

    return ManagedFeatureExtractor


@dataclass(frozen=True)
class AudioInput:
    """A clip and its features (``features.keyframe`` ``(frames, 2, Dk)``, memory-mapped from the feature
    cache). ``extractor`` recomputes them in the other channel mode when the reference schedule asks for it."""

    clip: AudioClip
    features: AudioFeatures
    extractor: AudioFeatureExtractor

    def __repr__(self) -> str:
        clip = self.clip
        return (
            f"AudioInput({clip.duration_seconds:.2f} s, {clip.num_channels} channel(s) at {clip.sample_rate} Hz, "
            f"{self.num_frames} frames, {self.features.mode} features)"
        )

    @property
    def num_frames(self) -> int:
        return self.features.num_frames

    def features_for(self, mode: str) -> AudioFeatures:
        """The features in channel mode ``mode`` ("default" or "reference"; they differ only for audio with
        several channels at a rate other than 16 kHz)."""
        from keyface.constants import ENCODER_SAMPLE_RATE

        same = self.clip.num_channels == 1 or self.clip.sample_rate == ENCODER_SAMPLE_RATE
        if self.features.mode == mode or same:
            return self.features
        return self.extractor.extract(self.clip, mode=mode)


@dataclass(frozen=True)
class FaceCropHandle:
    """A face crop's :class:`~keyface.identity.CropInfo`, the full picture it came from (uint8 (H, W, 3)) and
    the paste-back blend band (fraction of the crop side)."""

    info: CropInfo
    original: np.ndarray
    feather: float

    def __repr__(self) -> str:
        height, width = self.original.shape[:2]
        return f"FaceCropHandle(box {self.info.box} of a {width}x{height} picture, feather {self.feather})"

    def paste_back(self):
        """A per-frame transform: square uint8 frame -> the full picture with the frame blended in."""
        from keyface.face import PasteBack

        return PasteBack(self.original, self.info, self.feather)


@dataclass
class KeyframesHandle:
    """Stage 1 done: ``job`` holds the keyframes (in its job folder). ``frames``: the video frame each keyframe
    depicts, in order; ``images``: the decoded keyframes the sampler output (None when it decoded none), for
    telling edited keyframes apart."""

    job: TalkingHeadJob
    bundle: ModelBundle
    audio: AudioInput
    frames: list[int]
    images: torch.Tensor | None

    def __repr__(self) -> str:
        return f"KeyframesHandle({len(self.frames)} keyframes of {self.job.num_frames} frames, {self.bundle!r})"


@dataclass
class VideoHandle:
    """Stage 2 done: ``job`` streams the frames (``job.frames(start, stop)``), decoding them on demand.
    ``keep_job_folder``: keep the job folder after Video Combine has written the whole video (else deleted)."""

    job: TalkingHeadJob
    bundle: ModelBundle
    clip: AudioClip
    fps: int
    keep_job_folder: bool = False

    def __repr__(self) -> str:
        return f"VideoHandle({self.num_frames} frames at {self.fps} fps, {self.size} px, {self.bundle!r})"

    @property
    def num_frames(self) -> int:
        return self.job.num_frames

    @property
    def size(self) -> int:
        """Side of the square frames, in pixels."""
        return self.bundle.models.image_size
