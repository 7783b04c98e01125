"""Per-frame audio features: fixture parity, frame counts, channel policy, cache and windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio.functional
from safetensors.torch import load_file

from keyface.audio import (
    AudioClip,
    AudioFeatureExtractor,
    FeatureCache,
    WindowConfig,
    combine_encoder_frames,
    default_cache_dir,
    load_audio,
    raw_audio_frames,
)
from keyface.audio.beats import build_beats
from keyface.audio.encoders import plan_windows
from keyface.audio.wav2vec2 import build_wav2vec2
from keyface.audio.wavlm import build_wavlm
from keyface.errors import InputError, Interrupted, MissingWeightsError

TOLERANCE = 1e-4  # fixtures README: float32 outputs
CLIPS = [("audio_clip16k_mono", "clip16k_mono.wav"), ("audio_clip44k_stereo", "clip44k_stereo.wav")]

WAVLM_TINY = {
    "extractor_mode": "default",
    "encoder_layers": 1,
    "encoder_embed_dim": 8,
    "encoder_ffn_embed_dim": 16,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(8,10,5)] + [(8,3,2)] * 4 + [(8,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 16,
    "conv_pos_groups": 2,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 100,
    "gru_rel_pos": True,
    "normalize": False,
}
BEATS_TINY = {
    "input_patch_size": 16,
    "embed_dim": 8,
    "conv_bias": False,
    "encoder_layers": 1,
    "encoder_embed_dim": 6,
    "encoder_ffn_embed_dim": 16,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 16,
    "conv_pos_groups": 2,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 100,
    "gru_rel_pos": True,
}
WAV2VEC2_TINY = {
    "hidden_size": 4,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 8,
    "conv_dim": [8] * 7,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


def tiny_encoders(layers: int = 1, seed: int = 0):
    """Random tiny WavLM (8 wide), BEATs (6) and wav2vec2 (4) with ``layers`` transformer layers each."""
    torch.manual_seed(seed)
    wavlm = build_wavlm({**WAVLM_TINY, "encoder_layers": layers}, identity=f"wavlm-{layers}-{seed}")
    beats = build_beats({**BEATS_TINY, "encoder_layers": layers}, identity=f"beats-{layers}-{seed}")
    wav2vec2 = build_wav2vec2({**WAV2VEC2_TINY, "num_hidden_layers": layers}, identity=f"w2v-{layers}-{seed}")
    return wavlm, beats, wav2vec2


def speech_like(samples: int, seed: int = 0) -> torch.Tensor:
    """Noise with a slow envelope, (samples,) float32."""
    generator = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(np.arange(samples) / 3000.0)
    return torch.from_numpy((0.3 * envelope * generator.standard_normal(samples)).astype(np.float32))


class CountingEncoder:
    """Wraps an encoder's ``encode_window`` to count calls."""

    def __init__(self, encoder):
        self.calls = 0
        original = encoder.encode_window

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        encoder.encode_window = counted


