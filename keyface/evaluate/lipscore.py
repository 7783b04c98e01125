"""LipScore (KeyFace paper, docs/evaluation.md#lipscore): how alike the lip movements of a generated and a real video
are, as seen by a lip-reading network: the mean over frames of the cosine similarity of the two videos' per-frame
features from the auto_avsr visual speech recognition (VSR) encoder.

The encoder, implemented here from its published description (Ma et al., "Auto-AVSR", ICASSP 2023; the
ESPnet conformer it builds on), with the released file's key names under ``encoder.``:

* ``frontend``: ``frontend3D`` (Conv3d 1 -> 64, kernel 5x7x7, stride 1x2x2, BatchNorm, Swish, max-pool
  1x3x3 stride 1x2x2) then a ResNet-18 ``trunk`` (BasicBlocks with Swish, ``layer1..4``, global average
  pool) applied to every frame: ``(B, 1, T, 88, 88) -> (B, T, 512)``;
* ``embed.0``: Linear 512 -> 768, times sqrt(768), and sinusoidal *relative* position encodings;
* ``encoders.N`` (12 in the release): conformer blocks - half feed-forward (macaron), relative-position
  multi-head self-attention (Transformer-XL style, learnt biases ``pos_bias_u`` / ``pos_bias_v``),
  convolution module (pointwise conv + GLU, depthwise conv kernel 31, BatchNorm, Swish, pointwise conv),
  half feed-forward (ReLU), final LayerNorm; every sub-block pre-normalised with a residual;
* ``after_norm``: LayerNorm; output ``(B, T, 768)``, one feature per video frame.

``VsrEncoderConfig.blocks`` can be smaller than the file's: the first blocks are loaded (reduced depth, for
speed or tests). Decoder and CTC tensors of the file are ignored.

Input: 96 x 96 RGB mouth squares (:mod:`keyface.evaluate.mouth`: the original's crop on 68 FAN landmarks
warped to auto_avsr's mean face, or a five-landmark approximation when its files are missing), then auto_avsr's
test transform (:func:`vsr_input`): ``/ 255``, the centre 88 x 88, grayscale (ITU-R 601 weights, as
torchvision's), ``(x - 0.421) / 0.165``.
The encoder runs over chunks of ``chunk_frames`` frames (attention within a chunk), so memory is bounded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .weights import EvalWeights, config_of, load_into, load_state_dict

VSR_WEIGHTS = EvalWeights(
    file="vsr_trlrs2lrs3vox2avsp_base_updated.pth",
    what="auto_avsr VSR model (LipScore)",
    origin="it comes from the auto_avsr release (mpc001/auto_avsr, model zoo: VSR, LRS3, vsr_trlrs2lrs3vox2avsp_base)",
)
ENCODER_PREFIX = "encoder."
LAYER_NORM_EPS = 1e-12  # ESPnet's LayerNorm
DEFAULT_CHUNK_FRAMES = 250  # 10 s per encoder call


@dataclass(frozen=True)
class VsrEncoderConfig:
    blocks: int = 12
    dim: int = 768
    heads: int = 12
    feed_forward: int = 3072
    kernel: int = 31
    stem: int = 64
    trunk_widths: tuple[int, ...] = (64, 128, 256, 512)
    trunk_blocks: tuple[int, ...] = (2, 2, 2, 2)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], max_blocks: int | None = None) -> VsrEncoderConfig:
        """The size of the encoder in ``state`` (keys without ``encoder.``), at most ``max_blocks`` blocks."""
        blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("encoders."))
        widths = tuple(int(state[f"frontend.trunk.layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
        trunk_blocks = tuple(
            1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"frontend.trunk.layer{i}."))
            for i in range(1, 5)
        )
        return cls(
            blocks=blocks if max_blocks is None else min(blocks, int(max_blocks)),
            dim=int(state["embed.0.weight"].shape[0]),
            heads=int(state["encoders.0.self_attn.pos_bias_u"].shape[0]),
            feed_forward=int(state["encoders.0.feed_forward.w_1.weight"].shape[0]),
            kernel=int(state["encoders.0.conv_module.depthwise_conv.weight"].shape[-1]),
            stem=int(state["frontend.frontend3D.0.weight"].shape[0]),
            trunk_widths=widths,
            trunk_blocks=trunk_blocks,
        )


class BasicBlock(nn.Module):
    """ResNet basic block with Swish: ``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.relu1 = nn.SiLU()
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu2 = nn.SiLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))
            if stride != 1 or channels_in != channels_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + (x if self.downsample is None else self.downsample(x)))


