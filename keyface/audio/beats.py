"""BEATs (both stages' second audio stream, docs/audio.md#beats): a compact port of the published architecture.

BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", arXiv 2212.09058) as released by
Microsoft unilm: 128-bin kaldi fbank -> 16x16 patch embedding -> LayerNorm -> linear projection -> a
post-LN ("deep norm") transformer with a convolutional positional embedding and a gated relative position
bias shared by all layers. No BEATs package on PyPI loads the original checkpoint offline with few
dependencies, and transformers has no BEATs, so the network is written here from the architecture; it
loads the original ``{'cfg', 'model'}`` file (or a safetensors copy) with the checkpoint's key names.

Output (``return_embedding`` in KeyFace): the encoder output over the patches, ordered time-patch major with
``128 / patch`` frequency patches each (8 for 16x16 patches).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, brief
from ..files import file_identity
from .attention import RelativePositionBias, blockwise_attention, position_gate
from .encoders import AudioEncoder
from .weights import BEATS_ORIGIN, read_unilm_checkpoint

_WHAT = "BEATs checkpoint"

# BEATs preprocessing (unilm BEATs.preprocess; docs/audio.md#beats): kaldi fbank of the waveform scaled to int16 range.
FBANK_MEL_BINS = 128
FBANK_FRAME_LENGTH_MS = 25
FBANK_FRAME_SHIFT_MS = 10
FBANK_INPUT_SCALE = 2**15
FBANK_MEAN = 15.41663  # AudioSet fbank statistics used by the released models
FBANK_STD = 6.55582
_FRAME_LENGTH_SAMPLES = 400  # 25 ms at 16 kHz
_FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz
FBANK_CHUNK_FRAMES = 1000  # fbank frames computed at once: 10 s
_PREDICTOR_PREFIX = "predictor."  # fine-tuned AudioSet classifier head, unused (KeyFace takes the embedding)
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


@dataclass(frozen=True)
class BEATsConfig:
    """The network-defining entries of a BEATs checkpoint's ``cfg`` (all required, none defaulted)."""

    input_patch_size: int
    embed_dim: int
    conv_bias: bool
    encoder_layers: int
    encoder_embed_dim: int
    encoder_ffn_embed_dim: int
    encoder_attention_heads: int
    activation_fn: str
    layer_norm_first: bool
    deep_norm: bool
    conv_pos: int
    conv_pos_groups: int
    relative_position_embedding: bool
    num_buckets: int
    max_distance: int
    gru_rel_pos: bool

    @classmethod
    def from_cfg(cls, cfg: dict, where: str = "cfg") -> BEATsConfig:
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in cfg]
        if missing:
            raise CheckpointError(f"{_WHAT}: {where} lacks the config entries {missing}; is it a BEATs checkpoint?")
        config = cls(**{name: cfg[name] for name in names})
        if config.activation_fn not in _ACTIVATIONS:
            raise CheckpointError(f"{_WHAT}: {where}: unsupported activation_fn {config.activation_fn!r}")
        if config.deep_norm and config.layer_norm_first:
            raise CheckpointError(f"{_WHAT}: {where}: deep_norm and layer_norm_first cannot both be set")
        return config

    @property
    def frequency_patches(self) -> int:
        return FBANK_MEL_BINS // self.input_patch_size


def beats_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """BEATs input features of a 16 kHz waveform ``(samples,)`` -> ``(frames, 128)``, normalised
    (docs/audio.md#beats).

    Every kaldi frame is computed from its own 400 samples (no dither, no mean over the clip), so the fbank is
    computed :data:`FBANK_CHUNK_FRAMES` frames at a time: the same values, with the framing and FFT buffers of
    a chunk instead of the whole window (about 40 MB for 60 s).
    """
    import torchaudio.compliance.kaldi as kaldi

    if waveform.shape[-1] < _FRAME_LENGTH_SAMPLES:
        return waveform.new_zeros(0, FBANK_MEL_BINS)
    frames = 1 + (waveform.shape[-1] - _FRAME_LENGTH_SAMPLES) // _FRAME_SHIFT_SAMPLES
    fbank = torch.empty(frames, FBANK_MEL_BINS)
    for first in range(0, frames, FBANK_CHUNK_FRAMES):
        last = min(frames, first + FBANK_CHUNK_FRAMES)
        piece = waveform[first * _FRAME_SHIFT_SAMPLES : (last - 1) * _FRAME_SHIFT_SAMPLES + _FRAME_LENGTH_SAMPLES]
        fbank[first:last] = kaldi.fbank(
            piece.float()[None] * FBANK_INPUT_SCALE,
            num_mel_bins=FBANK_MEL_BINS,
            sample_frequency=16_000,
            frame_length=FBANK_FRAME_LENGTH_MS,
            frame_shift=FBANK_FRAME_SHIFT_MS,
        )
    return fbank.sub_(FBANK_MEAN).div_(2 * FBANK_STD)


