"""Sampling: AYS noise levels, the Euler EDM sampler and the two guidance rules (docs/sampler.md).

Latents are ``(clips * frames, latent_channels, h, w)`` in sampler space, frames flattened clip-major. Sampler
arithmetic is float32 whatever dtype the networks run in. Noise is always an argument (the original draws it
on the GPU; the pipeline decides where it comes from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError
from .models.conditioning import InterpolationConditioning, KeyframeConditioning
from .models.streaming import compute_device

if TYPE_CHECKING:  # the stage modules import diffusers; keep `import keyface.sampling` light
    from .models.stages import InterpolationModel, InterpolationNetwork, KeyframeModel

# `AYSDiscretization` base noise levels (docs/sampler.md#noise-levels), highest first.
AYS_BASE_SIGMAS = (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)
# The configs' `num_steps: 10`, which means 11 Euler steps over the 11 base levels (docs/sampler.md#noise-levels,
# #steps).
DEFAULT_NUM_STEPS = 10
# `AudioRefMultiCondGuider(audio_ratio=5.0, ref_ratio=2.0)` (docs/sampler.md#keyframe-guidance).
KEYFRAME_AUDIO_SCALE = 5.0
KEYFRAME_IDENTITY_SCALE = 2.0
# `KarrasGuider(scale=2.0)` autoguidance of the interpolation stage (docs/sampler.md#interpolation-guidance).
AUTOGUIDANCE_SCALE = 2.0

StepCallback = Callable[[int, int], None]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ays_sigmas(num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
    """Noise levels of the sampler, float32, highest first, ending with 0 (docs/sampler.md#noise-levels).

    ``num_steps == 10`` gives the 11 base levels (11 Euler steps); ``num_steps > 10`` interpolates the base
    levels log-linearly to ``num_steps`` levels (``num_steps`` Euler steps). Fewer than 10 is refused, as in the
    original. Returns ``(levels + 1,)``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < DEFAULT_NUM_STEPS:
        raise InputError(
            f"num_steps must be an integer >= {DEFAULT_NUM_STEPS} (the AYS schedule has "
            f"{len(AYS_BASE_SIGMAS)} base noise levels), got {num_steps!r}"
        )
    base = np.asarray(AYS_BASE_SIGMAS, dtype=np.float64)
    if num_steps == DEFAULT_NUM_STEPS:
        levels = base
    else:
        ascending_log = np.log(base[::-1])
        grid = np.linspace(0.0, 1.0, len(base))
        levels = np.exp(np.interp(np.linspace(0.0, 1.0, num_steps), grid, ascending_log))[::-1]
    return torch.from_numpy(np.append(levels, 0.0)).float()


def sample_euler(
    denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Deterministic Euler EDM sampler (``s_churn = 0``, docs/sampler.md#euler-sampler).

    Args:
        denoise: ``denoise(x, sigma)`` -> denoised estimate, ``x`` ``(n, C, h, w)``, ``sigma`` ``(n,)``.
        noise: ``(n, C, h, w)`` standard normal; the start is ``noise * sqrt(1 + sigmas[0]^2)``.
        sigmas: float32 noise levels ending with 0 (:func:`ays_sigmas`).
        callback: called as ``callback(step, total)`` after each step (``step`` = 1..total); it may raise (e.g.
            :class:`~keyface.errors.Interrupted`) to stop sampling.
    Returns:
        ``(n, C, h, w)`` float32: the last step (to sigma 0) returns the denoised estimate itself.
    """
    # The branch to the last step is decided from host floats, read once here: a tensor comparison inside the
    # loop would wait for the device at every step.
    last_step = [value == 0 for value in sigmas.float().tolist()[1:]]
    sigmas = sigmas.float().to(noise.device)
    x = noise.float() * torch.sqrt(1.0 + sigmas[0] ** 2)
    total = len(sigmas) - 1
    for step in range(total):
        sigma, next_sigma = sigmas[step], sigmas[step + 1]
        denoised = denoise(x, sigma.expand(x.shape[0])).float()
        x = denoised if last_step[step] else x + (next_sigma - sigma) * ((x - denoised) / sigma)
        if callback is not None:
            callback(step + 1, total)
    return x


@dataclass
class KeyframeBranches:
    """The three denoised branches of keyframe guidance, each ``(clips * frames, C, h, w)``
    (docs/sampler.md#keyframe-guidance)."""

    uncond: torch.Tensor  # no audio, no identity
    identity: torch.Tensor  # identity only
    full: torch.Tensor  # audio and identity

    def guided(self, audio_scale: float, identity_scale: float) -> torch.Tensor:
        """``uc + identity_scale * (ref - uc) + audio_scale * (full - ref)``."""
        return self.uncond + identity_scale * (self.identity - self.uncond) + audio_scale * (self.full - self.identity)


class KeyframeGuidance:
    """Audio/identity multi-condition guidance around a :class:`KeyframeModel`: the three branches of every clip
    go through the network in ONE call (batch order: all uncond clips, all identity-only, all full)."""

    def __init__(
        self,
        model: KeyframeModel,
        cond: KeyframeConditioning,
        audio_scale: float = KEYFRAME_AUDIO_SCALE,
        identity_scale: float = KEYFRAME_IDENTITY_SCALE,
    ):
        self.model = model
        self.audio_scale = audio_scale
        self.identity_scale = identity_scale
        self.batched = KeyframeConditioning.cat([cond.unconditional(), cond.without_audio(), cond])

    def branches(self, x: torch.Tensor, sigma: torch.Tensor) -> KeyframeBranches:
        denoised = self.model.denoise(x.repeat(3, 1, 1, 1), sigma.repeat(3), self.batched)
        return KeyframeBranches(*denoised.chunk(3))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.branches(x, sigma).guided(self.audio_scale, self.identity_scale)


class Autoguidance:
    """Interpolation guidance ``bad + scale * (good - bad)`` with a weaker "bad" network
    (docs/sampler.md#interpolation-guidance).

    All segments go through each network in one call. ``bad_network=None`` or ``scale == 1`` is the plain main
    network (one call per step).
    """

    def __init__(
        self,
        model: InterpolationModel,
        bad_network: InterpolationNetwork | None,
        cond: InterpolationConditioning,
        scale: float = AUTOGUIDANCE_SCALE,
    ):
        self.model = model
        self.bad_network = bad_network if scale != 1.0 else None
        self.cond = cond
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        good = self.model.denoise(x, sigma, self.cond)
        if self.bad_network is None:
            return good
        bad = self.bad_network.denoise(x, sigma, self.cond)
        return bad + self.scale * (good - bad)


def _check_noise(noise: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(noise.shape) != expected:
        raise InputError(f"noise has shape {tuple(noise.shape)}; expected {expected} (clips * frames, C, h, w)")


def sample_keyframes(
    model: KeyframeModel,
    identity_latent: torch.Tensor,
    audio: torch.Tensor,
    valence: torch.Tensor,
    arousal: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int = DEFAULT_NUM_STEPS,
    audio_scale: float = KEYFRAME_AUDIO_SCALE,
    identity_scale: float = KEYFRAME_IDENTITY_SCALE,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Keyframe latents of ``clips`` clips, sampled together.

    Args:
        identity_latent: ``(1, C, h, w)`` sampler-space identity latent (shared by all clips).
        audio: ``(clips, frames, subframes, audio_feature_dim)`` audio features of each keyframe slot.
        valence, arousal: ``(clips, frames)``.
        noise: ``(clips * frames, C, h, w)`` standard normal.
        callback: ``callback(step, total)`` after each sampler step; may raise to interrupt.
    Returns:
        ``(clips * frames, C, h, w)`` float32 sampler-space latents.
    """
    sigmas = ays_sigmas(num_steps)
    device = compute_device(model)
    with torch.inference_mode():
        cond = model.condition(identity_latent.to(device), audio.to(device), valence, arousal)
        _check_noise(noise, (cond.num_clips * audio.shape[1], *identity_latent.shape[1:]))
        guidance = KeyframeGuidance(model, cond, audio_scale, identity_scale)
        return sample_euler(guidance, noise.to(device), sigmas, callback)


def sample_segments(
    model: InterpolationModel,
    bad_network: InterpolationNetwork | None,
    start_latents: torch.Tensor,
    end_latents: torch.Tensor,
    audio: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int = DEFAULT_NUM_STEPS,
    guidance_scale: float = AUTOGUIDANCE_SCALE,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Interpolated latents of ``segments`` segments, sampled together.

    Args:
        bad_network: the autoguidance network, or ``None`` for the plain main network.
        start_latents, end_latents: ``(segments, C, h, w)`` sampler-space keyframe latents.
        audio: ``(segments, frames, subframes, audio_feature_dim)``.
        noise: ``(segments * frames, C, h, w)`` standard normal.
        callback: ``callback(step, total)`` after each sampler step; may raise to interrupt.
    Returns:
        ``(segments * frames, C, h, w)`` float32; frame 0 / the last frame of each segment are its keyframes'
        positions (re-generated, not copied).
    """
    sigmas = ays_sigmas(num_steps)
    device = compute_device(model)
    with torch.inference_mode():
        cond = model.condition(start_latents.to(device), end_latents.to(device), audio.to(device))
        _check_noise(noise, (cond.num_segments * audio.shape[1], *start_latents.shape[1:]))
        guidance = Autoguidance(model, bad_network, cond, guidance_scale)
        return sample_euler(guidance, noise.to(device), sigmas, callback)