class Trunk(nn.Module):
    """ResNet-18 layout on each frame: ``(N, stem, H, W) -> (N, widths[-1])``."""

    def __init__(self, config: VsrEncoderConfig) -> None:
        super().__init__()
        channels = config.stem
        for stage, (count, width) in enumerate(zip(config.trunk_blocks, config.trunk_widths, strict=True), 1):
            stride = 1 if stage == 1 else 2
            blocks = [BasicBlock(channels if i == 0 else width, width, stride if i == 0 else 1) for i in range(count)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class Frontend(nn.Module):
    """``(B, 1, T, 88, 88)`` normalised gray mouth crops -> ``(B, T, trunk_widths[-1])``."""

    def __init__(self, config: VsrEncoderConfig) -> None:
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, config.stem, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
            nn.BatchNorm3d(config.stem),
            nn.SiLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )
        self.trunk = Trunk(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frontend3D(x)  # (B, C, T, H', W')
        batch, channels, frames = x.shape[:3]
        x = x.transpose(1, 2).reshape(batch * frames, channels, *x.shape[3:])
        return self.trunk(x).view(batch, frames, -1)


def relative_positions(frames: int, dim: int) -> torch.Tensor:
    """Sinusoidal encodings of the relative positions ``frames - 1, ..., 0, ..., -(frames - 1)``: ``(2T - 1, dim)``."""
    positions = torch.arange(frames - 1, -frames, -1, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    encoding = torch.zeros(2 * frames - 1, dim)
    encoding[:, 0::2] = torch.sin(positions * rates)
    encoding[:, 1::2] = torch.cos(positions * rates)
    return encoding


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions: ``(B, T, D) -> (B, T, D)``.

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos r(i - j)) / sqrt(d_head)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.linear_q, self.linear_k, self.linear_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim)  # (B, T, H, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        q, k, v = self._split(self.linear_q(x)), self._split(self.linear_k(x)), self._split(self.linear_v(x))
        p = self.linear_pos(positions).view(-1, self.heads, self.head_dim)  # (2T - 1, H, d)
        content = torch.einsum("bihd,bjhd->bhij", q + self.pos_bias_u, k)
        by_offset = torch.einsum("bihd,rhd->bhir", q + self.pos_bias_v, p)  # r indexes offsets T-1 ... -(T-1)
        i = torch.arange(frames)[:, None]
        j = torch.arange(frames)[None, :]
        index = (frames - 1 - i + j).expand(*by_offset.shape[:2], frames, frames)  # offset i - j
        position = torch.gather(by_offset, 3, index)
        weights = torch.softmax((content + position) / math.sqrt(self.head_dim), dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(x.shape)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Conformer convolution: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim)
        self.norm = nn.BatchNorm1d(dim)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = nn.functional.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, config: VsrEncoderConfig) -> None:
        super().__init__()
        dim = config.dim
        self.feed_forward_macaron = FeedForward(dim, config.feed_forward)
        self.self_attn = RelativeSelfAttention(dim, config.heads)
        self.conv_module = ConvolutionModule(dim, config.kernel)
        self.feed_forward = FeedForward(dim, config.feed_forward)
        for name in ("norm_ff_macaron", "norm_mha", "norm_conv", "norm_ff", "norm_final"):
            setattr(self, name, nn.LayerNorm(dim, eps=LAYER_NORM_EPS))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_macaron(self.norm_ff_macaron(x))
        x = x + self.self_attn(self.norm_mha(x), positions)
        x = x + self.conv_module(self.norm_conv(x))
        x = x + 0.5 * self.feed_forward(self.norm_ff(x))
        return self.norm_final(x)


