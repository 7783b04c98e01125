"""Wall time and peak memory of audio featurisation with full-size encoders (random weights), and window error.

Not part of the test suite. Builds WavLM Base+ (12 layers, 768 wide, 12 heads, 512-channel conv stack),
BEATs iter3 (12 layers, 768, patch embedding 512) and wav2vec2 base (12 layers, 768) from their published
configs with random weights (no weights are downloaded), then featurises synthetic speech-like audio of each
requested duration in a fresh child process, so that its peak RSS is measured alone. Prints one JSON line per
measurement, e.g. ``{"metric": "audio_features_600s_wall_s", "value": 312.4}``.

    python bench/audio_features.py                            # 10 s and 10 min on the CPU, default windows
    python bench/audio_features.py --seconds 10 --device cuda
    python bench/audio_features.py --seconds --window-error-seconds 90  # windowed vs single pass, tiny and full size
    python bench/audio_features.py --seconds --window-error-seconds 90 --window-error-sizes tiny \
        --window-error-folder ../shared/fixtures/keyface-tiny-v1/checkpoints/audio

The window-error measurement compares windowed encoding (default windows, and 30 s / 5 s) with one pass over
the whole clip, per encoder, as max and mean absolute difference of the raw sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from keyface.audio import AudioClip, AudioFeatureExtractor, FeatureCache, WindowConfig
from keyface.audio.beats import build_beats
from keyface.audio.wav2vec2 import build_wav2vec2
from keyface.audio.wavlm import build_wavlm

# Published configs of the released encoders (unilm WavLM-Base+.pt / BEATs iter3+ cfg; HF wav2vec2-base-960h).
WAVLM_BASE_PLUS = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "normalize": False,
}
BEATS_ITER3 = {
    "input_patch_size": 16,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
}
WAV2VEC2_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
}
# The fixtures' tiny sizes (keyface-tiny-v1 config.json): 12 wide, 2 layers, 2 heads.
TINY = {"layers": 2, "dim": 12, "ffn": 24, "heads": 2, "conv": 32}


def encoders(size: str):
    torch.manual_seed(0)
    if size == "base":
        return build_wavlm(WAVLM_BASE_PLUS), build_beats(BEATS_ITER3), build_wav2vec2(WAV2VEC2_BASE)
    t = TINY
    wavlm = {
        **WAVLM_BASE_PLUS,
        "encoder_layers": t["layers"],
        "encoder_embed_dim": t["dim"],
        "encoder_ffn_embed_dim": t["ffn"],
        "encoder_attention_heads": t["heads"],
        "conv_pos_groups": 4,
        "conv_feature_layers": f"[({t['conv']},10,5)] + [({t['conv']},3,2)] * 4 + [({t['conv']},2,2)] * 2",
    }
    beats = {
        **BEATS_ITER3,
        "encoder_layers": t["layers"],
        "encoder_embed_dim": t["dim"],
        "encoder_ffn_embed_dim": t["ffn"],
        "encoder_attention_heads": t["heads"],
        "embed_dim": 16,
        "conv_pos_groups": 4,
    }
    wav2vec2 = {
        **WAV2VEC2_BASE,
        "hidden_size": t["dim"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "intermediate_size": t["ffn"],
        "conv_dim": [t["conv"]] * 7,
        "num_conv_pos_embedding_groups": 4,
    }
    return build_wavlm(wavlm), build_beats(beats), build_wav2vec2(wav2vec2)


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise shaped by a syllable-rate envelope plus a pitch track, (samples,) at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    envelope = np.clip(np.sin(2 * np.pi * 4 * t) + 0.3 * rng.standard_normal(t.shape[0]).cumsum() / 400, 0, 1)
    voiced = np.sin(2 * np.pi * (120 + 30 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return torch.from_numpy((0.2 * envelope * (voiced + 0.3 * rng.standard_normal(t.shape[0]))).astype(np.float32))


def emit(metric: str, value: float, **extra) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 6), **extra}), flush=True)


def child(seconds: float, device: str, window: WindowConfig) -> None:
    """One featurisation, in this (fresh) process."""
    start = time.perf_counter()
    wavlm, beats, wav2vec2 = encoders("base")
    emit("audio_encoders_build_s", time.perf_counter() - start, size="base")
    clip = AudioClip(speech_like(seconds)[None], 16_000, f"synthetic {seconds:g} s")
    with tempfile.TemporaryDirectory() as cache_dir:
        extractor = AudioFeatureExtractor(
            wavlm, beats, wav2vec2, device=device, cache=FeatureCache(cache_dir), window=window
        )
        start = time.perf_counter()
        features = extractor.extract(clip)
        wall = time.perf_counter() - start
        assert torch.isfinite(features.keyframe[-1]).all()
        emit(
            f"audio_features_{seconds:g}s_wall_s",
            wall,
            frames=features.num_frames,
            device=device,
            realtime_factor=round(seconds / wall, 3),
            window=[window.window_seconds, window.context_seconds],
        )
        start = time.perf_counter()
        extractor.extract(clip)
        emit(f"audio_features_{seconds:g}s_cache_hit_s", time.perf_counter() - start)


def window_error(seconds: float, size: str, folder: str | None = None) -> None:
    if folder is None:
        wavlm, beats, wav2vec2 = encoders(size)
    else:
        extractor = AudioFeatureExtractor.from_folder(folder, cache=None)
        wavlm, beats, wav2vec2 = (extractor.encoder(role) for role in ("wavlm", "beats", "wav2vec2"))
    waveform = speech_like(seconds, seed=1)
    waveform = waveform[: waveform.shape[0] // 2560 * 2560]
    single_pass = WindowConfig(window_seconds=1e9, context_seconds=1.0)
    for encoder in (wavlm, beats, wav2vec2):
        single = encoder.encode(waveform, window=single_pass)
        for config in (WindowConfig(), WindowConfig(30.0, 5.0)):
            difference = (encoder.encode(waveform, window=config) - single).abs()
            emit(
                f"window_max_abs_diff_{size}_{encoder.name}_{config.window_seconds:g}s_{config.context_seconds:g}s",
                float(difference.max()),
                mean_abs_diff=float(difference.mean()),
                mean_abs_value=float(single.abs().mean()),
                clip_seconds=seconds,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", nargs="*", type=float, default=[10.0, 600.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=float, default=WindowConfig().window_seconds)
    parser.add_argument("--context", type=float, default=WindowConfig().context_seconds)
    parser.add_argument(
        "--window-error-seconds", type=float, default=0.0, help="clip length for the window error (0: skip)"
    )
    parser.add_argument("--window-error-sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--window-error-folder", help="also measure the encoders of this folder (e.g. a fixture set's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    window = WindowConfig(args.window, args.context)
    if args.child:
        child(args.seconds[0], args.device, window)
        return
    for seconds in args.seconds:
        command = [
            sys.executable,
            __file__,
            "--child",
            "--seconds",
            str(seconds),
            "--device",
            args.device,
            "--window",
            str(args.window),
            "--context",
            str(args.context),
        ]
        process = subprocess.Popen(command)
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"featurising {seconds:g} s failed (status {status})")
        emit(f"audio_features_{seconds:g}s_peak_rss_mb", usage.ru_maxrss / 1024, device=args.device)
        # CPU time of the child (build + featurise + cache hit): less sensitive than wall time to a busy machine
        emit(
            f"audio_features_{seconds:g}s_child_cpu_s", usage.ru_utime + usage.ru_stime, threads=torch.get_num_threads()
        )
    if args.window_error_seconds > 0:
        for size in args.window_error_sizes:
            window_error(args.window_error_seconds, size)
        if args.window_error_folder:
            window_error(args.window_error_seconds, "folder", args.window_error_folder)


if __name__ == "__main__":
    main()
