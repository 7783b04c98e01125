"""Writes the sample inputs the example workflows name, ``workflows/inputs/``: a drawn portrait and a few seconds
of synthetic speech, both made here from numbers (no photo or recording of anyone), deterministically.

    python workflows/make_sample_inputs.py

``keyface_sample_portrait.png``: a 704 x 880 drawn head and shoulders that the pack's face detector (MTCNN,
``keyface.face``) finds with a score above 0.99; the face crop is over 512 px, so nothing is enlarged.
``keyface_sample_speech.wav``: 3.1 s, 16 kHz mono: voiced syllables (a glottal harmonic series shaped by vowel
formants, with a falling pitch contour), fricative and plosive noise bursts, pauses between words and phrases.
The long clip of the long-form example is made from this one when the pack installs the samples
(``nodes/samples.py``).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from build_workflows import SAMPLES as samples
from PIL import Image, ImageDraw, ImageFilter

# ------------------------------------------------------------------------------------------------ portrait

WIDTH, HEIGHT = 720, 800
# The drawing is laid out on a 576 x 640 design grid and scaled; the face crop (2.2 x the detected face) fits inside.
DESIGN_WIDTH, LEFT = 576, 32
SCALE = WIDTH / DESIGN_WIDTH
SUPERSAMPLING = 4  # drawn this many times larger, then reduced: smooth edges
SKIN, SHADE, DARK, HAIR = (226, 180, 150), (200, 150, 120), (150, 100, 80), (56, 36, 24)


def _points(*values: float) -> list[int]:
    """Design coordinates ``x0, y0, x1, y1, ...`` (x counted from ``LEFT``) -> supersampled canvas pixels."""
    return [round((v + LEFT * (i % 2 == 0)) * SCALE * SUPERSAMPLING) for i, v in enumerate(values)]


def _width(value: float) -> int:
    return round(value * SCALE * SUPERSAMPLING)


def _mask(draw, blur: float) -> np.ndarray:
    """``draw(ImageDraw)`` on a blank canvas, softened by ``blur`` design pixels: alpha (H, W, 1)."""
    mask = Image.new("L", (WIDTH * SUPERSAMPLING, HEIGHT * SUPERSAMPLING), 0)
    draw(ImageDraw.Draw(mask))
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur * SCALE * SUPERSAMPLING))
    return np.asarray(mask, dtype=np.float32)[..., None] / 255


def _paint(canvas: np.ndarray, mask: np.ndarray, color: tuple, opacity: float = 1.0) -> np.ndarray:
    return canvas * (1 - opacity * mask) + np.asarray(color, np.float32) * opacity * mask


def portrait() -> Image.Image:
    """Head and shoulders on a blue-grey gradient (design-grid coordinates: the face spans x 168-344, y 150-420)."""
    height, width = HEIGHT * SUPERSAMPLING, WIDTH * SUPERSAMPLING
    fade = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array([96, 122, 146], np.float32), np.array([38, 50, 64], np.float32)
    canvas = np.broadcast_to(top * (1 - fade) + bottom * fade, (height, width, 3)).copy()

    def paint(color, draw, blur=1.0, opacity=1.0):
        nonlocal canvas
        canvas = _paint(canvas, _mask(draw, blur), color, opacity)

    paint(SHADE, lambda d: d.rectangle(_points(212, 370, 300, 540), fill=255))  # neck
    paint((46, 72, 114), lambda d: d.ellipse(_points(70, 500, 442, 880), fill=255))  # shoulders
    paint(HAIR, lambda d: d.ellipse(_points(138, 104, 374, 400), fill=255))
    for left in (148, 328):  # ears
        paint(SHADE, lambda d, x=left: d.ellipse(_points(x, 250, x + 36, 322), fill=255))
    face = _mask(lambda d: d.ellipse(_points(168, 150, 344, 420), fill=255), 1)
    canvas = _paint(canvas, face, SKIN)
    inner = _mask(lambda d: d.ellipse(_points(186, 170, 326, 400), fill=255), 14)
    canvas = _paint(canvas, face * (1 - inner), DARK, 0.45)  # rounder: darker towards the sides and the jaw
    paint(HAIR, lambda d: d.chord(_points(160, 116, 352, 272), 180, 360, fill=255), blur=1.5)  # fringe
    for centre in (220, 292):  # eye sockets
        paint(DARK, lambda d, x=centre: d.ellipse(_points(x - 26, 246, x + 26, 286), fill=255), blur=7, opacity=0.35)
    for line in ((198, 244, 240, 236), (272, 236, 314, 244)):  # eyebrows
        paint((64, 42, 28), lambda d, p=line: d.line(_points(*p), fill=255, width=_width(8)))
    for x in (220, 292):
        paint((240, 238, 232), lambda d, x=x: d.ellipse(_points(x - 17, 256, x + 17, 277), fill=255), blur=0.8)
        paint((86, 60, 42), lambda d, x=x: d.ellipse(_points(x - 9, 257, x + 9, 276), fill=255), blur=0.6)
        paint((14, 10, 10), lambda d, x=x: d.ellipse(_points(x - 4, 262, x + 4, 271), fill=255), blur=0.4)
        paint(
            (60, 36, 30),
            lambda d, x=x: d.arc(_points(x - 18, 254, x + 18, 280), 190, 350, fill=255, width=_width(3)),
            0.5,
        )
    paint(DARK, lambda d: d.polygon(_points(252, 270, 240, 326, 258, 330), fill=255), blur=5, opacity=0.5)  # nose
    paint(SHADE, lambda d: d.ellipse(_points(238, 318, 274, 338), fill=255), blur=3, opacity=0.8)
    for x in (248, 264):  # nostrils
        paint((110, 62, 52), lambda d, x=x: d.ellipse(_points(x - 5, 328, x + 5, 335), fill=255), blur=1.5)
    paint((176, 84, 82), lambda d: d.chord(_points(224, 346, 288, 382), 0, 180, fill=255), blur=1.2)  # lower lip
    paint((166, 80, 80), lambda d: d.chord(_points(230, 352, 282, 366), 180, 360, fill=255), blur=1.2)  # upper lip
    paint((110, 40, 40), lambda d: d.line(_points(226, 362, 286, 362), fill=255, width=_width(3)), blur=0.8)
    pixels = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------------- speech

RATE = 16000
SEED = 7
VOWEL_FORMANTS = {  # F1, F2, F3 in Hz (adult speaker)
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (300, 2200, 2960),
    "o": (570, 840, 2410),
    "u": (320, 900, 2240),
}
FORMANT_BANDWIDTHS = (90, 110, 170)
# Onset consonants: noise band (Hz) and level of the fricatives and plosive bursts; nasals and liquids are voiced.
NOISE_ONSETS = {
    "s": (4000, 7800, 0.25, 0.09),
    "f": (1500, 7000, 0.12, 0.08),
    "h": (500, 3500, 0.08, 0.05),
    "t": (2500, 7000, 0.35, 0.025),
    "k": (1200, 4000, 0.35, 0.025),
    "p": (300, 2500, 0.30, 0.025),
}
PLOSIVES = {"t", "k", "p"}
VOICED_ONSETS = {"m": "u", "n": "u", "l": "e", "v": "e"}  # formants that stand in for the consonant
# Phrases of words; a syllable is (onset consonant, vowel). One phrase keeps the examples quick on a CPU.
PHRASES = [
    [[("h", "e"), ("l", "o")], [("", "a"), ("s", "i")], [("t", "a"), ("k", "i"), ("f", "e")]],
]


def _smooth(values: np.ndarray, milliseconds: float) -> np.ndarray:
    """Moving Hann-window average along axis 0 (the tracks glide from one sound to the next)."""
    size = int(milliseconds * RATE / 1000) | 1
    window = np.hanning(size)
    window /= window.sum()
    padded = np.pad(values, [(size // 2, size // 2)] + [(0, 0)] * (values.ndim - 1), mode="edge")
    columns = padded.reshape(len(padded), -1)
    smoothed = np.stack([np.convolve(column, window, mode="valid") for column in columns.T], axis=1)
    return smoothed.reshape(values.shape)


def _noise_band(rng: np.random.Generator, samples: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    frequencies = np.fft.rfftfreq(samples, 1 / RATE)
    spectrum[(frequencies < low) | (frequencies > high)] = 0
    band = np.fft.irfft(spectrum, samples)
    return band / (np.abs(band).max() + 1e-9)


def speech() -> np.ndarray:
    """Mono float samples in [-0.7, 0.7] at ``RATE``."""
    rng = np.random.default_rng(SEED)
    voiced_events, noise_events = [], []  # (start s, seconds, vowel, level, pitch offset Hz, stressed)
    time = 0.25
    for phrase in PHRASES:
        syllables = sum(len(word) for word in phrase)
        spoken = 0
        for word in phrase:
            for position, (onset, vowel) in enumerate(word):
                declination = 30 * (1 - 0.3 * spoken / syllables)  # pitch falls along the phrase
                if onset in NOISE_ONSETS:
                    if onset in PLOSIVES:
                        time += 0.05  # the closure before the burst
                    noise_events.append((time, onset))
                    time += 0.8 * NOISE_ONSETS[onset][3]  # the vowel starts as the noise fades
                elif onset in VOICED_ONSETS:
                    voiced_events.append((time, 0.07, VOICED_ONSETS[onset], 0.35, declination, position == 0))
                    time += 0.07
                seconds = rng.uniform(0.14, 0.22) * (1.25 if position == len(word) - 1 else 1.0)
                voiced_events.append((time, seconds, vowel, 1.0, declination, position == 0))
                time += seconds
                spoken += 1
            time += rng.uniform(0.08, 0.16)  # between words
        time += 0.45  # between phrases
    total = int((time + 0.2) * RATE)
    level = np.zeros(total)
    pitch = np.full(total, 118.0)
    formants = np.tile(np.asarray(VOWEL_FORMANTS["e"], float), (total, 1))
    noise = np.zeros(total)
    for start, seconds, vowel, loudness, declination, stressed in voiced_events:
        first, count = int(start * RATE), int(seconds * RATE)
        ramp = np.minimum(1, np.minimum(np.arange(count) / (0.03 * RATE), (count - np.arange(count)) / (0.05 * RATE)))
        level[first : first + count] = np.maximum(level[first : first + count], loudness * ramp)
        accent = (14 if stressed else 0) * np.sin(np.pi * np.arange(count) / count)
        pitch[first : first + count] = 105 + declination + accent
        formants[first : first + count] = VOWEL_FORMANTS[vowel]
    for start, onset in noise_events:
        low, high, loudness, seconds = NOISE_ONSETS[onset]
        first, count = int(start * RATE), int(seconds * RATE)
        noise[first : first + count] += _noise_band(rng, count, low, high) * loudness * np.hanning(count)
    formants, pitch, level = _smooth(formants, 40), _smooth(pitch, 30), _smooth(level, 10)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    harmonics = np.arange(1, 40)
    voiced = np.zeros(total)
    for first in range(0, total, 160):  # 10 ms blocks: harmonic amplitudes from the formant envelope
        block = slice(first, min(total, first + 160))
        if level[block].max() < 1e-4:
            continue
        frequencies = harmonics[None, :] * pitch[block, None]
        gains = np.zeros_like(frequencies)
        for index, bandwidth in enumerate(FORMANT_BANDWIDTHS):
            centre = formants[block, index : index + 1]
            gains += 0.8**index / np.sqrt(1 + ((frequencies - centre) / (bandwidth / 2)) ** 2)
        gains = np.where(frequencies > 5000, 0.0, gains / np.sqrt(harmonics))
        voiced[block] = (gains * np.sin(harmonics * phase[block, None])).sum(axis=1) * level[block]
    signal = 0.6 * voiced / np.abs(voiced).max() + noise + 0.002 * rng.standard_normal(total)
    return 0.7 * signal / np.abs(signal).max()


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(RATE)
        file.writeframes((samples * 32767).round().astype("<i2").tobytes())


def main() -> None:
    samples.SAMPLES_FOLDER.mkdir(exist_ok=True)
    portrait().save(samples.SAMPLES_FOLDER / samples.SAMPLE_PORTRAIT, optimize=True)
    write_wav(samples.SAMPLES_FOLDER / samples.SAMPLE_SPEECH, speech())
    for name in (samples.SAMPLE_PORTRAIT, samples.SAMPLE_SPEECH):
        print(f"wrote workflows/inputs/{name} ({(samples.SAMPLES_FOLDER / name).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
