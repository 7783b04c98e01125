"""WavLM and wav2vec2 as :class:`AudioEncoder`: a transformers model (conv feature extractor + transformer).

Both transformers classes (``WavLMModel``, ``Wav2Vec2Model``) share one layout: ``feature_extractor.conv_layers``,
``feature_projection``, ``encoder``; a window runs these three in turn, as the model's forward does in eval mode.

The conv feature extractor runs :data:`CONV_CHUNK_OUTPUTS` outputs at a time: each output depends only on its
receptive field, so chunks give the same values, while its activations (in one pass over a 60 s window of a
512-channel extractor, about 400 MB per layer output) shrink to a chunk's. The one clip-wide operation in it,
the group norm of the first conv layer (WavLM Base+, wav2vec2-base: each channel normalised over the whole
input), gets statistics of the whole clip from a first streaming pass (float64 sums; a single float32 pass
differs only by rounding), so every window and chunk sees the values of a single pass over the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .attention import use_blockwise_attention
from .encoders import STATISTICS_CHUNK_SAMPLES, AudioEncoder

CONV_CHUNK_OUTPUTS = 500  # conv feature-extractor outputs computed at once: 10 s of audio


@dataclass(frozen=True)
class WaveformNormalisation:
    """Zero-mean / unit-variance normalisation of the whole input clip before the encoder.

    Attributes:
        unbiased: variance with Bessel's correction (``torch.var`` default) or not (``layer_norm``).
        eps: added to the variance.
        valid_only: statistics over the real audio only, and the zero padding after it stays zero
            (wav2vec2 in the original: normalise, then pad); otherwise over the whole padded input.
    """

    unbiased: bool
    eps: float
    valid_only: bool


# docs/audio.md#wav2vec2: wav2vec2 input = (a - mean) / sqrt(var + 1e-7) over the clip (unbiased var), then zero
# padding.
WAV2VEC2_NORMALISATION = WaveformNormalisation(unbiased=True, eps=1e-7, valid_only=True)
# unilm WavLM cfg normalize=True (e.g. WavLM Large): F.layer_norm over the whole input (biased var, eps 1e-5).
WAVLM_LAYER_NORM = WaveformNormalisation(unbiased=False, eps=1e-5, valid_only=False)


@dataclass(frozen=True)
class _ClipStatistics:
    num_valid: int
    wave_mean: float = 0.0
    wave_scale: float = 1.0
    conv0_mean: torch.Tensor | None = None  # (channels,) per-channel mean of the first conv layer's output
    conv0_rstd: torch.Tensor | None = None  # (channels,) 1 / sqrt(var + eps)


class TransformersSpeechEncoder(AudioEncoder):
    """A ``WavLMModel`` or ``Wav2Vec2Model``; output = ``last_hidden_state``, one vector per 20 ms.

    Args:
        name: ``"wavlm"`` or ``"wav2vec2"``.
        model: the transformers model, in eval mode.
        identity: what identifies its weights (for the feature cache).
        normalisation: waveform normalisation over the clip, or ``None``.
    """

    def __init__(self, name: str, model: torch.nn.Module, identity: str, normalisation: WaveformNormalisation | None):
        config = model.config
        if getattr(config, "add_adapter", False):
            raise CheckpointError(f"{name}: models with an output adapter (add_adapter=True) are not supported")
        self.name = name
        if name == "wavlm":
            use_blockwise_attention(model)  # bounded memory per window; same numbers
        self.module = model.eval()
        self.identity = identity
        self.normalisation = normalisation
        self.dim = int(config.hidden_size)
        self._kernels = [int(k) for k in config.conv_kernel]
        self._strides = [int(s) for s in config.conv_stride]
        self.alignment = 1
        for stride in self._strides:
            self.alignment *= stride

    @property
    def min_samples(self) -> int:
        """Receptive field of one output vector (400 samples for the 320-stride stacks)."""
        field, step = 1, 1
        for kernel, stride in zip(self._kernels, self._strides, strict=True):
            field += (kernel - 1) * step
            step *= stride
        return field

    def sequence_length(self, num_samples: int) -> int:
        length = num_samples
        for kernel, stride in zip(self._kernels, self._strides, strict=True):
            if length < kernel:
                return 0
            length = (length - kernel) // stride + 1
        return length

    def first_index_at(self, sample: int) -> int:
        return -(-sample // self.alignment)

    def clip_statistics(self, waveform: torch.Tensor, num_valid: int) -> _ClipStatistics:
        statistics = _ClipStatistics(num_valid)
        if self.normalisation is not None:
            length = num_valid if self.normalisation.valid_only else int(waveform.shape[0])
            mean, variance = _moments(waveform, length, self.normalisation.unbiased)
            statistics = _ClipStatistics(num_valid, mean, 1.0 / math.sqrt(variance + self.normalisation.eps))
        if isinstance(self._first_norm, torch.nn.GroupNorm):
            mean, rstd = self._first_layer_statistics(waveform, statistics)
            statistics = _ClipStatistics(statistics.num_valid, statistics.wave_mean, statistics.wave_scale, mean, rstd)
        return statistics

    @torch.inference_mode()
    def encode_window(self, waveform: torch.Tensor, start: int, statistics: _ClipStatistics) -> torch.Tensor:
        x = self._normalised(waveform, start, statistics).to(self.device, self.dtype)
        hidden, _ = self.module.feature_projection(self._conv_features(x, statistics).transpose(1, 2))
        return self.module.encoder(hidden).last_hidden_state[0].float().cpu()

    def _conv_features(self, x: torch.Tensor, statistics: _ClipStatistics) -> torch.Tensor:
        """The conv feature extractor on ``x`` ``(samples,)`` -> ``(1, channels, sequence_length)``, computed
        :data:`CONV_CHUNK_OUTPUTS` outputs at a time (output ``k`` reads samples ``k * alignment`` on, over the
        receptive field ``min_samples``). A first-layer group norm applies the clip statistics as a per-channel
        scale and shift."""
        first, *rest = self.module.feature_extractor.conv_layers
        if statistics.conv0_mean is not None:
            norm = first.layer_norm
            rstd, mean = (value.to(x.device, x.dtype) for value in (statistics.conv0_rstd, statistics.conv0_mean))
            scale = (rstd * norm.weight)[None, :, None]
            shift = (norm.bias - mean * rstd * norm.weight)[None, :, None]
        total = self.sequence_length(int(x.shape[0]))
        chunks = []
        for first_output in range(0, total, CONV_CHUNK_OUTPUTS):
            last_output = min(total, first_output + CONV_CHUNK_OUTPUTS)
            piece = x[first_output * self.alignment : (last_output - 1) * self.alignment + self.min_samples]
            if statistics.conv0_mean is None:
                hidden = first(piece[None, None])
            else:
                hidden = first.activation(first.conv(piece[None, None]).mul_(scale).add_(shift))
            for layer in rest:
                hidden = layer(hidden)
            chunks.append(hidden)
        return torch.cat(chunks, dim=2)

    @property
    def _first_norm(self) -> torch.nn.Module | None:
        return getattr(self.module.feature_extractor.conv_layers[0], "layer_norm", None)

    def _normalised(self, waveform: torch.Tensor, start: int, statistics: _ClipStatistics) -> torch.Tensor:
        if self.normalisation is None:
            return waveform.float()
        x = (waveform.double() - statistics.wave_mean) * statistics.wave_scale
        if self.normalisation.valid_only:
            x[max(0, statistics.num_valid - start) :] = 0.0
        return x.float()

    @torch.inference_mode()
    def _first_layer_statistics(self, waveform: torch.Tensor, statistics: _ClipStatistics):
        """Per-group mean and 1/std of the first conv layer's output over the whole clip, in chunks."""
        first = self.module.feature_extractor.conv_layers[0]
        norm: torch.nn.GroupNorm = first.layer_norm
        kernel, stride = self._kernels[0], self._strides[0]
        total = 0 if waveform.shape[0] < kernel else (waveform.shape[0] - kernel) // stride + 1
        chunk_outputs = max(1, STATISTICS_CHUNK_SAMPLES // stride)
        sums = torch.zeros(norm.num_channels, dtype=torch.float64)
        squares = torch.zeros(norm.num_channels, dtype=torch.float64)
        for first_output in range(0, total, chunk_outputs):
            last_output = min(total, first_output + chunk_outputs)
            begin, end = first_output * stride, (last_output - 1) * stride + kernel
            x = self._normalised(waveform[begin:end], begin, statistics)[None, None].to(self.device, self.dtype)
            out = first.conv(x)[0]
            sums += out.sum(dim=1, dtype=torch.float64).cpu()
            squares += out.square().sum(dim=1, dtype=torch.float64).cpu()
        groups = norm.num_groups
        count = total * (norm.num_channels // groups)
        group_mean = sums.view(groups, -1).sum(dim=1) / count
        group_var = (squares.view(groups, -1).sum(dim=1) / count - group_mean**2).clamp_min(0.0)
        per_channel = norm.num_channels // groups
        mean = group_mean.repeat_interleave(per_channel)
        rstd = torch.rsqrt(group_var + norm.eps).repeat_interleave(per_channel)
        return mean.float(), rstd.float()


def _moments(waveform, length: int, unbiased: bool) -> tuple[float, float]:
    """Mean and variance of ``waveform[:length]`` (a tensor or a :class:`~keyface.audio.io.WaveformFile`), read
    in chunks of :data:`STATISTICS_CHUNK_SAMPLES`: two passes in float64 (the sum, then the squared deviations
    from the mean), so the result matches the whole-clip value to float64 rounding. Variance 0 for one sample."""
    chunks = [
        (begin, min(length, begin + STATISTICS_CHUNK_SAMPLES)) for begin in range(0, length, STATISTICS_CHUNK_SAMPLES)
    ]
    if length < 2:
        return (float(waveform[:length].double().sum()), 0.0)
    mean = sum(float(waveform[begin:end].double().sum()) for begin, end in chunks) / length
    squares = sum(float((waveform[begin:end].double() - mean).square().sum()) for begin, end in chunks)
    return mean, squares / (length - 1 if unbiased else length)
