"""The audio track of a written video is exactly as long as its frames (issue 12 item 5).

For each rate and frame count an mp4 is written and read back three ways: the container (stream duration:
the edit list and sample durations), PyAV/FFmpeg decoding (skips the AAC priming, decodes the last frame
whole: within one AAC frame, the excess silent) and ``load_audio`` (honours the stated end: exact).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from keyface.audio.io import load_audio
from keyface.constants import VIDEO_FPS
from keyface.media import probe_media, samples_for_frames
from keyface.video import AudioTrack, Mp4Writer

AAC_FRAME = 1024  # samples per AAC frame
RATES = (16_000, 44_100, 48_000)
FRAME_COUNTS = (1, 13, 50, 61)


def chirp(rate: int, seconds: float) -> np.ndarray:
    """A loud mono sweep (1, samples) that never falls silent, so padding is told apart from the signal."""
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (300 * t + 400 * t * t))).astype(np.float32)[None]


def write_video(path, rate: int, num_frames: int, audio_seconds: float) -> np.ndarray:
    """Write ``num_frames`` black 16x16 frames with ``audio_seconds`` of chirp at ``rate``; return the chirp."""
    waveform = chirp(rate, audio_seconds)
    with Mp4Writer(path, audio=AudioTrack(waveform, rate), preset="ultrafast") as writer:
        for _ in range(num_frames):
            writer.write(np.zeros((16, 16, 3), np.uint8))
    return waveform


def decode_with_pyav(path) -> np.ndarray:
    """Every decoded sample of the first audio stream, channel 0, float32."""
    with av.open(str(path)) as container:
        return np.concatenate([frame.to_ndarray()[0] for frame in container.decode(container.streams.audio[0])])


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("num_frames", FRAME_COUNTS)
def test_audio_ends_with_the_video(tmp_path, rate, num_frames):
    path = tmp_path / "clip.mp4"
    source = write_video(path, rate, num_frames, audio_seconds=num_frames / VIDEO_FPS + 0.5)  # longer: cut
    covered = num_frames * rate // VIDEO_FPS
    assert samples_for_frames(num_frames, rate) == covered

    info = probe_media(path)
    assert info.video.num_frames == num_frames
    assert info.audio.duration == pytest.approx(num_frames / VIDEO_FPS, abs=1e-9)  # the container is exact

    decoded = decode_with_pyav(path)
    assert abs(decoded.size / rate - num_frames / VIDEO_FPS) <= AAC_FRAME / rate
    assert covered <= decoded.size < covered + AAC_FRAME
    assert np.abs(decoded[covered:]).max(initial=0) < 0.05  # what FFmpeg adds is the encoder's silent padding
    # the priming is skipped: the decoded signal lines up with the source sample for sample
    middle = slice(covered // 4, covered * 3 // 4)
    assert np.corrcoef(decoded[middle], source[0, middle])[0, 1] > 0.95

    clip = load_audio(path)
    assert clip.num_samples == covered and clip.sample_rate == rate
    np.testing.assert_array_equal(clip.waveform[0].numpy(), decoded[:covered])


@pytest.mark.parametrize("rate", RATES)
def test_short_audio_is_padded_to_the_video_and_still_ends_with_it(tmp_path, rate):
    path = tmp_path / "short.mp4"
    write_video(path, rate, 50, audio_seconds=0.7)
    covered = samples_for_frames(50, rate)
    clip = load_audio(path)
    assert clip.num_samples == covered
    tail = clip.waveform[0, round(0.75 * rate) :].numpy()
    assert np.abs(tail).max() < 0.05  # silence after the audio ran out
    assert probe_media(path).audio.duration == pytest.approx(2.0, abs=1e-9)


def test_fractional_frame_rate_audio_counts_the_nearest_sample(tmp_path):
    """At 29.97 fps frames do not hold whole samples; the track still has round(frames / fps * rate)."""
    path = tmp_path / "ntsc.mp4"
    fps = Fraction(2997, 100)
    with Mp4Writer(path, fps=fps, audio=AudioTrack(chirp(44_100, 1.0), 44_100), preset="ultrafast") as writer:
        for _ in range(7):
            writer.write(np.zeros((16, 16, 3), np.uint8))
    expected = round(Fraction(7) / fps * 44_100)
    assert samples_for_frames(7, 44_100, fps) == expected == 10_300
    assert load_audio(path).num_samples == expected


def test_load_audio_keeps_the_tail_of_files_that_state_no_end(tmp_path):
    """A Matroska file states no end: load_audio keeps what FFmpeg decodes (within one AAC frame)."""
    path = tmp_path / "clip.mkv"
    write_video(path, 48_000, 13, audio_seconds=1.0)
    covered = samples_for_frames(13, 48_000)
    assert covered <= load_audio(path).num_samples < covered + AAC_FRAME