class _PositionalConv(nn.Module):
    """Grouped conv over the sequence with weight normalisation (norm over all but the kernel axis), + GELU."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        # initial weights as published (std sqrt(4 / (kernel * dim)), g = |v|); loading replaces them
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * math.sqrt(4 / (kernel * dim)))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.groups = groups

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: (batch, tokens, dim) -> (batch, tokens, dim)."""
        kernel = self.weight_v.shape[-1]
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        out = F.conv1d(hidden.transpose(1, 2), weight, self.bias, padding=kernel // 2, groups=self.groups)
        if kernel % 2 == 0:
            out = out[..., :-1]  # an even kernel with padding k//2 yields one extra step
        return F.gelu(out).transpose(1, 2)


class _Attention(nn.Module):
    """Multi-head self-attention with a per-query gate on the relative position bias."""

    def __init__(self, config: BEATsConfig):
        super().__init__()
        dim, heads = config.encoder_embed_dim, config.encoder_attention_heads
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gated = config.gru_rel_pos
        if self.gated:
            self.grep_linear = nn.Linear(dim // heads, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def forward(self, hidden: torch.Tensor, position_bias: RelativePositionBias | None) -> torch.Tensor:
        """``hidden``: (batch, tokens, dim) -> (batch, tokens, dim); queries attended a block at a time."""
        batch, tokens, dim = hidden.shape

        def split(x):
            return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        query, key, value = split(self.q_proj(hidden)), split(self.k_proj(hidden)), split(self.v_proj(hidden))
        if position_bias is None:
            out = blockwise_attention(query, key, value, lambda first, last: None)
        else:
            # the gate reads the (unscaled) projected query of each head
            gate = position_gate(query, self.grep_linear, self.grep_a) if self.gated else None

            def bias_rows(first: int, last: int) -> torch.Tensor:
                bias = position_bias.rows(first, last)[None]
                return bias if gate is None else gate[:, :, first:last] * bias

            out = blockwise_attention(query, key, value, bias_rows)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _Layer(nn.Module):
    def __init__(self, config: BEATsConfig):
        super().__init__()
        dim = config.encoder_embed_dim
        self.self_attn = _Attention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[config.activation_fn]
        self.pre_norm = config.layer_norm_first
        # deep norm (DeepNet, arXiv 2203.00555): residual scaled by (2 * layers) ** 1/4
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0

    def forward(self, hidden: torch.Tensor, position_bias: RelativePositionBias | None) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), position_bias)
            return hidden + self.fc2(self.activation(self.fc1(self.final_layer_norm(hidden))))
        hidden = self.self_attn_layer_norm(hidden * self.residual_scale + self.self_attn(hidden, position_bias))
        return self.final_layer_norm(hidden * self.residual_scale + self.fc2(self.activation(self.fc1(hidden))))


class _Encoder(nn.Module):
    def __init__(self, config: BEATsConfig):
        super().__init__()
        dim = config.encoder_embed_dim
        self.config = config
        self.pos_conv = _PositionalConv(dim, config.conv_pos, config.conv_pos_groups)
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.encoder_layers))
        if config.relative_position_embedding:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.encoder_attention_heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.pos_conv(hidden)
        if not self.config.layer_norm_first:
            hidden = self.layer_norm(hidden)
        position_bias = None
        if self.config.relative_position_embedding:
            position_bias = RelativePositionBias(
                self.relative_attention_bias, hidden.shape[1], self.config.max_distance
            )
        for layer in self.layers:
            hidden = layer(hidden, position_bias)
        return self.layer_norm(hidden) if self.config.layer_norm_first else hidden


class BEATsModel(nn.Module):
    """BEATs encoder: normalised fbank ``(batch, frames, 128)`` -> patch embeddings ``(batch, patches, dim)``."""

    def __init__(self, config: BEATsConfig):
        super().__init__()
        self.config = config
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.encoder = _Encoder(config)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(fbank[:, None])  # (batch, embed, time patches, frequency patches)
        tokens = self.layer_norm(patches.flatten(2).transpose(1, 2))  # time-patch major
        if self.post_extract_proj is not None:
            tokens = self.post_extract_proj(tokens)
        return self.encoder(tokens)


