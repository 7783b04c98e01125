"""The two KeyFace stages as modules: network + audio projection (+ learned mask) + denoiser
(docs/models.md#keyframe-stage, #interpolation-stage; docs/sampler.md#preconditioning).

State-dict layout (what ``keyface.checkpoints`` maps the original keys onto):

* :class:`KeyframeModel`: ``unet.*``, ``audio_projection.linear.*``
* :class:`InterpolationNetwork` (the autoguidance "bad" network): ``unet.*``, ``learned_mask``
* :class:`InterpolationModel`: ``unet.*``, ``learned_mask``, ``audio_projection.linear.*``

Denoisers take and return float32 latents ``(clips * frames, latent_channels, h, w)`` whatever dtype the
network weights have (autocast is enabled around the UNet when the weights are half precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import StageConfig
from ..errors import InputError
from .conditioning import (
    AudioProjection,
    InterpolationConditioning,
    KeyframeConditioning,
    interpolation_frames,
    unscale_latent,
)
from .streaming import compute_device
from .unet import KeyFaceUNet


@dataclass
class VScalings:
    """Preconditioning of ``VScalingWithEDMcNoise`` (docs/sampler.md#preconditioning); every field ``(n,)`` like
    sigma."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor

    @classmethod
    def from_sigma(cls, sigma: torch.Tensor) -> VScalings:
        sigma = sigma.float()
        variance = sigma**2 + 1.0
        return cls(
            c_skip=1.0 / variance,
            c_out=-sigma / variance**0.5,
            c_in=1.0 / variance**0.5,
            c_noise=0.25 * sigma.log(),
        )


def _per_frame(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


class _StageNetwork(nn.Module):
    """A UNet with the v-scaling denoiser; subclasses supply the conditioning channels."""

    def __init__(self, config: StageConfig):
        super().__init__()
        self.config = config
        self.unet = KeyFaceUNet.from_unet_config(config.unet)

    @property
    def frames(self) -> int:
        return self.config.unet.num_frames

    def _denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond_channels: torch.Tensor,
        audio_tokens: torch.Tensor,
        emotion: torch.Tensor | None,
    ) -> torch.Tensor:
        """``D = c_skip * x + c_out * F([c_in * x | cond_channels], c_noise)`` in float32
        (docs/sampler.md#preconditioning)."""
        clips, frames = audio_tokens.shape[:2]
        if x.shape[0] != clips * frames or sigma.shape != (x.shape[0],):
            raise InputError(
                f"x has {x.shape[0]} frames and sigma shape {tuple(sigma.shape)}; expected {clips} clips x "
                f"{frames} frames = {clips * frames} of each"
            )
        x = x.float()
        scalings = VScalings.from_sigma(sigma)
        unet_input = torch.cat([x * _per_frame(scalings.c_in), cond_channels.to(x)], dim=1)
        net_dtype = self.unet.conv_in.weight.dtype  # ModelMixin.dtype walks every submodule per call
        with torch.autocast(x.device.type, dtype=net_dtype, enabled=net_dtype != torch.float32):
            output = self.unet(
                unet_input.unflatten(0, (clips, frames)).to(net_dtype),
                scalings.c_noise,
                audio_tokens.to(net_dtype),
                emotion,
            )
        output = output.flatten(0, 1).float()
        return _per_frame(scalings.c_skip) * x + _per_frame(scalings.c_out) * output

    def _project_audio(self, projection: AudioProjection, audio: torch.Tensor, name: str) -> torch.Tensor:
        expected = self.config.audio_feature_dim
        if audio.ndim != 4 or audio.shape[1] != self.frames or audio.shape[3] != expected:
            raise InputError(
                f"{name} has shape {tuple(audio.shape)}; expected (clips, {self.frames}, subframes, {expected})"
            )
        return projection(audio.to(device=compute_device(projection), dtype=projection.linear.weight.dtype)).float()

    def _check_latent(self, latent: torch.Tensor, name: str, batch: int | None = None) -> None:
        channels, size = self.config.latent_channels, self.config.latent_size
        ok = latent.ndim == 4 and latent.shape[1] == channels and (batch is None or latent.shape[0] in (1, batch))
        if not ok:
            raise InputError(
                f"{name} has shape {tuple(latent.shape)}; expected ({batch or 'n'}, {channels}, h, w) "
                f"(the model's latent size is {size}x{size})"
            )


class KeyframeModel(_StageNetwork):
    """Stage 1: generates 14 keyframe slots per clip from an identity latent, audio and emotion
    (docs/models.md#keyframe-stage)."""

    def __init__(self, config: StageConfig):
        if config.kind != "keyframe":
            raise InputError(f"KeyframeModel needs a keyframe StageConfig, got kind={config.kind!r}")
        super().__init__(config)
        self.audio_projection = AudioProjection(config.audio_feature_dim, config.unet.context_dim)

    def condition(
        self,
        identity_latent: torch.Tensor,
        audio: torch.Tensor,
        valence: torch.Tensor,
        arousal: torch.Tensor,
    ) -> KeyframeConditioning:
        """Conditioning of ``clips`` keyframe clips.

        Args:
            identity_latent: ``(1 or clips, latent_channels, h, w)`` sampler-space identity latent.
            audio: ``(clips, frames, subframes, audio_feature_dim)`` features of each keyframe slot.
            valence, arousal: ``(clips, frames)`` emotion of each keyframe slot.
        """
        tokens = self._project_audio(self.audio_projection, audio, "audio")
        clips = tokens.shape[0]
        self._check_latent(identity_latent, "identity_latent", clips)
        for name, values in (("valence", valence), ("arousal", arousal)):
            if tuple(values.shape) != (clips, self.frames):
                raise InputError(f"{name} has shape {tuple(values.shape)}; expected ({clips}, {self.frames})")
        identity = unscale_latent(identity_latent.float().to(tokens.device)).expand(clips, -1, -1, -1)
        valence_arousal = torch.stack([valence, arousal], dim=-1).flatten(0, 1).to(tokens.device)
        return KeyframeConditioning(identity, tokens, self.unet.embed_emotion(valence_arousal))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: KeyframeConditioning) -> torch.Tensor:
        """Denoised estimate ``(clips * frames, C, h, w)`` of ``x`` at per-frame noise ``sigma`` ``(clips * frames,)``.

        ``x`` is float32 sampler-space latents; the result is float32 whatever the network dtype."""
        frames = cond.audio_tokens.shape[1]
        identity = cond.identity.repeat_interleave(frames, dim=0)
        return self._denoise(x, sigma, identity, cond.audio_tokens, cond.emotion)


