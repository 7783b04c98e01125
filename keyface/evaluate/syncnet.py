"""Lip-sync confidence: SyncNet (Chung & Zisserman, ACCV 2016 workshops), the ``syncnet_v2`` network, here.

Two branches map 0.2 s of video and of audio into one 1024-d space where in-sync pairs lie close:

* audio (``netcnnaud`` + ``netfcaud``): MFCC ``(B, 1, 13, 20)`` (20 MFCC windows = 5 video frames) through
  2-D convolutions (64, 192, 384, 256, 256, 512 channels) to ``(B, 512)``, then 512 -> 512 -> 1024;
* video (``netcnnlip`` + ``netfclip``): five 224 x 224 RGB face crops ``(B, 3, 5, 224, 224)``, pixel values
  0-255, through 3-D convolutions (96, 256, 256, 256, 256, 512 channels; the first spans the 5 frames) to
  ``(B, 512)``, then 512 -> 512 -> 1024.

LSE-D / LSE-C (the metrics of Prajwal et al. 2020, computed the way syncnet_python does): for every video
frame the distances between its video feature and the audio features at offsets ``-15 .. +15`` frames;
averaged over a window, ``LSE-D`` is the smallest mean distance, the ``offset`` is where it lies, and
``LSE-C`` is the median minus the minimum (how clearly one offset wins).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .signals import MFCC_PER_FRAME
from .weights import SYNCNET_WEIGHTS, load_network

SYNCNET_FRAMES = 5  # video frames per SyncNet input
SYNCNET_MFCC = SYNCNET_FRAMES * MFCC_PER_FRAME  # 20 MFCC windows
DEFAULT_MAX_OFFSET = 15  # frames searched on each side
WINDOW_BATCH = 16  # 5-frame video windows per network call


@dataclass(frozen=True)
class SyncNetConfig:
    """Branch widths; the default is syncnet_v2. Tests use narrower stand-ins of the same layout."""

    audio_channels: tuple[int, ...] = (64, 192, 384, 256, 256, 512)
    video_channels: tuple[int, ...] = (96, 256, 256, 256, 256, 512)
    hidden: int = 512
    embedding: int = 1024

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SyncNetConfig:
        audio = tuple(int(state[f"netcnnaud.{i}.weight"].shape[0]) for i in (0, 4, 8, 11, 14, 18))
        video = tuple(int(state[f"netcnnlip.{i}.weight"].shape[0]) for i in (0, 4, 8, 11, 14, 18))
        return cls(audio, video, int(state["netfcaud.0.weight"].shape[0]), int(state["netfcaud.3.weight"].shape[0]))


def _unit(conv: nn.Module, channels: int, norm: type[nn.Module]) -> list[nn.Module]:
    return [conv, norm(channels), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """syncnet_v2: ``audio_features(B, 1, 13, 20)`` and ``video_features(B, 3, 5, 224, 224)`` -> ``(B, 1024)``."""

    def __init__(self, config: SyncNetConfig = SyncNetConfig()) -> None:
        super().__init__()
        a, v = config.audio_channels, config.video_channels
        self.netcnnaud = nn.Sequential(
            *_unit(nn.Conv2d(1, a[0], 3, padding=1), a[0], nn.BatchNorm2d),
            nn.MaxPool2d(1, 1),
            *_unit(nn.Conv2d(a[0], a[1], 3, padding=1), a[1], nn.BatchNorm2d),
            nn.MaxPool2d(3, (1, 2)),
            *_unit(nn.Conv2d(a[1], a[2], 3, padding=1), a[2], nn.BatchNorm2d),
            *_unit(nn.Conv2d(a[2], a[3], 3, padding=1), a[3], nn.BatchNorm2d),
            *_unit(nn.Conv2d(a[3], a[4], 3, padding=1), a[4], nn.BatchNorm2d),
            nn.MaxPool2d(3, 2),
            *_unit(nn.Conv2d(a[4], a[5], (5, 4)), a[5], nn.BatchNorm2d),
        )
        self.netfcaud = self._head(a[5], config)
        self.netcnnlip = nn.Sequential(
            *_unit(nn.Conv3d(3, v[0], (5, 7, 7), (1, 2, 2)), v[0], nn.BatchNorm3d),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_unit(nn.Conv3d(v[0], v[1], (1, 5, 5), (1, 2, 2), (0, 1, 1)), v[1], nn.BatchNorm3d),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_unit(nn.Conv3d(v[1], v[2], (1, 3, 3), padding=(0, 1, 1)), v[2], nn.BatchNorm3d),
            *_unit(nn.Conv3d(v[2], v[3], (1, 3, 3), padding=(0, 1, 1)), v[3], nn.BatchNorm3d),
            *_unit(nn.Conv3d(v[3], v[4], (1, 3, 3), padding=(0, 1, 1)), v[4], nn.BatchNorm3d),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_unit(nn.Conv3d(v[4], v[5], (1, 6, 6)), v[5], nn.BatchNorm3d),
        )
        self.netfclip = self._head(v[5], config)

    @staticmethod
    def _head(channels: int, config: SyncNetConfig) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(channels, config.hidden),
            nn.BatchNorm1d(config.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden, config.embedding),
        )

    def audio_features(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def video_features(self, crops: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(crops).flatten(1))


@dataclass(frozen=True)
class SyncScore:
    """SyncNet's verdict on a span of frames: ``offset`` in frames (> 0: audio late), LSE-D, LSE-C."""

    start_frame: int
    num_frames: int
    offset: int
    lse_d: float
    lse_c: float


