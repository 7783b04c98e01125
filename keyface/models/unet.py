"""The KeyFace UNet: diffusers' SVD spatio-temporal UNet with a per-frame label embedding
(docs/models.md#per-frame-label-embedding)."""

from __future__ import annotations

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.resnet import SpatioTemporalResBlock

from ..config import UNetConfig
from ..errors import InputError

# The official ResBlocks normalise with eps 1e-5 everywhere; diffusers builds some spatio-temporal resnets
# with 1e-6 (docs/models.md#groupnorm-epsilon). Attention GroupNorms stay at diffusers' 1e-6, which matches the
# original.
RESBLOCK_GROUPNORM_EPS = 1e-5


class KeyFaceUNet(UNetSpatioTemporalConditionModel):
    """SVD UNet whose label embedding is computed per frame instead of once per clip.

    Two differences from the stock diffusers model (docs/models.md#per-frame-label-embedding):

    * each frame's time embedding gets ``add_embedding(label_f)`` added, where the label vector of frame ``f``
      is ``[add_time_proj(valence_f) | add_time_proj(arousal_f) | audio_token_f]`` (keyframe stage) or just
      ``audio_token_f`` (interpolation stage, ``addition_time_embed_dim = 0``);
    * every GroupNorm inside every res block (spatial and temporal halves) uses eps 1e-5.

    Build it from a :class:`~keyface.config.UNetConfig` with :meth:`from_unet_config`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_block_types: tuple[str, ...],
        up_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        addition_time_embed_dim: int,
        projection_class_embeddings_input_dim: int,
        layers_per_block: int,
        cross_attention_dim: int,
        transformer_layers_per_block: int,
        num_attention_heads: tuple[int, ...],
        num_frames: int,
        sample_size: int | None = None,
    ):
        # fmt: off
        super().__init__(
            sample_size=sample_size, num_frames=num_frames, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=down_block_types, up_block_types=up_block_types,
            cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads,
            transformer_layers_per_block=transformer_layers_per_block,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
        )
        # fmt: on
        for block in self.modules():
            if isinstance(block, SpatioTemporalResBlock):
                for norm in block.modules():
                    if isinstance(norm, torch.nn.GroupNorm):
                        norm.eps = RESBLOCK_GROUPNORM_EPS

    @classmethod
    def from_unet_config(cls, config: UNetConfig) -> KeyFaceUNet:
        """A randomly initialised UNet of the given sizes (build under ``torch.device('meta')`` to skip init)."""
        return cls(**config.diffusers_kwargs())

    @property
    def emotion_embedding_dim(self) -> int:
        return self.config.addition_time_embed_dim

    def embed_emotion(self, valence_arousal: torch.Tensor) -> torch.Tensor:
        """Sinusoidal emotion embedding (docs/models.md#conditioning ``ConcatTimestepEmbedderND``, cos first).

        Args:
            valence_arousal: ``(n, 2)`` valence and arousal of each frame.
        Returns:
            ``(n, 2 * emotion_embedding_dim)`` float32 = ``[emb(valence) | emb(arousal)]``.
        """
        n = valence_arousal.shape[0]
        return self.add_time_proj(valence_arousal.float().flatten()).reshape(n, -1)

    def forward(
        self,
        sample: torch.Tensor,
        c_noise: torch.Tensor,
        context: torch.Tensor,
        emotion_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output F (v-prediction) for every frame.

        Args:
            sample: ``(batch, frames, in_channels, height, width)`` UNet input (already preconditioned).
            c_noise: ``(batch * frames,)`` noise-level input of each frame (``0.25 * ln(sigma)``).
            context: ``(batch, frames, context_dim)`` audio tokens of each clip: every frame cross-attends to all
                tokens of its clip, and frame ``f``'s own token ``context[:, f]`` enters its label vector.
            emotion_embedding: ``(batch * frames, 2 * emotion_embedding_dim)`` from :meth:`embed_emotion`;
                required when the model has an emotion input, must be ``None`` otherwise.
        Returns:
            ``(batch, frames, out_channels, height, width)``.
        """
        batch, frames = sample.shape[:2]
        if context.shape[:2] != (batch, frames):
            raise InputError(
                f"context has shape {tuple(context.shape)}; expected (batch={batch}, frames={frames}, tokens): "
                "one audio token per frame"
            )
        if (emotion_embedding is None) != (self.emotion_embedding_dim == 0):
            raise InputError(
                "emotion_embedding must be given for a model with emotion input and omitted otherwise "
                f"(this model's emotion embedding width is {self.emotion_embedding_dim})"
            )
        up_factor = 2**self.num_upsamplers
        if sample.shape[-2] % up_factor or sample.shape[-1] % up_factor:
            raise InputError(f"latent size {tuple(sample.shape[-2:])} must be a multiple of {up_factor} for this UNet")

        dtype = sample.dtype
        tokens = context.flatten(0, 1)
        label = tokens if emotion_embedding is None else torch.cat([emotion_embedding.to(tokens), tokens], dim=-1)
        emb = self.time_embedding(self.time_proj(c_noise).to(dtype)) + self.add_embedding(label.to(dtype))

        hidden = self.conv_in(sample.flatten(0, 1))
        per_frame_context = context.repeat_interleave(frames, dim=0)
        image_only_indicator = torch.zeros(batch, frames, dtype=dtype, device=sample.device)

        skips = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = block(
                hidden_states=hidden,
                temb=emb,
                image_only_indicator=image_only_indicator,
                **_cross_attention_kwargs(block, per_frame_context),
            )
            skips += block_skips

        hidden = self.mid_block(
            hidden_states=hidden,
            temb=emb,
            encoder_hidden_states=per_frame_context,
            image_only_indicator=image_only_indicator,
        )

        for block in self.up_blocks:
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            hidden = block(
                hidden_states=hidden,
                temb=emb,
                res_hidden_states_tuple=block_skips,
                image_only_indicator=image_only_indicator,
                **_cross_attention_kwargs(block, per_frame_context),
            )

        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        return hidden.reshape(batch, frames, *hidden.shape[1:])


def _cross_attention_kwargs(block: torch.nn.Module, context: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' plain (attention-free) blocks take no ``encoder_hidden_states`` argument."""
    return {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
