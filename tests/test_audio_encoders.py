"""The three audio encoders against the fixtures' raw outputs, and their weight files (wavlm, beats, wav2vec2)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from keyface.audio.beats import beats_fbank, load_beats
from keyface.audio.encoders import WindowConfig
from keyface.audio.features import nearest_indices
from keyface.audio.io import AudioClip, num_video_frames, pad_to_frames, to_encoder_waveform
from keyface.audio.wav2vec2 import load_wav2vec2
from keyface.audio.wavlm import load_wavlm
from keyface.audio.weights import BEATS_FILE, WAV2VEC2_FOLDER, WAVLM_FILE
from keyface.checkpoints import convert_any
from keyface.errors import CheckpointError, MissingWeightsError

CLIPS = ["audio_clip16k_mono", "audio_clip44k_stereo"]
SINGLE_PASS = WindowConfig(window_seconds=1e9, context_seconds=1.0)
TOLERANCE = 1e-4  # fixtures README: float32 outputs


def audio_dir(fixture_set: Path) -> Path:
    return fixture_set / "checkpoints" / "audio"


@functools.cache
def fixture_encoders(fixture_set: Path):
    folder = audio_dir(fixture_set)
    return load_wavlm(folder / WAVLM_FILE), load_beats(folder / BEATS_FILE), load_wav2vec2(folder / WAV2VEC2_FOLDER)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("clip_name", CLIPS)
def test_raw_encoder_outputs_match_fixture(fixture_set, clip_name):
    expected = load_file(fixture_set / "audio" / f"{clip_name}.safetensors")
    wavlm, beats, wav2vec2 = fixture_encoders(fixture_set)
    assert max_difference(wavlm.encode(expected["wavlm_input"][0]), expected["wavlm_raw"][0]) <= TOLERANCE
    assert max_difference(beats_fbank(expected["beats_input"][0]), expected["beats_fbank"][0]) <= TOLERANCE
    assert max_difference(beats.encode(expected["beats_input"][0]), expected["beats_raw"][0]) <= TOLERANCE
    # wav2vec2 normalises the clip itself: feed the un-normalised, zero-padded clip and its real length
    clip = AudioClip(expected["waveform"], int(expected["sample_rate"]))
    waveform = to_encoder_waveform(clip, "reference")
    padded = pad_to_frames(waveform, num_video_frames(waveform.shape[0]))
    assert padded.shape == expected["wav2vec2_input"][0].shape
    out = wav2vec2.encode(padded, num_valid=waveform.shape[0])
    assert max_difference(out, expected["wav2vec2_raw"][0]) <= TOLERANCE


def test_encoder_sizes_come_from_the_checkpoint(fixture_set):
    config = json.loads((fixture_set / "config.json").read_text())["audio_encoders"]
    wavlm, beats, wav2vec2 = fixture_encoders(fixture_set)
    assert wavlm.dim == config["wavlm"]["cfg"]["encoder_embed_dim"]
    assert len(wavlm.module.encoder.layers) == config["wavlm"]["cfg"]["encoder_layers"]
    assert beats.dim == config["beats"]["cfg"]["encoder_embed_dim"]
    assert len(beats.module.encoder.layers) == config["beats"]["cfg"]["encoder_layers"]
    assert wav2vec2.dim == config["wav2vec2"]["config"]["hidden_size"]


def test_pt_and_safetensors_copies_give_identical_outputs(fixture_set, tmp_path):
    folder = audio_dir(fixture_set)
    signal = torch.from_numpy(np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1)
    for loader, name in [(load_wavlm, WAVLM_FILE), (load_beats, BEATS_FILE)]:
        reference = loader(folder / name).encode(signal)
        flat_copy = folder / name.replace(".pt", ".model.safetensors")  # cfg read from the .pt beside it
        converted = tmp_path / name.replace(".pt", ".safetensors")
        convert_any(folder / name, converted)
        sidecar_dir = tmp_path / "sidecar"
        sidecar_dir.mkdir(exist_ok=True)
        alone = sidecar_dir / flat_copy.name
        shutil.copy(flat_copy, alone)
        cfg = torch.load(folder / name, weights_only=True)["cfg"]
        (sidecar_dir / name.replace(".pt", ".json")).write_text(json.dumps(cfg))
        for variant in (flat_copy, converted, alone):
            assert torch.equal(loader(variant).encode(signal), reference), variant


def test_hugging_face_wavlm_folder_loads_the_same_network(fixture_set, tmp_path):
    wavlm = fixture_encoders(fixture_set)[0]
    wavlm.module.save_pretrained(tmp_path / "wavlm-base-plus")
    from_folder = load_wavlm(tmp_path / "wavlm-base-plus")
    signal = torch.linspace(-0.5, 0.5, 8_000)
    assert torch.equal(from_folder.encode(signal), wavlm.encode(signal))


def test_missing_and_wrong_weight_files(fixture_set, tmp_path):
    folder = audio_dir(fixture_set)
    with pytest.raises(MissingWeightsError, match=r"WavLM-Base\+.pt.*unilm"):
        load_wavlm(tmp_path / WAVLM_FILE)
    with pytest.raises(MissingWeightsError, match="BEATs.*unilm"):
        load_beats(tmp_path / BEATS_FILE)
    with pytest.raises(MissingWeightsError, match="facebook/wav2vec2-base-960h"):
        load_wav2vec2(tmp_path / WAV2VEC2_FOLDER)
    with pytest.raises(CheckpointError, match="lacks the config entries"):
        load_wavlm(folder / BEATS_FILE)
    with pytest.raises(CheckpointError, match="lacks the config entries"):
        load_beats(folder / WAVLM_FILE)
    alone = tmp_path / "weights.safetensors"
    shutil.copy(folder / WAVLM_FILE.replace(".pt", ".model.safetensors"), alone)
    with pytest.raises(CheckpointError, match="no config"):
        load_wavlm(alone)
    truncated = tmp_path / WAVLM_FILE
    truncated.write_bytes((folder / WAVLM_FILE).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="WavLM.*cannot be read as a PyTorch checkpoint.*download it again"):
        load_wavlm(truncated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"cfg": {}, "model": {}, "extra": WindowConfig()}, pickled)
    with pytest.raises(CheckpointError, match="holds objects the safe loader refuses.*python -m keyface convert"):
        load_beats(pickled)
    mismatched = tmp_path / "mismatched.pt"
    checkpoint = torch.load(folder / WAVLM_FILE, weights_only=True)
    checkpoint["cfg"]["encoder_layers"] += 1
    torch.save(checkpoint, mismatched)
    with pytest.raises(CheckpointError, match="does not match its own cfg"):
        load_wavlm(mismatched)
    with pytest.raises(CheckpointError, match="is a file"):
        load_wav2vec2(folder / WAVLM_FILE)
    no_config = tmp_path / "empty_model"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_wav2vec2(no_config)
    wrong_model = tmp_path / "wrong_model"
    wrong_model.mkdir()
    (wrong_model / "config.json").write_text(json.dumps({"model_type": "wavlm"}))
    with pytest.raises(CheckpointError, match="holds a 'wavlm' model"):
        load_wav2vec2(wrong_model)
    empty_weights = tmp_path / "no_weights"
    shutil.copytree(folder / WAV2VEC2_FOLDER, empty_weights)
    tensors = load_file(empty_weights / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.0." not in k}, empty_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks weights"):
        load_wav2vec2(empty_weights)


@pytest.mark.parametrize("source", [1, 2, 3, 7, 159, 160, 167, 333, 1000, 4097])
def test_nearest_indices_follow_torch_interpolate(source):
    for target in {1, 2, source, 2 * source, 2 * source + 2, 3 * source + 1, 168, 4096}:
        values = torch.arange(source, dtype=torch.float32)[None, None]
        expected = torch.nn.functional.interpolate(values, size=target, mode="nearest")[0, 0].long().numpy()
        np.testing.assert_array_equal(nearest_indices(source, target), expected)


@pytest.mark.parametrize("tokens", [1, 255, 256, 700])
def test_blockwise_wavlm_attention_equals_the_transformers_layer(tokens):
    """The block-of-queries attention gives the numbers of transformers' own WavLMAttention (whole-matrix)."""
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    from keyface.audio.attention import BlockwiseWavLMAttention

    torch.manual_seed(0)
    original = WavLMAttention(24, 3, num_buckets=320, max_distance=800).eval()
    for parameter in original.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    blockwise = BlockwiseWavLMAttention(original)
    hidden = torch.randn(1, tokens, 24)
    with torch.no_grad():
        expected, _, full_bias = original(hidden)
        actual, _, bias = blockwise(hidden)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # float rounding only (outputs up to ~20)
        assert torch.equal(bias.rows(0, tokens), full_bias)  # the bias handed to the next layer
        later = WavLMAttention(24, 3, has_relative_position_bias=False).eval()
        torch.testing.assert_close(
            BlockwiseWavLMAttention(later)(hidden, position_bias=bias)[0],
            later(hidden, position_bias=full_bias)[0],
            rtol=1e-4,
            atol=1e-4,
        )
    assert set(blockwise.state_dict()) == set(original.state_dict())


