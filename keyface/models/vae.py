"""The SVD VAE pieces KeyFace uses (docs/models.md#vae): an image encoder for the identity latent, a frame decoder.

* :class:`IdentityEncoder` = diffusers ``AutoencoderKLTemporalDecoder``'s ``encoder`` + ``quant_conv``: turns
  one identity image into the sampler-space latent the keyframe stage is conditioned on. The original stores a
  random posterior *sample*; we return the posterior **mean** by default (deterministic), or the sample
  ``mean + std * noise`` for a given ``noise`` (what the original does with unseeded noise).
* :class:`FrameDecoder` = diffusers ``TemporalDecoder`` with the weights of an engine checkpoint's
  ``first_stage_model.decoder``; it decodes **each frame on its own** like the original (``decoding_t = 1``,
  docs/models.md#vae): the temporal layers see a single frame. One call takes any number of frames, decoded together
  as a batch of one-frame videos, in float32.

Cropping an arbitrary image to a square face is not done here (see ``keyface.identity``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, Encoder
from torch import nn

from ..config import VAE_SCALE_FACTOR, DecoderConfig, EncoderConfig
from ..errors import InputError
from .streaming import compute_device

# Pixel range mapping of the SVD VAE input: [0, 255] -> [-1, 1] (docs/models.md#identity-image, `/127.5 - 1`).
PIXEL_HALF_RANGE = 127.5


def preprocess_image(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """An identity image as the VAE encoder input, exactly as the original offline script
    (docs/models.md#identity-image).

    Args:
        image: ``(height, width, 3)`` RGB, ``uint8`` in [0, 255] or floating point in [0, 1].
        size: the model's image size (``StageConfig.image_size``; 512 for the released weights).
    Returns:
        ``(1, 3, size, size)`` float32 in [-1, 1]: bilinear resize (``align_corners=False``, no antialias,
        aspect ratio not preserved — give a square crop) then ``/ 127.5 - 1``.
    """
    pixels = torch.as_tensor(np.array(image) if not isinstance(image, torch.Tensor) else image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise InputError(f"identity image has shape {tuple(pixels.shape)}; expected (height, width, 3) RGB")
    if pixels.dtype == torch.uint8:
        pixels = pixels.float()
    elif pixels.is_floating_point():
        pixels = pixels.float() * 255.0
    else:
        raise InputError(f"identity image has dtype {pixels.dtype}; expected uint8 or floating point in [0, 1]")
    pixels = pixels.permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return resized / PIXEL_HALF_RANGE - 1.0


def to_pixels(decoded: torch.Tensor) -> torch.Tensor:
    """Raw decoder output -> pixels in [0, 1]: ``clamp((x + 1) / 2, 0, 1)`` (docs/models.md#vae)."""
    return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)


class IdentityEncoder(nn.Module):
    """SVD VAE image encoder: pixels -> diagonal Gaussian posterior -> sampler-space latent."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(
            in_channels=config.in_channels,
            out_channels=config.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(config.block_out_channels),
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)

    def posterior(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior of ``pixels`` ``(batch, 3, H, W)`` in [-1, 1]; ``.mean``, ``.logvar`` (clamped), ``.std``."""
        pixels = pixels.to(device=compute_device(self), dtype=self.quant_conv.weight.dtype)
        moments = self.quant_conv(self.encoder(pixels))
        return DiagonalGaussianDistribution(moments.float())

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sampler-space latent ``(batch, latent_channels, H/8, W/8)`` of ``pixels`` ``(batch, 3, H, W)``.

        ``noise=None`` gives the posterior mean (deterministic, our default); a standard-normal ``noise`` of the
        latent's shape gives the posterior sample ``mean + std * noise`` like the original. Both x 0.18215.
        """
        posterior = self.posterior(pixels)
        latent = posterior.mean
        if noise is not None:
            if noise.shape != latent.shape:
                raise InputError(f"noise has shape {tuple(noise.shape)}; expected {tuple(latent.shape)}")
            latent = latent + posterior.std * noise.to(latent)
        return latent * VAE_SCALE_FACTOR


class FrameDecoder(nn.Module):
    """SVD temporal VAE decoder that decodes each frame on its own (docs/models.md#vae)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.decoder = TemporalDecoder(
            in_channels=config.latent_channels,
            out_channels=config.out_channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw decoder output ``(frames, 3, H, W)`` (about [-1, 1], not clamped) of sampler-space latents
        ``(frames, latent_channels, h, w)``, each frame decoded alone in one batched pass. Use :func:`to_pixels`
        for [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise InputError(
                f"latents have shape {tuple(latents.shape)}; expected (frames, {self.config.latent_channels}, h, w)"
            )
        weight = self.decoder.conv_in.weight
        device = compute_device(self)
        # A batch of one-frame videos: each frame is decoded alone (its temporal layers see only itself), as
        # with one call per frame, but in one pass (several times faster on a CPU).
        single_frames = torch.zeros(latents.shape[0], 1, dtype=weight.dtype, device=device)
        z = (latents / VAE_SCALE_FACTOR).to(device=device, dtype=weight.dtype)
        return self.decoder(z, image_only_indicator=single_frames, num_frames=1).float()