def is_mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s memory lies in a memory mapping of ``path`` (Linux /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps to see memory mappings")
    address = tensor.data_ptr()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(Path(path).resolve()):
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.parametrize("clip_name, wav_name", CLIPS)
def test_reference_features_match_fixture(fixture_set, tmp_path, clip_name, wav_name):
    expected = load_file(fixture_set / "audio" / f"{clip_name}.safetensors")
    extractor = AudioFeatureExtractor.from_folder(fixture_set / "checkpoints" / "audio", cache=FeatureCache(tmp_path))
    features = extractor.extract(fixture_set / "audio" / wav_name, mode="reference")
    frames = expected["keyframe_audio"].shape[0]
    assert features.num_frames == frames == expected["interpolation_audio"].shape[0]
    torch.testing.assert_close(features.keyframe, expected["keyframe_audio"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(features.interpolation, expected["interpolation_audio"], atol=TOLERANCE, rtol=0)
    wavlm_width = expected["wavlm_frames"].shape[-1]
    wav2vec2_width = expected["wav2vec2_frames"].shape[-1]
    torch.testing.assert_close(
        features.keyframe[..., :wavlm_width], expected["wavlm_frames"][:frames], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        features.keyframe[..., wavlm_width:], expected["beats_frames"][:frames], atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(
        features.interpolation[..., :wav2vec2_width], expected["wav2vec2_frames"], atol=TOLERANCE, rtol=0
    )
    assert (features.cache_path / "keyframe.npy").is_file()


def test_pipeline_fixture_audio(fixture_set):
    pipeline = load_file(fixture_set / "pipeline" / "full_pipeline.safetensors")
    combined = combine_encoder_frames(
        pipeline["in_wavlm_frames"], pipeline["in_beats_frames"], pipeline["in_wav2vec2_frames"]
    )
    assert torch.equal(combined.keyframe, pipeline["keyframe_audio"])
    assert torch.equal(combined.interpolation, pipeline["interpolation_audio"])
    extractor = AudioFeatureExtractor.from_folder(fixture_set / "checkpoints" / "audio", cache=None)
    clip = load_audio(fixture_set / "pipeline" / "clip.wav")
    features = extractor.extract(clip, mode="reference")
    torch.testing.assert_close(features.keyframe, pipeline["keyframe_audio"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(features.interpolation, pipeline["interpolation_audio"], atol=TOLERANCE, rtol=0)
    intermediates = load_file(fixture_set / "pipeline" / "full_pipeline_intermediates.safetensors")
    torch.testing.assert_close(raw_audio_frames(clip), intermediates["raw_audio_frames"], atol=TOLERANCE, rtol=0)


def test_stereo_44k_file_and_its_16k_mono_version(tmp_path):
    import av

    seconds = 1.3
    t = np.arange(int(44_100 * seconds)) / 44_100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 710 * t + 1.0)]).astype(np.float32)
    mono_16k = torchaudio.functional.resample(torch.from_numpy(stereo).mean(0), 44_100, 16_000).numpy()
    for name, data, rate in [("stereo44k.wav", stereo, 44_100), ("mono16k.wav", mono_16k[None], 16_000)]:
        with av.open(str(tmp_path / name), "w") as container:
            stream = container.add_stream("pcm_f32le", rate=rate)
            stream.layout = "stereo" if data.shape[0] == 2 else "mono"
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp", layout=stream.layout.name)
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
    extractor = AudioFeatureExtractor(*tiny_encoders(), cache=None)
    from_stereo = extractor.extract(tmp_path / "stereo44k.wav")
    from_mono = extractor.extract(tmp_path / "mono16k.wav")
    assert from_stereo.num_frames == from_mono.num_frames == -(-mono_16k.shape[0] // 640)
    torch.testing.assert_close(from_stereo.keyframe, from_mono.keyframe, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_stereo.interpolation, from_mono.interpolation, atol=1e-6, rtol=0)
    # reference mode keeps the left channel only at 44.1 kHz
    left = AudioClip(torchaudio.functional.resample(torch.from_numpy(stereo[0]), 44_100, 16_000)[None], 16_000)
    reference = extractor.extract(tmp_path / "stereo44k.wav", mode="reference")
    torch.testing.assert_close(reference.keyframe, extractor.extract(left).keyframe, atol=1e-6, rtol=0)
    assert (reference.keyframe - from_stereo.keyframe).abs().max() > 1e-3


@pytest.mark.parametrize(
    "samples, frames", [(1, 1), (100, 1), (639, 1), (640, 1), (641, 2), (1279, 2), (1280, 2), (2801, 5)]
)
def test_any_length_gives_one_feature_per_frame(samples, frames):
    wavlm, beats, wav2vec2 = tiny_encoders()
    extractor = AudioFeatureExtractor(wavlm, beats, wav2vec2, cache=None)
    features = extractor.extract(AudioClip(speech_like(samples)[None], 16_000))
    assert features.keyframe.shape == (frames, 2, wavlm.dim + beats.dim)
    assert features.interpolation.shape == (frames, 2, wav2vec2.dim + beats.dim)
    assert torch.isfinite(features.keyframe).all() and torch.isfinite(features.interpolation).all()
    assert features.keyframe[..., wavlm.dim :].abs().sum() > 0  # BEATs saw a (padded) patch
    assert features.interpolation[-1, -1, : wav2vec2.dim].abs().sum() == 0  # wav2vec2's appended zero vector


def test_cache_hit_runs_no_encoder_and_is_memory_mapped(tmp_path):
    wavlm, beats, wav2vec2 = tiny_encoders()
    counters = [CountingEncoder(encoder) for encoder in (wavlm, beats, wav2vec2)]
    cache = FeatureCache(tmp_path / "cache")
    extractor = AudioFeatureExtractor(wavlm, beats, wav2vec2, cache=cache)
    clip = AudioClip(speech_like(16_000)[None], 16_000)
    first = extractor.extract(clip)
    calls = [counter.calls for counter in counters]
    assert all(count >= 1 for count in calls)
    second = extractor.extract(clip)
    assert [counter.calls for counter in counters] == calls
    assert second.cache_path == first.cache_path and torch.equal(second.keyframe, first.keyframe)
    on_disk = np.load(second.cache_path / "interpolation.npy", mmap_mode="r")
    assert isinstance(on_disk, np.memmap) and np.array_equal(on_disk, second.interpolation.numpy())
    assert is_mapped_from(second.keyframe, second.cache_path / "keyframe.npy")
    extractor.extract(clip, mode="reference")  # another mode is another entry
    assert counters[0].calls > calls[0] and len(cache.entries()) == 2
    in_memory = AudioFeatureExtractor(wavlm, beats, wav2vec2, cache=None).extract(clip)
    assert in_memory.cache_path is None and torch.equal(in_memory.keyframe, first.keyframe)


def test_cache_key_follows_weights_and_settings(fixture_set, tmp_path):
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(fixture_set / "checkpoints" / "audio", folder)
    extractor = AudioFeatureExtractor.from_folder(folder, cache=FeatureCache(tmp_path / "cache"))
    waveform = speech_like(8_000)
    key = extractor.cache_key(waveform, "default")
    assert key == extractor.cache_key(waveform.clone(), "default")
    assert key != extractor.cache_key(waveform, "reference")
    assert key != extractor.cache_key(waveform + 1e-3, "default")
    windowed = AudioFeatureExtractor.from_folder(folder, cache=None, window=WindowConfig(30.0, 5.0))
    assert key != windowed.cache_key(waveform, "default")
    import os

    checkpoint = next(folder.glob("WavLM*.pt"))
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    assert key != extractor.cache_key(waveform, "default")


def test_cache_evicts_least_recently_used(tmp_path):
    cache = FeatureCache(tmp_path / "cache", max_bytes=10**9)
    extractor = AudioFeatureExtractor(*tiny_encoders(), cache=cache)
    clips = [AudioClip(speech_like(6_400, seed)[None], 16_000) for seed in range(3)]
    first, second = extractor.extract(clips[0]), extractor.extract(clips[1])
    entry_size = cache.size_bytes() // 2
    import os
    import time

    os.utime(first.cache_path / "meta.json", (time.time() - 100, time.time() - 100))
    os.utime(second.cache_path / "meta.json", (time.time() - 50, time.time() - 50))
    extractor.extract(clips[0])  # a hit refreshes the first entry's last use
    cache.max_bytes = 2 * entry_size + entry_size // 2
    third = extractor.extract(clips[2])
    remaining = {path for path, _, _ in cache.entries()}
    assert remaining == {first.cache_path, third.cache_path}
    cache.max_bytes = 1  # the entry just written is always kept
    fourth = extractor.extract(AudioClip(speech_like(6_400, 9)[None], 16_000))
    assert {path for path, _, _ in cache.entries()} == {fourth.cache_path}
    cache.clear()
    assert cache.entries() == []


def test_default_cache_folder_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYFACE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere" / "features"
    assert FeatureCache().root == tmp_path / "elsewhere" / "features"
    monkeypatch.delenv("KEYFACE_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "keyface", "features")


def test_progress_and_interruption_leave_no_entry(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    extractor = AudioFeatureExtractor(*tiny_encoders(), cache=cache, window=WindowConfig(4.0, 1.0))
    clip = AudioClip(speech_like(16_000 * 10)[None], 16_000)
    seen = []
    extractor.extract(clip, progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert total > 3 and [done for done, _ in seen] == list(range(1, total + 1))
    cache.clear()

    def stop(done, total):
        if done == 2:
            raise Interrupted("stopped by the user")

    with pytest.raises(Interrupted):
        extractor.extract(clip, progress=stop)
    assert list((tmp_path / "cache").iterdir()) == []


def test_windowed_encoding_equals_single_pass_without_attention():
    """With no attention layer every output depends on a bounded neighbourhood: windows must be exact.

    This covers the window alignment, the clip-wide group-norm statistics and wav2vec2's normalisation.
    """
    encoders = tiny_encoders(layers=0, seed=3)
    waveform = speech_like(16_000 * 11 + 123, seed=5)
    single = AudioFeatureExtractor(*encoders, cache=None, window=WindowConfig(60.0, 10.0)).extract(
        AudioClip(waveform[None], 16_000)
    )
    windowed_extractor = AudioFeatureExtractor(*encoders, cache=None, window=WindowConfig(3.0, 1.0))
    assert all(
        len(plan_windows(waveform.shape[0], encoder.alignment, windowed_extractor.window)) > 3 for encoder in encoders
    )
    windowed = windowed_extractor.extract(AudioClip(waveform[None], 16_000))
    torch.testing.assert_close(windowed.keyframe, single.keyframe, atol=1e-5, rtol=0)
    torch.testing.assert_close(windowed.interpolation, single.interpolation, atol=1e-5, rtol=0)


def test_windowed_encoding_with_attention_stays_close():
    """With global attention windows differ from a single pass; the shapes and the bulk of values agree."""
    encoders = tiny_encoders(layers=1, seed=4)
    clip = AudioClip(speech_like(16_000 * 8, seed=6)[None], 16_000)
    single = AudioFeatureExtractor(*encoders, cache=None).extract(clip)
    windowed = AudioFeatureExtractor(*encoders, cache=None, window=WindowConfig(3.0, 1.0)).extract(clip)
    assert windowed.keyframe.shape == single.keyframe.shape
    for name in ("keyframe", "interpolation"):  # about 1 % here; a window shifted by one frame gives about 95 %
        ours, reference = getattr(windowed, name), getattr(single, name)
        assert (ours - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_window_plan_covers_the_clip_once():
    config = WindowConfig(window_seconds=3.0, context_seconds=1.0)
    windows = plan_windows(16_000 * 10 + 77, 2560, config)
    assert windows[0].core_start == 0 and windows[-1].core_end == 16_000 * 10 + 77
    for before, after in zip(windows, windows[1:], strict=False):
        assert before.core_end == after.core_start and after.core_start % 2560 == 0
        assert after.input_start % 2560 == 0 and after.input_start <= max(0, after.core_start - 16_000)
        assert after.input_end >= min(16_000 * 10 + 77, after.core_end + 16_000)
    assert plan_windows(16_000 * 3, 2560, config) == plan_windows(16_000 * 3, 320, config)  # fits: one pass
    with pytest.raises(InputError, match="window_seconds"):
        WindowConfig(window_seconds=2.0, context_seconds=1.0)


def test_extractor_bad_inputs(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"wavlm weights not found in .*WavLM-Base\+.pt"):
        AudioFeatureExtractor.from_folder(tmp_path)
    extractor = AudioFeatureExtractor(*tiny_encoders(), cache=None)
    with pytest.raises(InputError, match="missing.flac"):
        extractor.extract(tmp_path / "missing.flac")
    with pytest.raises(InputError, match="mode"):
        extractor.extract(AudioClip(torch.zeros(1, 100), 16_000), mode="fast")
    with pytest.raises(InputError, match="cache"):
        AudioFeatureExtractor(*tiny_encoders(), cache=str(tmp_path))
