"""Conditioning of the two stages (docs/models.md): what the networks receive besides the noisy latent.

Latents here follow the library convention: sampler space (VAE latent x ``VAE_SCALE_FACTOR``), frames
flattened clip-major into the batch axis, ``(clips * frames, channels, height, width)``. The conditioning
channels given to the UNet are *unscaled* VAE latents (divided by ``VAE_SCALE_FACTOR``), as in SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import VAE_SCALE_FACTOR


class AudioProjection(nn.Module):
    """Per-frame audio features -> audio tokens: mean over the sub-frames, then Linear with bias
    (docs/models.md#conditioning).

    The original's ``WhisperAudioEmbedder(merge_method='mean')``; its Linear is ``linear``.
    """

    def __init__(self, audio_feature_dim: int, token_dim: int):
        super().__init__()
        self.linear = nn.Linear(audio_feature_dim, token_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, subframes, audio_feature_dim)`` -> ``(batch, frames, token_dim)``."""
        return self.linear(audio.mean(dim=2))


def unscale_latent(latent: torch.Tensor) -> torch.Tensor:
    """Sampler-space latent -> VAE latent, as concatenated to the UNet input (docs/models.md#latents, ``/ 0.18215``)."""
    return latent / VAE_SCALE_FACTOR


@dataclass
class KeyframeConditioning:
    """Conditioning of ``clips`` keyframe clips.

    Attributes:
        identity: ``(clips, latent_channels, h, w)`` unscaled identity latent of each clip (zeros = dropped).
        audio_tokens: ``(clips, frames, token_dim)`` projected audio of each keyframe slot (zeros = dropped).
        emotion: ``(clips * frames, 2 * emotion_embedding_dim)`` sinusoidal valence/arousal embedding per frame.
    """

    identity: torch.Tensor
    audio_tokens: torch.Tensor
    emotion: torch.Tensor

    @property
    def num_clips(self) -> int:
        return self.audio_tokens.shape[0]

    def without_audio(self) -> KeyframeConditioning:
        """Audio dropped: tokens zeroed after the projection, so its bias is absent too
        (docs/models.md#conditioning)."""
        return KeyframeConditioning(self.identity, torch.zeros_like(self.audio_tokens), self.emotion)

    def unconditional(self) -> KeyframeConditioning:
        """Audio and identity dropped; emotion is never dropped (``force_uc_zero_embeddings``,
        docs/models.md#conditioning)."""
        return KeyframeConditioning(torch.zeros_like(self.identity), torch.zeros_like(self.audio_tokens), self.emotion)

    @staticmethod
    def cat(parts: list[KeyframeConditioning]) -> KeyframeConditioning:
        """Stack several conditionings along the clip axis (in order)."""
        return KeyframeConditioning(
            torch.cat([p.identity for p in parts]),
            torch.cat([p.audio_tokens for p in parts]),
            torch.cat([p.emotion for p in parts]),
        )


@dataclass
class InterpolationConditioning:
    """Conditioning of ``segments`` interpolation segments.

    Attributes:
        keyframes: ``(segments, 2 * latent_channels, h, w)`` = ``[start | end]`` unscaled keyframe latents.
        audio_tokens: ``(segments, frames, token_dim)`` projected audio of the segment's consecutive frames.
    """

    keyframes: torch.Tensor
    audio_tokens: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.audio_tokens.shape[0]

    def unconditional(self) -> InterpolationConditioning:
        """Keyframes and audio dropped (zeros after the projection). Unused by autoguidance; kept for parity."""
        return InterpolationConditioning(torch.zeros_like(self.keyframes), torch.zeros_like(self.audio_tokens))


def interpolation_frames(keyframes: torch.Tensor, learned_mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The interpolation UNet's conditioning channels for every frame (docs/models.md#interpolation-stage).

    Args:
        keyframes: ``(segments, 2 * C, h, w)`` = ``[start | end]`` unscaled latents.
        learned_mask: ``(C, h, w)`` learned fill for the in-between frames.
        frames: frames per segment.
    Returns:
        ``(segments * frames, C + 1, h, w)``: channels ``[cond sequence (C) | mask (1)]`` where the sequence is the
        start latent at frame 0, ``learned_mask`` at frames 1..frames-2, the end latent at the last frame, and the
        mask is 1 on the two keyframes and 0 elsewhere.
    """
    segments, double_channels, height, width = keyframes.shape
    channels = double_channels // 2
    start, end = keyframes[:, :channels], keyframes[:, channels:]
    middle = learned_mask.to(keyframes).expand(segments, frames - 2, channels, height, width)
    sequence = torch.cat([start[:, None], middle, end[:, None]], dim=1)
    mask = torch.zeros(segments, frames, 1, height, width, dtype=keyframes.dtype, device=keyframes.device)
    mask[:, 0] = 1.0
    mask[:, -1] = 1.0
    return torch.cat([sequence, mask], dim=2).flatten(0, 1)