def beats_state_dict_from_unilm(state_dict: dict[str, torch.Tensor], config: BEATsConfig, where: str) -> dict:
    """Map the checkpoint's keys to :class:`BEATsModel` (one shared position-bias table, classifier dropped)."""
    renamed, tables = {}, []
    for key, tensor in state_dict.items():
        if key.startswith(_PREDICTOR_PREFIX):
            continue
        if key.endswith("self_attn.relative_attention_bias.weight"):
            tables.append((key, tensor))
            continue
        renamed[key.replace("encoder.pos_conv.0.", "encoder.pos_conv.")] = tensor
    if config.relative_position_embedding:
        if not tables:
            raise CheckpointError(f"{_WHAT}: {where} has no relative position bias table")
        first_key, table = tables[0]
        differing = [key for key, other in tables[1:] if not torch.equal(other, table)]
        if differing:
            raise CheckpointError(
                f"{_WHAT}: {where}: the relative position bias is shared by all layers in BEATs, but "
                f"{differing[:3]} differ from {first_key}"
            )
        renamed["encoder.relative_attention_bias.weight"] = table
    return renamed


def beats_state_dict_to_unilm(state_dict: dict[str, torch.Tensor], config: BEATsConfig) -> dict:
    """Inverse of :func:`beats_state_dict_from_unilm` (without the classifier): the shared position-bias table
    under every layer's key, as the released checkpoints store it."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key == "encoder.relative_attention_bias.weight":
            for layer in range(config.encoder_layers):
                renamed[f"encoder.layers.{layer}.self_attn.relative_attention_bias.weight"] = tensor
        else:
            renamed[key.replace("encoder.pos_conv.", "encoder.pos_conv.0.")] = tensor
    return renamed


class BEATsEncoder(AudioEncoder):
    """:class:`BEATsModel` as an :class:`AudioEncoder`: waveform -> fbank -> tokens (8 per 160 ms for 16x16 patches)."""

    name = "beats"

    def __init__(self, model: BEATsModel, identity: str):
        self.module = model.eval()
        self.identity = identity
        self.config = model.config
        self.dim = model.config.encoder_embed_dim
        self.alignment = model.config.input_patch_size * _FRAME_SHIFT_SAMPLES  # one time patch: 2560 samples

    @property
    def min_samples(self) -> int:
        """Shortest input that yields one row of patches."""
        return _FRAME_LENGTH_SAMPLES + (self.config.input_patch_size - 1) * _FRAME_SHIFT_SAMPLES

    def sequence_length(self, num_samples: int) -> int:
        frames = (
            0
            if num_samples < _FRAME_LENGTH_SAMPLES
            else 1 + (num_samples - _FRAME_LENGTH_SAMPLES) // _FRAME_SHIFT_SAMPLES
        )
        return self.config.frequency_patches * (frames // self.config.input_patch_size)

    def first_index_at(self, sample: int) -> int:
        return self.config.frequency_patches * -(-sample // self.alignment)

    @torch.inference_mode()
    def encode_window(self, waveform: torch.Tensor, start: int, statistics: object) -> torch.Tensor:
        fbank = beats_fbank(waveform)
        if fbank.shape[0] < self.config.input_patch_size:
            return torch.zeros(0, self.dim)
        return self.module(fbank[None].to(self.device, self.dtype))[0].float().cpu()


def build_beats(cfg: dict, identity: str = "random") -> BEATsEncoder:
    """A BEATs encoder with random weights from a ``cfg`` dict (benchmarks and tests)."""
    return BEATsEncoder(BEATsModel(BEATsConfig.from_cfg(cfg)), identity)


def load_beats(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BEATsEncoder:
    """Load BEATs from the original ``.pt`` (or a safetensors copy, see :mod:`keyface.audio.weights`)."""
    checkpoint = read_unilm_checkpoint(path, _WHAT, BEATS_ORIGIN)
    config = BEATsConfig.from_cfg(checkpoint.cfg, str(checkpoint.path))
    with torch.device("meta"):
        model = BEATsModel(config)
    state_dict = beats_state_dict_from_unilm(checkpoint.state_dict, config, str(checkpoint.path))
    try:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{_WHAT}: {checkpoint.path} does not match its own cfg ({brief(error)})") from error
    return BEATsEncoder(model, file_identity(checkpoint.path)).to(device, dtype)
