"""Long audio in flat memory: streamed decode and resampling, the 16 kHz encoder input read slice by slice with
chunked clip statistics, block-written memory-mapped features named by their cache entry in the job fingerprint,
the streamed AAC mux (keyface.audio.io.AudioFileStream / ResampleStream / WaveformFile, keyface.audio.cache,
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

from keyface.audio import AudioClip, AudioFeatureExtractor, FeatureCache, WindowConfig
from keyface.audio.cache import FEATURE_ARRAYS, entry_digest, entry_tensor
from keyface.audio.encoders import STATISTICS_CHUNK_SAMPLES
from keyface.audio.io import (
    AudioFileStream,
    ResampleStream,
    WaveformFile,
    encoder_waveform_blocks,
    load_audio,
    to_encoder_waveform,
)
from keyface.audio.speech_encoder import CONV_CHUNK_OUTPUTS, WaveformNormalisation
from keyface.audio.wav2vec2 import build_wav2vec2
from keyface.jobs import tensor_digest
from keyface.media import probe_media, samples_for_frames
from keyface.memory import activation_peak_bytes
from keyface.pipeline import Conditioning
from tests.test_audio_features import WAV2VEC2_TINY, CountingEncoder, speech_like, tiny_encoders

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


HEAP_SCRIPT = textwrap.dedent(
    """
    import torch
    from keyface.audio.encoders import release_free_heap

    def resident_mb():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024

    blocks = [torch.ones(16_384) for _ in range(1_000)]  # 64 kB each: below glibc's mmap threshold, in the heap
    top = blocks.pop()  # stays live above the others, so glibc cannot shrink the heap by itself
    del blocks
    before = resident_mb()
    release_free_heap()
    print(before, resident_mb())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_release_free_heap_hands_freed_heap_pages_back():
    result = subprocess.run(
        [sys.executable, "-c", HEAP_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    before, after = map(float, result.stdout.split())
    assert before - after > 40, (before, after)  # 62.4 MB of freed 64 kB blocks


def test_each_encoder_window_hands_its_freed_heap_back(monkeypatch):
    import keyface.audio.encoders

    encoders = tiny_encoders(seed=2)
    counters = [CountingEncoder(encoder) for encoder in encoders]
    trims = []
    monkeypatch.setattr(keyface.audio.encoders, "release_free_heap", lambda: trims.append(1))
    clip = AudioClip(speech_like(16_000 * 10, seed=3)[None], 16_000)
    AudioFeatureExtractor(*encoders, cache=None, window=WindowConfig(3.0, 1.0)).extract(clip)
    windows = sum(counter.calls for counter in counters)
    assert windows >= 3 * len(encoders)
    assert len(trims) == windows


@pytest.mark.parametrize("extractor", ["wavlm", "wav2vec2", "wav2vec2 layer norm"])
def test_the_conv_front_end_in_chunks_gives_the_models_own_output_with_a_fraction_of_its_memory(extractor):
    """A 60 s window (3,000 outputs, 6 chunks of CONV_CHUNK_OUTPUTS) and a 21.3 s one (a partial last chunk): the
    chunked window encoding equals the transformers model's own forward; the conv front-end's live tensors
    peak at a fraction of the single pass's (group norm: clip statistics; layer norm: per time step)."""
    wavlm, _, wav2vec2 = tiny_encoders()
    if extractor == "wav2vec2 layer norm":  # wav2vec2-large-lv60 style: a layer norm in every conv layer
        wav2vec2 = build_wav2vec2({**WAV2VEC2_TINY, "feat_extract_norm": "layer", "do_stable_layer_norm": True})
    encoder = wavlm if extractor == "wavlm" else wav2vec2
    for seconds in (60, 21.3):
        x = speech_like(int(seconds * 16_000), seed=5) + 0.02
        statistics = encoder.clip_statistics(x, x.shape[0])
        assert (statistics.conv0_mean is None) == (extractor == "wav2vec2 layer norm")
        with torch.inference_mode():
            expected = encoder.module(encoder._normalised(x, 0, statistics)[None]).last_hidden_state[0]
        actual = encoder.encode_window(x, 0, statistics)
        assert actual.shape == expected.shape == (encoder.sequence_length(x.shape[0]), encoder.dim)
        assert encoder.sequence_length(x.shape[0]) > CONV_CHUNK_OUTPUTS
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    x = encoder._normalised(speech_like(60 * 16_000, seed=6), 0, statistics)
    with torch.inference_mode(), activation_peak_bytes() as single_pass:
        whole = encoder.module.feature_extractor(x[None])
    with torch.inference_mode(), activation_peak_bytes() as chunked:
        chunks = encoder._conv_features(x, statistics)
    assert chunks.shape == whole.shape
    # both peaks count the input's storage once (slicing it gives a view, an operator output)
    single_pass_peak, chunked_peak = (tracker.peak - x.untyped_storage().nbytes() for tracker in (single_pass, chunked))
    print(
        f"{extractor}: conv front-end live peak over 60 s: one pass {single_pass_peak / 2**20:.1f} MiB, "
        f"chunked {chunked_peak / 2**20:.1f} MiB"
    )
    assert chunked_peak < single_pass_peak / 3


def write_raw_waveform(path: Path, waveform: torch.Tensor, padded: int) -> WaveformFile:
    """``waveform`` as a raw float32 file, sparse zero padding to ``padded`` samples (as the extractor stages it)."""
    with open(path, "wb") as file:
        file.write(waveform.numpy().astype("<f4").tobytes())
        file.truncate(4 * padded)
    return WaveformFile(path, padded)


def test_waveform_file_slices_read_exactly_those_samples(tmp_path):
    waveform = speech_like(50_000)
    stored = write_raw_waveform(tmp_path / "wave.f32", waveform, 60_000)
    assert stored.shape == (60_000,) and len(stored.head(45_000)) == 45_000
    torch.testing.assert_close(stored[1_234:40_321], waveform[1_234:40_321], rtol=0, atol=0)
    assert torch.equal(stored[49_990:50_010][10:], torch.zeros(10))  # the sparse padding reads as zeros
    assert stored.head(45_000)[44_990:50_000].shape == (10,)  # a head view ends where it says
    with pytest.raises(OSError, match="fewer than"):
        WaveformFile(tmp_path / "wave.f32", 70_000)[65_000:70_000]


def test_chunked_clip_statistics_equal_the_whole_clip_ones(tmp_path):
    """Waveform normalisation and first-layer group-norm statistics read chunk by chunk (25 s: 3 chunks of
    STATISTICS_CHUNK_SAMPLES) from a tensor or a WaveformFile equal the whole-clip values."""
    num_valid, padded = 25 * 16_000 + 77, 25 * 16_000 + 640
    waveform = speech_like(num_valid, seed=3) + 0.05  # a mean that is not zero
    assert num_valid > 2 * STATISTICS_CHUNK_SAMPLES
    stored = write_raw_waveform(tmp_path / "wave.f32", waveform, padded)
    in_memory = torch.cat([waveform, torch.zeros(padded - num_valid)])
    _, _, wav2vec2 = tiny_encoders()
    assert wav2vec2.normalisation.valid_only and isinstance(wav2vec2._first_norm, torch.nn.GroupNorm)
    from_file = wav2vec2.clip_statistics(stored, num_valid)
    from_tensor = wav2vec2.clip_statistics(in_memory, num_valid)
    assert (from_file.wave_mean, from_file.wave_scale) == (from_tensor.wave_mean, from_tensor.wave_scale)
    assert torch.equal(from_file.conv0_mean, from_tensor.conv0_mean)
    assert torch.equal(from_file.conv0_rstd, from_tensor.conv0_rstd)

    exact = waveform.double()  # the whole clip at once, float64
    assert from_file.wave_mean == pytest.approx(float(exact.mean()), rel=1e-12, abs=1e-15)
    expected_scale = 1.0 / np.sqrt(float(exact.var(unbiased=True)) + wav2vec2.normalisation.eps)
    assert from_file.wave_scale == pytest.approx(expected_scale, rel=1e-12)
    # and the former whole-tensor float32 computation, within its own rounding
    assert abs(from_file.wave_mean - float(waveform.mean())) < 1e-7
    former_scale = 1.0 / np.sqrt(float(waveform.var(unbiased=True)) + wav2vec2.normalisation.eps)
    assert from_file.wave_scale == pytest.approx(former_scale, rel=1e-5)

    biased = WaveformNormalisation(unbiased=False, eps=1e-5, valid_only=False)  # WavLM Large: whole padded input
    wav2vec2.normalisation = biased
    over_padding = wav2vec2.clip_statistics(stored, num_valid)
    assert over_padding.wave_mean == pytest.approx(float(in_memory.double().mean()), rel=1e-12)
    assert over_padding.wave_scale == pytest.approx(
        1.0 / np.sqrt(float(in_memory.double().var(unbiased=False)) + 1e-5), rel=1e-12
    )


def resident_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="resident size is read from /proc (Linux)")
def test_job_digest_of_cached_features_reads_nothing(tmp_path):
    """A job names features straight from the cache by their entry: the 128 MB memory map stays unread (hashing
    it, as before, kept all of it resident), reopening gives the same name (resume), a changed copy is hashed."""
    cache = FeatureCache(tmp_path / "cache")
    frames, width = 40_000, 400  # 128 MB per array, about 1.2 h of frames
    shapes = dict.fromkeys(FEATURE_ARRAYS, (frames, 2, width))
    with cache.write("entry", shapes, {"format": "test"}) as files:
        for name in FEATURE_ARRAYS:
            files.set_columns(name, 7, 0, np.full((3, width), 0.5, np.float32))

    def conditioning():
        arrays, meta = cache.open("entry")
        keyframe, interpolation = (entry_tensor(arrays[name], "entry", name, meta) for name in FEATURE_ARRAYS)
        emotion = torch.zeros(frames)
        return Conditioning(torch.zeros(1, 4, 8, 8), keyframe, interpolation, emotion, emotion)

    first = conditioning()
    before = resident_mb()
    digests = first.digests()
    assert resident_mb() - before < 20, "the digest read the memory-mapped features"
    assert digests["keyframe_audio"] != digests["interpolation_audio"]
    again = conditioning().digests()
    assert again == digests  # the same entry opened again: the same job folder

    assert entry_digest(first.keyframe_audio[:100]) is None  # a slice is another tensor: hashed
    first.keyframe_audio[7, 0, 0] = 2.0  # changed in place (copy-on-write map): hashed, not trusted
    assert entry_digest(first.keyframe_audio) is None
    changed = first.digests()
    assert changed["keyframe_audio"] != digests["keyframe_audio"]
    assert changed["keyframe_audio"] == tensor_digest(first.keyframe_audio)


def test_features_from_the_cache_name_the_job_by_their_entry(tmp_path):
    path = write_stereo_wav(tmp_path / "speech.wav", 3.0)
    extractor = AudioFeatureExtractor(*tiny_encoders(), cache=FeatureCache(tmp_path / "cache"))
    features = extractor.extract(path)
    key = features.cache_path.name
    assert entry_digest(features.keyframe).startswith(f"feature-cache:{key}:keyframe:")
    assert entry_digest(features.interpolation).startswith(f"feature-cache:{key}:interpolation:")
    assert entry_digest(extractor.extract(path).keyframe) == entry_digest(features.keyframe)  # cache hit
    assert entry_digest(AudioFeatureExtractor(*tiny_encoders(), cache=None).extract(path).keyframe) is None
