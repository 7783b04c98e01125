"""68 face landmarks: FAN (Bulat & Tzimiropoulos, "How far are we from solving the 2D & 3D face alignment
problem?", ICCV 2017), implemented here from its published architecture, with the key layout of ibug's
``face_alignment`` release ``2dfan2.pth`` (the file auto_avsr's ``LandmarksDetector`` loads, hence LipScore's).

Layout (the released key names):

* stem: ``conv1`` (7x7, stride 2, with bias) + ``bn1`` + ReLU, ``conv2`` (:class:`ConvBlock` 64 -> 128),
  2x2 max-pool, ``conv3`` (128 -> 128), ``conv4`` (128 -> 256): ``(N, 3, 256, 256) -> (N, 256, 64, 64)``;
* ``m{i}`` (2 in the release): :class:`HourGlass` of depth 4 (``b1_{level}`` the skip branch, ``b2_{level}``
  after a 2x2 max-pool, ``b2_plus_1`` at the bottom, ``b3_{level}`` before nearest 2x upsampling);
* per hourglass ``top_m_{i}`` (ConvBlock), ``conv_last{i}`` (1x1) + ``bn_end{i}`` + ReLU, ``l{i}`` (1x1 to the
  68 heatmaps) and, between hourglasses, ``bl{i}`` (1x1) and ``al{i}`` (1x1 from the heatmaps) added to the
  next hourglass' input. The last hourglass' heatmaps ``(N, 68, 64, 64)`` are the output.

Input: the face crop of :func:`face_crop_box` resized to 256 x 256, RGB in [0, 1]. Heatmaps are decoded by
:func:`decode_heatmaps` (centroid around the peak, ibug's decoder) and mapped back to frame pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from .weights import EvalWeights, load_network

FAN_WEIGHTS = EvalWeights(
    file="2dfan2.pth",
    what="FAN 68-point face landmarks (ibug 2dfan2)",
    origin=(
        "it comes from ibug's face_alignment (hhj1897/face_alignment, ibug/face_alignment/fan/weights/2dfan2.pth, "
        "a Git LFS file), the landmark model auto_avsr's preparation code uses"
    ),
)
FAN_INPUT_SIZE = 256
# ibug's crop: a square of the face box's mean side / 0.55, on the box centre.
FAN_CROP_RATIO = 0.55
# ibug's decoder: heatmap values within 0.1 * sqrt(H * W) of the peak, clamped at 0, to the power 1.
HEATMAP_RADIUS, HEATMAP_GAMMA = 0.1, 1.0


@dataclass(frozen=True)
class FanConfig:
    """Network size; the default is the released 2dfan2 (two hourglasses of depth 4, 256 features)."""

    modules: int = 2
    features: int = 256
    depth: int = 4
    landmarks: int = 68
    stem: int = 64  # conv1's width
    stem_features: int = 128  # conv2 and conv3's width
    stem_kernel: int = 7

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> FanConfig:
        """The size a state dict was saved from (all of it is in the key names and shapes)."""
        hourglasses = {key.split(".")[0] for key in state if key.startswith("m") and key.split(".")[0][1:].isdigit()}
        modules = 1 + max(int(name[1:]) for name in hourglasses)
        depth = max(int(key.split(".")[1][3:]) for key in state if key.startswith("m0.b1_"))
        return cls(
            modules=modules,
            features=int(state["conv_last0.weight"].shape[0]),
            depth=depth,
            landmarks=int(state["l0.weight"].shape[0]),
            stem=int(state["conv1.weight"].shape[0]),
            stem_features=int(state["conv3.conv1.weight"].shape[1]),
            stem_kernel=int(state["conv1.weight"].shape[-1]),
        )


def _conv3x3(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, 1, 1, bias=False)


class ConvBlock(nn.Module):
    """FAN's hierarchical, parallel, multi-scale residual block: three pre-activated 3x3 convolutions of
    ``out/2``, ``out/4`` and ``out/4`` channels, concatenated, plus the (1x1-projected) input.
    ``(N, C_in, H, W) -> (N, C_out, H, W)``."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        half, quarter = channels_out // 2, channels_out // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(channels_in), _conv3x3(channels_in, half)
        self.bn2, self.conv2 = nn.BatchNorm2d(half), _conv3x3(half, quarter)
        self.bn3, self.conv3 = nn.BatchNorm2d(quarter), _conv3x3(quarter, quarter)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(channels_in), nn.ReLU(), nn.Conv2d(channels_in, channels_out, 1, bias=False))
            if channels_in != channels_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv1(functional.relu(self.bn1(x)))
        second = self.conv2(functional.relu(self.bn2(first)))
        third = self.conv3(functional.relu(self.bn3(second)))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat((first, second, third), 1) + skip


