"""Long audio in flat memory: streamed decode and resampling, block-written memory-mapped features, the
streamed AAC mux (keyface.audio.io.AudioFileStream / ResampleStream, keyface.audio.cache.FeatureFiles,
keyface.video.StreamedAudioTrack)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio.functional

from keyface.audio import AudioFeatureExtractor, FeatureCache, WindowConfig
from keyface.audio.io import (
    AudioFileStream,
    ResampleStream,
    encoder_waveform_blocks,
    load_audio,
    to_encoder_waveform,
)
from keyface.media import probe_media, samples_for_frames
from tests.test_audio_features import tiny_encoders

RATE = 44_100


def write_stereo_wav(path: Path, seconds: float, rate: int = RATE, seed: int = 0) -> Path:
    """Noise with a slow envelope, two different channels, 16-bit PCM."""
    samples = round(seconds * rate)
    generator = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(np.arange(samples) / 3000.0)
    left = 0.3 * envelope * generator.standard_normal(samples)
    stereo = np.stack([left, 0.5 * left[::-1]], axis=1)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.clip(stereo, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_streamed_decode_equals_the_whole_file(tmp_path):
    path = write_stereo_wav(tmp_path / "long.wav", 23.3)
    whole = load_audio(path)
    stream = AudioFileStream(path)
    blocks = list(stream.blocks(block_seconds=3.0))
    assert len(blocks) >= 7 and all(block.shape[0] == 2 for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole.waveform.numpy())
    trimmed = list(AudioFileStream(path, start=4.5, duration=12.0).blocks(block_seconds=2.0))
    np.testing.assert_array_equal(np.concatenate(trimmed, axis=1), load_audio(path, 4.5, 12.0).waveform.numpy())

    for mode in ("default", "reference"):  # chunked 16 kHz waveform = the whole-clip one (3 resample chunks)
        expected = to_encoder_waveform(whole, mode)
        streamed = torch.cat(list(encoder_waveform_blocks(stream.blocks(block_seconds=3.0), RATE, mode)))
        assert streamed.shape == expected.shape
        assert float((streamed - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("orig, new", [(44_100, 16_000), (48_000, 16_000), (8_000, 16_000), (22_050, 48_000)])
def test_resampler_chunk_seams_change_no_sample(orig, new):
    signal = torch.from_numpy(np.random.default_rng(1).standard_normal((2, orig * 3 + 77)).astype(np.float32))
    expected = torchaudio.functional.resample(signal, orig, new)
    resampler = ResampleStream(orig, new, chunk_seconds=0.21)  # many seams
    pieces = [resampler.push(signal[:, start : start + 997]) for start in range(0, signal.shape[1], 997)]
    got = torch.cat([*pieces, resampler.finish()], dim=-1)
    assert sum(piece.shape[-1] > 0 for piece in pieces) >= 10
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-6


def test_streamed_features_are_memory_mapped_and_equal_the_in_memory_ones(tmp_path):
    path = write_stereo_wav(tmp_path / "speech.wav", 21.0)
    window = WindowConfig(window_seconds=8.0, context_seconds=2.0)  # windowed: several encoder windows
    encoders = tiny_encoders()
    cached = AudioFeatureExtractor(*encoders, cache=FeatureCache(tmp_path / "cache"), window=window)
    streamed = cached.extract(path)
    in_memory = AudioFeatureExtractor(*encoders, cache=None, window=window).extract(load_audio(path))
    assert streamed.num_frames == in_memory.num_frames == 525
    torch.testing.assert_close(streamed.keyframe, in_memory.keyframe, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.interpolation, in_memory.interpolation, atol=1e-5, rtol=0)
    assert float(streamed.keyframe.abs().amax(dim=(0, 1)).min()) > 0  # every column written

    stored = np.load(streamed.cache_path / "keyframe.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.shape == tuple(streamed.keyframe.shape)
    np.testing.assert_array_equal(stored[100:140], streamed.keyframe[100:140].numpy())
    assert [entry.name for entry, _, _ in FeatureCache(tmp_path / "cache").entries()] == [streamed.cache_path.name]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the staged 16 kHz waveform is gone
    again = cached.extract(load_audio(path))  # the clip path hashes to the same entry (within rounding: same key)
    assert again.cache_path == streamed.cache_path


MUX_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from keyface.video import Mp4Writer, StreamedAudioTrack
    track = StreamedAudioTrack(sys.argv[1])
    frames = int(sys.argv[3])
    frame = np.zeros((16, 16, 3), np.uint8)
    with Mp4Writer(sys.argv[2], audio=track, preset="ultrafast") as writer:
        for _ in range(frames):
            writer.write(frame)
    # VmHWM: this process's own peak (ru_maxrss would also count the forking parent's memory, kept across exec)
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from /proc (Linux)")
def test_mux_of_a_long_track_holds_bounded_memory(tmp_path):
    peaks = {}
    for seconds in (20, 120):
        source = write_stereo_wav(tmp_path / f"{seconds}s.wav", seconds)
        out = tmp_path / f"{seconds}s.mp4"
        frames = seconds * 25
        result = subprocess.run(
            [sys.executable, "-c", MUX_SCRIPT, str(source), str(out), str(frames)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        peaks[seconds] = int(result.stdout.split()[-1]) / 1024
        info = probe_media(out)
        assert info.video.num_frames == frames
        assert (info.audio.sample_rate, info.audio.channels) == (RATE, 2)
        back = load_audio(out)  # the container's stated end: exactly the frames' samples
        assert back.num_samples == samples_for_frames(frames, RATE)
        original = load_audio(source).waveform[:, : back.num_samples]
        correlation = np.corrcoef(back.waveform[0, 44_100:88_200], original[0, 44_100:88_200])[0, 1]
        assert correlation > 0.6  # the source's own samples (AAC of noise), not silence or a shift
    growth = peaks[120] - peaks[20]
    print(f"mux peak RSS: 20 s {peaks[20]:.1f} MB, 120 s {peaks[120]:.1f} MB, growth {growth:.1f} MB")
    # holding the track whole (float32 stereo: 42 MB at 120 s, 35 MB more than at 20 s) would show here
    assert growth < 20, peaks
