"""Signals over time that need no network: audio energy, MFCC, lagged correlation, per-second means, slopes.

Every per-frame signal here is a float array with one value per video frame (25 per second,
:data:`keyface.constants.VIDEO_FPS`); NaN marks a frame without a value (no face found).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import ENCODER_SAMPLE_RATE, SAMPLES_PER_FRAME, VIDEO_FPS

# MFCC settings of SyncNet's audio input (python_speech_features' defaults, which syncnet_python uses):
# 25 ms windows every 10 ms (100 per second: 4 per video frame), 26 mel bands, 13 coefficients.
MFCC_WINDOW, MFCC_STEP, MFCC_FFT = 400, 160, 512
MFCC_BANDS, MFCC_COEFFICIENTS, MFCC_LIFTER, MFCC_PREEMPHASIS = 26, 13, 22, 0.97
MFCC_PER_FRAME = SAMPLES_PER_FRAME // MFCC_STEP  # 4


def frame_energy(waveform: np.ndarray) -> np.ndarray:
    """Log RMS energy of each video frame's 640 samples of 16 kHz mono audio: ``(samples,)`` -> ``(frames,)``."""
    frames = len(waveform) // SAMPLES_PER_FRAME
    pieces = waveform[: frames * SAMPLES_PER_FRAME].reshape(frames, SAMPLES_PER_FRAME).astype(np.float64)
    return np.log(np.sqrt(np.mean(pieces**2, axis=1)) + 1e-4)


def _mel_filterbank() -> np.ndarray:
    """Triangular filters on the mel scale, ``(MFCC_BANDS, MFCC_FFT // 2 + 1)``."""

    def to_mel(hz):
        return 2595 * np.log10(1 + hz / 700.0)

    def to_hz(mel):
        return 700 * (10 ** (mel / 2595.0) - 1)

    edges = to_hz(np.linspace(0, to_mel(ENCODER_SAMPLE_RATE / 2), MFCC_BANDS + 2))
    bins = np.floor((MFCC_FFT + 1) * edges / ENCODER_SAMPLE_RATE).astype(int)
    bank = np.zeros((MFCC_BANDS, MFCC_FFT // 2 + 1))
    for band in range(MFCC_BANDS):
        low, centre, high = bins[band : band + 3]
        bank[band, low:centre] = (np.arange(low, centre) - low) / max(centre - low, 1)
        bank[band, centre:high] = (high - np.arange(centre, high)) / max(high - centre, 1)
    return bank


def mfcc(waveform: np.ndarray) -> np.ndarray:
    """MFCC of 16 kHz mono audio, ``(samples,)`` -> ``(13, windows)`` at 100 windows per second.

    Pre-emphasis, 25 ms windows every 10 ms (no taper), power spectrum, 26 mel bands, log, orthonormal DCT-II,
    sinusoidal lifter 22, and coefficient 0 replaced by the log window energy.
    """
    signal = np.append(waveform[:1], waveform[1:] - MFCC_PREEMPHASIS * waveform[:-1]).astype(np.float64)
    count = 1 + max(0, int(np.ceil((len(signal) - MFCC_WINDOW) / MFCC_STEP)))
    signal = np.pad(signal, (0, max(0, (count - 1) * MFCC_STEP + MFCC_WINDOW - len(signal))))
    index = np.arange(MFCC_WINDOW)[None, :] + MFCC_STEP * np.arange(count)[:, None]
    power = np.abs(np.fft.rfft(signal[index], MFCC_FFT)) ** 2 / MFCC_FFT
    energy = np.maximum(power.sum(axis=1), np.finfo(float).eps)
    bands = np.log(np.maximum(power @ _mel_filterbank().T, np.finfo(float).eps))
    k = np.arange(MFCC_BANDS)
    dct = np.cos(np.pi * np.arange(MFCC_COEFFICIENTS)[:, None] * (2 * k[None, :] + 1) / (2 * MFCC_BANDS))
    dct *= np.sqrt(2.0 / MFCC_BANDS)
    dct[0] /= np.sqrt(2.0)
    coefficients = bands @ dct.T
    coefficients *= 1 + (MFCC_LIFTER / 2) * np.sin(np.pi * np.arange(MFCC_COEFFICIENTS) / MFCC_LIFTER)
    coefficients[:, 0] = np.log(energy)
    return coefficients.T.astype(np.float32)


@dataclass(frozen=True)
class LaggedCorrelation:
    """Pearson correlation of two per-frame signals at the best lag within ``±max_lag`` frames.

    ``lag`` > 0: the second signal (audio) is late by that many frames relative to the first (mouth).
    """

    correlation: float
    lag: int
    correlations: tuple[float, ...]  # at lags -max_lag .. +max_lag


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan")
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    norm = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / norm) if norm > 0 else float("nan")


def lagged_correlation(mouth: np.ndarray, audio: np.ndarray, max_lag: int) -> LaggedCorrelation:
    """Correlate ``mouth[t]`` with ``audio[t + lag]`` for every lag in ``±max_lag``; keep the best."""
    length = min(len(mouth), len(audio))
    mouth, audio = mouth[:length], audio[:length]
    values = []
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            values.append(_pearson(mouth[: length - lag], audio[lag:]))
        else:
            values.append(_pearson(mouth[-lag:], audio[: length + lag]))
    scores = np.nan_to_num(np.array(values), nan=-np.inf)
    best = int(np.argmax(scores))
    return LaggedCorrelation(float(values[best]), best - max_lag, tuple(values))


def windowed_correlation(mouth: np.ndarray, audio: np.ndarray, window: int, max_lag: int) -> list[LaggedCorrelation]:
    """:func:`lagged_correlation` over consecutive windows of ``window`` frames (a last short one dropped)."""
    length = min(len(mouth), len(audio))
    return [
        lagged_correlation(mouth[start : start + window], audio[start : start + window], max_lag)
        for start in range(0, length - window + 1, window)
    ]


def per_period(values: np.ndarray, period_frames: int) -> np.ndarray:
    """Mean of the finite values in each ``period_frames`` span (the last one may be shorter; NaN if empty)."""
    means = []
    for start in range(0, len(values), period_frames):
        piece = values[start : start + period_frames]
        piece = piece[np.isfinite(piece)]
        means.append(float(piece.mean()) if len(piece) else float("nan"))
    return np.array(means)


def slope_per_minute(values: np.ndarray, fps: float = VIDEO_FPS) -> float:
    """Least-squares slope of a per-frame signal against time, in units per minute (NaN below 2 values)."""
    times = np.arange(len(values)) / fps / 60.0
    keep = np.isfinite(values)
    if keep.sum() < 2 or np.ptp(times[keep]) == 0:
        return float("nan")
    return float(np.polyfit(times[keep], values[keep], 1)[0])