class HourGlass(nn.Module):
    """``depth`` nested levels, each ``b1`` (full size) + upsampled ``b3(inner(b2(max_pool(x))))``:
    ``(N, F, H, W) -> (N, F, H, W)`` (H and W divisible by ``2 ** depth``)."""

    def __init__(self, features: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        low = getattr(self, f"b2_{level}")(functional.max_pool2d(x, 2))
        low = self._level(level - 1, low) if level > 1 else self.b2_plus_1(low)
        low = getattr(self, f"b3_{level}")(low)
        return getattr(self, f"b1_{level}")(x) + functional.interpolate(low, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class Fan(nn.Module):
    """``(N, 3, 256, 256)`` RGB face crops in [0, 1] -> heatmaps ``(N, landmarks, 64, 64)``."""

    def __init__(self, config: FanConfig = FanConfig()) -> None:
        super().__init__()
        self.config = config
        kernel, features = config.stem_kernel, config.features
        self.conv1 = nn.Conv2d(3, config.stem, kernel, 2, kernel // 2)
        self.bn1 = nn.BatchNorm2d(config.stem)
        self.conv2 = ConvBlock(config.stem, config.stem_features)
        self.conv3 = ConvBlock(config.stem_features, config.stem_features)
        self.conv4 = ConvBlock(config.stem_features, features)
        for i in range(config.modules):
            self.add_module(f"m{i}", HourGlass(features, config.depth))
            self.add_module(f"top_m_{i}", ConvBlock(features, features))
            self.add_module(f"conv_last{i}", nn.Conv2d(features, features, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(features))
            self.add_module(f"l{i}", nn.Conv2d(features, config.landmarks, 1))
            if i < config.modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(features, features, 1))
                self.add_module(f"al{i}", nn.Conv2d(config.landmarks, features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(functional.relu(self.bn1(self.conv1(x))))
        x = self.conv4(self.conv3(functional.max_pool2d(x, 2)))
        heatmaps = x
        for i in range(self.config.modules):
            features = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(x))
            features = functional.relu(getattr(self, f"bn_end{i}")(getattr(self, f"conv_last{i}")(features)))
            heatmaps = getattr(self, f"l{i}")(features)
            if i < self.config.modules - 1:
                x = x + getattr(self, f"bl{i}")(features) + getattr(self, f"al{i}")(heatmaps)
        return heatmaps


def decode_heatmaps(
    heatmaps: torch.Tensor, radius: float = HEATMAP_RADIUS, gamma: float = HEATMAP_GAMMA
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark positions ``(N, K, 2)`` (x, y in heatmap pixels, pixel centres at +0.5) and scores ``(N, K)``
    (each heatmap's maximum) of heatmaps ``(N, K, H, W)``.

    Each position is the centroid of the heatmap's non-negative values (to the power ``gamma``) within
    ``radius * sqrt(H * W)`` pixels of its peak: sub-pixel, and blind to a second blob elsewhere.
    """
    heatmaps = heatmaps.float()
    height, width = heatmaps.shape[-2:]
    flat = heatmaps.flatten(2)
    scores, peak = flat.max(dim=2)
    rows = torch.arange(height, dtype=torch.float32, device=heatmaps.device)
    columns = torch.arange(width, dtype=torch.float32, device=heatmaps.device)
    if radius**2 * height * width < height**2 + width**2:  # the disc does not cover the whole map
        peak_row, peak_column = (peak // width).float(), (peak % width).float()
        distance_squared = (rows[:, None] - peak_row[..., None, None]) ** 2 + (
            columns[None, :] - peak_column[..., None, None]
        ) ** 2
        heatmaps = heatmaps * (distance_squared <= radius**2 * height * width)
    weights = heatmaps.clamp_min(0.0)
    if gamma != 1.0:
        weights = weights.pow(gamma)
    mass = weights.sum(dim=(2, 3)).clamp_min(torch.finfo(weights.dtype).eps)
    x = (weights.sum(dim=2) * (columns + 0.5)).sum(dim=2) / mass
    y = (weights.sum(dim=3) * (rows + 0.5)).sum(dim=2) / mass
    return torch.stack((x, y), dim=-1).cpu().numpy().astype(np.float64), scores.cpu().numpy()


def face_crop_box(box: np.ndarray) -> tuple[int, int, int, int]:
    """FAN's input square ``(left, top, right, bottom)`` (integer pixels, right / bottom exclusive) for a face
    box ``(x, y, width, height)``: side = the box's mean side / 0.55 (+ 1 px), on the box centre, as ibug's."""
    x, y, width, height = (float(v) for v in box)
    side = (width + height) / 2 / FAN_CROP_RATIO
    left, top = np.round(x + width / 2 - side / 2), np.round(y + height / 2 - side / 2)
    return int(left), int(top), int(np.round(left + side) + 1), int(np.round(top + side) + 1)


def _crop_padded(image: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """``image[top:bottom, left:right]`` as float32, zero where the square leaves the frame."""
    crop = np.zeros((bottom - top, right - left, image.shape[2]), np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, image.shape[1]), min(bottom, image.shape[0])
    if x1 > x0 and y1 > y0:
        crop[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return crop


class FaceLandmarker:
    """68 landmarks of the face in a given box, in frame pixels."""

    def __init__(self, network: Fan, device: str | torch.device = "cpu") -> None:
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> FaceLandmarker:
        """Load ``2dfan2.pth`` (or ``2dfan2.safetensors``) from the evaluation weights folder; its size is read
        from the file (a 2dfan4-sized file, or a test stand-in, loads the same way)."""
        return cls(load_network(FAN_WEIGHTS, folder, FanConfig.from_state_dict, Fan), device)

    @torch.no_grad()
    def landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """``(landmarks, 2)`` float64 (x, y) of the face in ``box`` (x, y, width, height) of a uint8 or float
        RGB frame ``(H, W, 3)`` (0-255)."""
        import cv2

        left, top, right, bottom = face_crop_box(box)
        crop = cv2.resize(_crop_padded(image, left, top, right, bottom), (FAN_INPUT_SIZE, FAN_INPUT_SIZE))
        batch = torch.from_numpy(crop).permute(2, 0, 1)[None].div(255.0).to(self.device)
        heatmaps = self.network(batch)
        points = decode_heatmaps(heatmaps)[0][0]
        scale = np.array([(right - left) / heatmaps.shape[3], (bottom - top) / heatmaps.shape[2]])
        return points * scale + np.array([left, top], np.float64)
