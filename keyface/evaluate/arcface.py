"""Identity embeddings: ArcFace's improved ResNet ("iresnet", Deng et al., CVPR 2019), implemented here.

Why ArcFace iresnet50: its weights (insightface's arcface_torch model zoo, ``backbone.pth``, a plain state
dict that ``torch.load(weights_only=True)`` reads) are a single file users can download; the network is
plain PyTorch (no compiled extension); it is aligned with exactly the five landmarks the pack's MTCNN
detector returns; and it is among the most accurate public face-verification networks.

Layout (the released key names): ``conv1`` 3x3 + ``bn1`` + ``prelu``; four stages ``layer1..4`` of
:class:`IBasicBlock` (BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a 1x1-conv + BN ``downsample``
on the first block of each stage, which halves the size); then ``bn2``, flatten, ``fc`` to the embedding
and ``features`` (BatchNorm1d). Input: 112 x 112 RGB in [-1, 1] aligned on the five-point template; output:
a 512-d embedding per face, compared by cosine similarity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .tracking import ARCFACE_SIZE
from .weights import ARCFACE_WEIGHTS, load_network

BN_EPS = 1e-5


@dataclass(frozen=True)
class ArcFaceConfig:
    """Network size. Default: iresnet50 (blocks 3, 4, 14, 3); iresnet100 is (3, 13, 30, 3)."""

    blocks: tuple[int, ...] = (3, 4, 14, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    embedding: int = 512

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ArcFaceConfig:
        """The size a state dict was saved from (number of blocks per stage, widths, embedding size)."""
        blocks = tuple(
            1 + max(int(key.split(".")[1]) for key in state if key.startswith(f"layer{stage}."))
            for stage in range(1, 5)
        )
        widths = tuple(int(state[f"layer{stage}.0.conv1.weight"].shape[0]) for stage in range(1, 5))
        return cls(blocks, widths, int(state["fc.weight"].shape[0]))


def _conv3x3(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-normalised residual block; ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels_in, eps=BN_EPS)
        self.conv1 = _conv3x3(channels_in, channels_out)
        self.bn2 = nn.BatchNorm2d(channels_out, eps=BN_EPS)
        self.prelu = nn.PReLU(channels_out)
        self.conv2 = _conv3x3(channels_out, channels_out, stride)
        self.bn3 = nn.BatchNorm2d(channels_out, eps=BN_EPS)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out, eps=BN_EPS)
            )
            if stride != 1 or channels_in != channels_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace backbone: ``(B, 3, 112, 112)`` in [-1, 1] -> ``(B, embedding)``."""

    def __init__(self, config: ArcFaceConfig = ArcFaceConfig()) -> None:
        super().__init__()
        self.config = config
        stem = config.widths[0]
        self.conv1 = _conv3x3(3, stem)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        self.prelu = nn.PReLU(stem)
        channels = stem
        for stage, (count, width) in enumerate(zip(config.blocks, config.widths, strict=True), start=1):
            blocks = [IBasicBlock(channels if i == 0 else width, width, 2 if i == 0 else 1) for i in range(count)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        side = ARCFACE_SIZE // 2 ** len(config.blocks)
        self.fc = nn.Linear(channels * side * side, config.embedding)
        self.features = nn.BatchNorm1d(config.embedding, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


class IdentityEmbedder:
    """Cosine-comparable identity embeddings of aligned 112 x 112 face crops."""

    def __init__(self, network: IResNet, device: str | torch.device = "cpu") -> None:
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> IdentityEmbedder:
        """Load ``arcface_r50.pth`` (or ``.safetensors``) from the evaluation weights folder; its size is read
        from the file, so iresnet100 (or a test stand-in) loads the same way."""
        return cls(load_network(ARCFACE_WEIGHTS, folder, ArcFaceConfig.from_state_dict, IResNet), device)

    @torch.no_grad()
    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """uint8 RGB crops ``(112, 112, 3)`` -> unit-length embeddings ``(n, embedding)``, float32."""
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        embeddings = self.network(batch.to(self.device)).float()
        return torch.nn.functional.normalize(embeddings, dim=1).cpu().numpy()
