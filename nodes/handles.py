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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import host

if TYPE_CHECKING:
    import numpy as np
    import torch

    from keyface.audio.features import AudioFeatureExtractor, AudioFeatures
    from keyface.audio.io import AudioClip
    from keyface.identity import CropInfo
    from keyface.models.bundle import KeyFaceModels
    from keyface.pipeline import TalkingHeadJob

MODEL = "KEYFACE_MODEL"
AUDIO_FEATURES = "KEYFACE_AUDIO"
EMOTION = "KEYFACE_EMOTION"
CROP = "KEYFACE_CROP"
KEYFRAMES = "KEYFACE_KEYFRAMES"
VIDEO = "KEYFACE_VIDEO"


@dataclass
class ModelBundle:
    """The loaded KeyFace models and where they run.

    The networks wait on ``offload_device`` (ComfyUI's: the CPU unless --highvram). Inside :meth:`on_device`
    each pipeline step brings only the parts it uses to ``device`` (offload mode ``stage``, see
    :mod:`keyface.models.bundle`), after asking ComfyUI to free that much memory; with both devices equal
    nothing moves.
    """

    models: KeyFaceModels
    extractor: AudioFeatureExtractor
    device: torch.device
    offload_device: torch.device
    dtype: torch.dtype

    @property
    def offloads(self) -> bool:
        return self.device != self.offload_device

    def modules(self) -> list[torch.nn.Module]:
        return list(self.models.parts().values())

    def move_to(self, device: torch.device) -> None:
        for module in self.modules():
            module.to(device)

    def _load_part(self, name: str, module: torch.nn.Module) -> None:
        host.free_memory(self.models.size_bytes((name,)), self.device)
        module.to(self.device)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[KeyFaceModels]:
        """The models, each step's parts moved to ``device`` while it runs (ComfyUI's own models are unloaded
        first when memory is short); all back on the offload device afterwards."""
        from keyface.models.bundle import Residency

        if not self.offloads:
            yield self.models
            return
        self.models.residency = Residency(self.device, self.offload_device, "stage", load=self._load_part)
        try:
            yield self.models
        finally:
            self.models.residency = None
            self.move_to(self.offload_device)
            host.empty_cache()


@dataclass(frozen=True)
class AudioInput:
    """A clip and its features (``features.keyframe`` ``(frames, 2, Dk)``, memory-mapped from the feature
    cache). ``extractor`` recomputes them in the other channel mode when the reference schedule asks for it."""

    clip: AudioClip
    features: AudioFeatures
    extractor: AudioFeatureExtractor

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


@dataclass
class VideoHandle:
    """Stage 2 done: ``job`` streams the frames (``job.frames(start, stop)``), decoding them on demand.
    ``keep_job_folder``: keep the job folder after Video Combine has written the whole video (else deleted)."""

    job: TalkingHeadJob
    bundle: ModelBundle
    clip: AudioClip
    fps: int
    keep_job_folder: bool = False

    @property
    def num_frames(self) -> int:
        return self.job.num_frames

    @property
    def size(self) -> int:
        """Side of the square frames, in pixels."""
        return self.bundle.models.image_size