class InterpolationNetwork(_StageNetwork):
    """Stage-2 network without its conditioner: the UNet and its learned mask (docs/models.md#interpolation-stage).

    Used alone as the autoguidance "bad" network, which receives the main model's conditioning
    (docs/sampler.md#interpolation-guidance).
    """

    def __init__(self, config: StageConfig):
        if config.kind != "interpolation":
            raise InputError(f"{type(self).__name__} needs an interpolation StageConfig, got kind={config.kind!r}")
        super().__init__(config)
        # `starting_mask_method='zeros'`; trained values come from the checkpoint.
        self.learned_mask = nn.Parameter(torch.zeros(config.latent_channels, config.latent_size, config.latent_size))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: InterpolationConditioning) -> torch.Tensor:
        """Denoised estimate ``(segments * frames, C, h, w)`` of ``x`` at per-frame noise ``sigma``."""
        if cond.keyframes.shape[-2:] != self.learned_mask.shape[-2:]:
            raise InputError(
                f"keyframe latents are {tuple(cond.keyframes.shape[-2:])} but this interpolation model's learned "
                f"mask is {tuple(self.learned_mask.shape[-2:])}; use latents of the model's size"
            )
        frames = cond.audio_tokens.shape[1]
        channels = interpolation_frames(cond.keyframes, self.learned_mask.float(), frames)
        return self._denoise(x, sigma, channels, cond.audio_tokens, None)


class InterpolationModel(InterpolationNetwork):
    """Stage 2: fills the frames between two keyframes, guided by the audio of those frames
    (docs/models.md#interpolation-stage)."""

    def __init__(self, config: StageConfig):
        super().__init__(config)
        self.audio_projection = AudioProjection(config.audio_feature_dim, config.unet.context_dim)

    def condition(
        self, start_latents: torch.Tensor, end_latents: torch.Tensor, audio: torch.Tensor
    ) -> InterpolationConditioning:
        """Conditioning of ``segments`` segments.

        Args:
            start_latents, end_latents: ``(segments, latent_channels, h, w)`` sampler-space keyframe latents.
            audio: ``(segments, frames, subframes, audio_feature_dim)`` features of the segment's frames.
        """
        tokens = self._project_audio(self.audio_projection, audio, "audio")
        segments = tokens.shape[0]
        for name, latent in (("start_latents", start_latents), ("end_latents", end_latents)):
            self._check_latent(latent, name)
            if latent.shape[0] != segments:
                raise InputError(f"{name} holds {latent.shape[0]} latents but audio holds {segments} segments")
        keyframes = unscale_latent(torch.cat([start_latents, end_latents], dim=1).float().to(tokens.device))
        return InterpolationConditioning(keyframes, tokens)