def sync_score(distances: np.ndarray, start_frame: int, max_offset: int) -> SyncScore:
    """LSE-D / LSE-C / offset from per-frame distances ``(frames, 2 * max_offset + 1)`` (module doc)."""
    mean = distances.mean(axis=0)
    best = int(np.argmin(mean))
    return SyncScore(
        start_frame, len(distances), best - max_offset, float(mean[best]), float(np.median(mean) - mean[best])
    )


class SyncScorer:
    """Scores spans of video frames against the whole audio's MFCC with a loaded :class:`SyncNet`."""

    def __init__(self, network: SyncNet, device: str | torch.device = "cpu") -> None:
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> SyncScorer:
        """Load ``syncnet_v2.model`` (or ``syncnet_v2.safetensors``) from the evaluation weights folder."""
        return cls(load_network(SYNCNET_WEIGHTS, folder, SyncNetConfig.from_state_dict, SyncNet), device)

    @torch.no_grad()
    def audio_features(self, mfcc: np.ndarray, frames: range) -> np.ndarray:
        """Audio features of the 5-frame windows starting at each frame in ``frames``; windows past either end
        of the audio are zero MFCC. ``mfcc`` ``(13, windows)`` -> ``(len(frames), embedding)``."""
        count = mfcc.shape[1]
        windows = []
        for frame in frames:
            start = frame * MFCC_PER_FRAME
            piece = np.zeros((mfcc.shape[0], SYNCNET_MFCC), np.float32)
            lo, hi = max(start, 0), min(start + SYNCNET_MFCC, count)
            if hi > lo:
                piece[:, lo - start : hi - start] = mfcc[:, lo:hi]
            windows.append(piece)
        batch = torch.from_numpy(np.stack(windows))[:, None].to(self.device)
        return self.network.audio_features(batch).float().cpu().numpy()

    @torch.no_grad()
    def video_features(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops ``(frames, 224, 224, 3)`` -> features of each 5-frame window ``(frames - 4, embedding)``.

        Windows go through the network ``WINDOW_BATCH`` at a time (each is a 3 MB float copy of 5 frames)."""
        clip = torch.from_numpy(crops).to(self.device).permute(3, 0, 1, 2).float()  # (3, frames, 224, 224), 0-255
        starts = range(len(crops) - SYNCNET_FRAMES + 1)
        features = []
        for first in range(0, len(starts), WINDOW_BATCH):
            batch = [clip[:, i : i + SYNCNET_FRAMES] for i in starts[first : first + WINDOW_BATCH]]
            features.append(self.network.video_features(torch.stack(batch)).float().cpu())
        return torch.cat(features).numpy()

    def score(self, crops: np.ndarray, start_frame: int, mfcc: np.ndarray, max_offset: int) -> SyncScore:
        """Score ``crops`` (consecutive frames from ``start_frame``) at offsets ``±max_offset``."""
        video = self.video_features(crops)
        frames = range(start_frame - max_offset, start_frame + len(video) + max_offset)
        audio = self.audio_features(mfcc, frames)
        distances = np.stack(
            [np.linalg.norm(video[i] - audio[i : i + 2 * max_offset + 1], axis=1) for i in range(len(video))]
        )
        return sync_score(distances, start_frame, max_offset)