class VsrEncoder(nn.Module):
    """auto_avsr's visual encoder: ``(B, 1, T, 88, 88)`` -> per-frame features ``(B, T, dim)``."""

    def __init__(self, config: VsrEncoderConfig = VsrEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.frontend = Frontend(config)
        self.embed = nn.Sequential(nn.Linear(config.trunk_widths[-1], config.dim))
        self.encoders = nn.ModuleList(ConformerBlock(config) for _ in range(config.blocks))
        self.after_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)

    def forward(self, mouths: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.frontend(mouths)) * math.sqrt(self.config.dim)
        positions = relative_positions(x.shape[1], self.config.dim).to(x)
        for block in self.encoders:
            x = block(x, positions)
        return self.after_norm(x)


def _encoder_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's ``encoder.*`` tensors without the prefix; ESPnet's spelling ``pointwise_cov`` (in some
    releases) read as ``pointwise_conv``."""
    return {
        key[len(ENCODER_PREFIX) :].replace(".pointwise_cov", ".pointwise_conv"): value
        for key, value in state.items()
        if key.startswith(ENCODER_PREFIX)
    }


def load_vsr_encoder(folder: str | os.PathLike, max_blocks: int | None = None) -> VsrEncoder:
    """The VSR encoder of ``vsr_trlrs2lrs3vox2avsp_base_updated.pth`` in ``folder``, its first ``max_blocks``
    conformer blocks when given (reduced depth)."""
    state = _encoder_tensors(load_state_dict(VSR_WEIGHTS, folder))
    config = config_of(lambda s: VsrEncoderConfig.from_state_dict(s, max_blocks), state, VSR_WEIGHTS, folder)
    kept = {
        key: value
        for key, value in state.items()
        if not key.startswith("encoders.") or int(key.split(".")[1]) < config.blocks
    }
    encoder = VsrEncoder(config)
    load_into(encoder, kept, VSR_WEIGHTS, folder)
    return encoder.eval()


# auto_avsr's VideoTransform("test"): centre crop, grayscale (torchvision's weights), normalisation.
VSR_INPUT_SIZE = 88
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)
VSR_PIXEL_MEAN, VSR_PIXEL_STD = 0.421, 0.165


def vsr_input(square: np.ndarray) -> np.ndarray:
    """A ``(96, 96, 3)`` RGB mouth square (0-255) -> the encoder's ``(88, 88)`` float32 input."""
    margin_y = int(round((square.shape[0] - VSR_INPUT_SIZE) / 2))
    margin_x = int(round((square.shape[1] - VSR_INPUT_SIZE) / 2))
    centre = np.asarray(square, np.float32)[margin_y : margin_y + VSR_INPUT_SIZE, margin_x : margin_x + VSR_INPUT_SIZE]
    gray = (centre / 255.0) @ GRAY_WEIGHTS
    return ((gray - VSR_PIXEL_MEAN) / VSR_PIXEL_STD).astype(np.float32)


class LipScorer:
    """Collects (generated, ground-truth) mouth-crop pairs frame by frame and scores them ``chunk_frames`` at a
    time: the cosine similarity of the two videos' encoder features, per frame."""

    def __init__(
        self, encoder: VsrEncoder, device: str | torch.device = "cpu", chunk_frames: int = DEFAULT_CHUNK_FRAMES
    ):
        self.encoder = encoder.eval().to(device)
        self.device = torch.device(device)
        self.chunk_frames = int(chunk_frames)
        self._frames: list[int] = []
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.scores: dict[int, float] = {}  # frame index -> similarity

    @torch.no_grad()
    def features(self, mouths: list[np.ndarray]) -> torch.Tensor:
        """``n`` crops ``(88, 88)`` -> ``(n, dim)``."""
        batch = torch.from_numpy(np.stack(mouths))[None, None].to(self.device)
        return self.encoder(batch)[0].float().cpu()

    def add(self, frame: int, generated: np.ndarray, real: np.ndarray) -> None:
        """One frame's ``(96, 96, 3)`` RGB mouth squares of the generated and the real video."""
        self._frames.append(frame)
        self._pairs.append((vsr_input(generated), vsr_input(real)))
        if len(self._pairs) == self.chunk_frames:
            self.flush()

    def flush(self) -> None:
        if not self._pairs:
            return
        generated = self.features([pair[0] for pair in self._pairs])
        real = self.features([pair[1] for pair in self._pairs])
        similarity = nn.functional.cosine_similarity(generated, real, dim=1).numpy()
        self.scores.update(zip(self._frames, similarity.tolist(), strict=True))
        self._frames.clear()
        self._pairs.clear()