def test_beats_attention_blocks_do_not_change_the_output(monkeypatch):
    """BEATs over 20 s (992 tokens): four query blocks give what one whole-matrix block gives."""
    import keyface.audio.attention
    from keyface.audio.beats import build_beats
    from keyface.demo import TINY, randomise_

    encoder = build_beats(TINY.beats_cfg())
    randomise_(encoder.module, seed=0)
    signal = torch.from_numpy(np.random.default_rng(1).standard_normal(20 * 16_000).astype(np.float32) * 0.1)
    blockwise = encoder.encode(signal)
    monkeypatch.setattr(keyface.audio.attention, "QUERY_BLOCK", 10**9)
    whole = encoder.encode(signal)
    assert blockwise.shape[0] > 3 * 256  # several blocks of QUERY_BLOCK = 256 queries
    torch.testing.assert_close(blockwise, whole, rtol=1e-5, atol=1e-5)


def test_the_beats_fbank_in_chunks_equals_one_kaldi_pass():
    """25.3 s (2,528 frames: two full chunks of FBANK_CHUNK_FRAMES and a partial one) give kaldi's own numbers."""
    import torchaudio.compliance.kaldi as kaldi

    from keyface.audio.beats import FBANK_CHUNK_FRAMES, FBANK_MEAN, FBANK_STD, beats_fbank

    waveform = torch.from_numpy(np.random.default_rng(2).standard_normal(404_800).astype(np.float32) * 0.1)
    whole = kaldi.fbank(
        waveform[None] * 2**15, num_mel_bins=128, sample_frequency=16_000, frame_length=25, frame_shift=10
    )
    chunked = beats_fbank(waveform)
    assert chunked.shape == whole.shape == (2528, 128) and whole.shape[0] > 2 * FBANK_CHUNK_FRAMES
    torch.testing.assert_close(chunked, (whole - FBANK_MEAN) / (2 * FBANK_STD), rtol=0, atol=1e-6)
