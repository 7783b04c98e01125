"""The demo: tiny random-weight models in every supported layout, generated inputs, and the demo command."""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from keyface.demo import (
    DEMO_SAMPLE_RATE,
    MARKER_FILE,
    TINY,
    default_demo_folder,
    run_demo,
    write_demo_inputs,
    write_demo_weights,
)
from keyface.errors import InputError


@pytest.fixture(scope="module")
def demo_folder(demo_models) -> Path:
    """The demo weights at their default place (the test session's KeyFace cache, see conftest)."""
    assert demo_models == default_demo_folder()
    return demo_models


def _file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_demo_weights_load_with_the_library_loaders(demo_folder, tmp_path):
    from keyface.audio.features import AudioFeatureExtractor
    from keyface.loading import find_model_files, load_models

    files = find_model_files(demo_folder)
    models = load_models(files)
    assert models.keyframe.config == TINY.stage_config("keyframe")
    assert models.interpolation.config == TINY.stage_config("interpolation")
    assert models.autoguidance.config == TINY.stage_config("interpolation")
    assert models.image_size == TINY.image_size and models.latent_shape == (4, 8, 8)
    # the "bad" network is its own random network, not a copy of the interpolation UNet
    assert not torch.equal(models.autoguidance.unet.conv_in.weight, models.interpolation.unet.conv_in.weight)
    _, audio = write_demo_inputs(tmp_path, seconds=1.0)
    features = AudioFeatureExtractor.from_folder(files.audio, cache=None).extract(audio)
    assert features.keyframe.shape == features.interpolation.shape == (25, 2, 2 * TINY.encoder_dim)
    for array in (features.keyframe, features.interpolation):
        assert torch.isfinite(array).all() and 0.1 < float(array.std()) < 10.0  # O(1), not constant
    from keyface.identity import load_identity_image

    latent = models.encode_image(load_identity_image(tmp_path / "portrait.png"))
    assert latent.shape == (1, *models.latent_shape) and float(latent.std()) > 0.01


def test_random_weights_follow_the_fixture_recipe(demo_folder):
    from safetensors.torch import load_file

    tensors = load_file(demo_folder / "keyframe.safetensors")
    norm_scales = [v for k, v in tensors.items() if v.ndim == 1 and k.endswith("norm1.weight")]
    biases = torch.cat([v for k, v in tensors.items() if k.endswith(".bias")])
    assert abs(float(torch.cat(norm_scales).mean()) - 1.0) < 0.05 and abs(float(biases.std()) - 0.05) < 0.01
    conv_in = tensors["model.diffusion_model.input_blocks.0.0.weight"]  # (32, 8, 3, 3): fan_in 72
    assert abs(float(conv_in.std()) * conv_in[0].numel() ** 0.5 - 1.0) < 0.1
    assert not any(float(v.std()) == 0.0 for v in tensors.values() if v.numel() > 1)  # no constant tensor


def test_demo_weights_are_written_once_and_atomically(tmp_path):
    folder = tmp_path / "weights"
    write_demo_weights(folder, seed=3)
    first = _file_times(folder)
    assert json.loads((folder / MARKER_FILE).read_text())["seed"] == 3
    write_demo_weights(folder, seed=3)
    assert _file_times(folder) == first  # complete and same seed: untouched
    keyframe = (folder / "keyframe.safetensors").read_bytes()
    write_demo_weights(folder, seed=4)  # another seed replaces the set
    assert (folder / "keyframe.safetensors").read_bytes() != keyframe
    (folder / "interpolation.safetensors").unlink()  # an incomplete set is rewritten
    write_demo_weights(folder, seed=4)
    assert (folder / "interpolation.safetensors").is_file()
    marker = json.loads((folder / MARKER_FILE).read_text())
    (folder / MARKER_FILE).write_text(json.dumps({**marker, "format": "keyface-demo-weights-v1"}))
    write_demo_weights(folder, seed=4)  # a set of an older version is replaced, not refused
    assert json.loads((folder / MARKER_FILE).read_text())["format"] == marker["format"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no temporary folder left behind


def test_a_folder_that_is_not_a_demo_set_is_never_replaced(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "keyframe.pt").write_bytes(b"the user's real weights")
    with pytest.raises(InputError, match="not a KeyFace demo weights folder") as error:
        write_demo_weights(folder)
    assert str(folder) in str(error.value)
    assert (folder / "keyframe.pt").read_bytes() == b"the user's real weights"


def test_demo_inputs_are_a_portrait_and_speech_like_audio(tmp_path):
    from PIL import Image

    image, audio = write_demo_inputs(tmp_path / "inputs", seconds=2.5)
    with Image.open(image) as picture:
        assert picture.mode == "RGB" and picture.size[0] == picture.size[1] >= 256
        pixels = np.asarray(picture)
    assert pixels.std() > 20  # a drawing, not a flat colour
    with wave.open(str(audio)) as file:
        assert (file.getnchannels(), file.getframerate()) == (1, DEMO_SAMPLE_RATE)
        samples = np.frombuffer(file.readframes(file.getnframes()), "<i2") / 32768.0
    assert len(samples) == round(2.5 * DEMO_SAMPLE_RATE)
    loudness = np.sqrt((samples[: len(samples) // 800 * 800].reshape(-1, 800) ** 2).mean(axis=1))  # 50 ms
    assert loudness.max() > 0.05 and (loudness < 0.01).mean() > 0.1  # voiced syllables and pauses
    with pytest.raises(InputError, match="--seconds"):
        write_demo_inputs(tmp_path, seconds=0)


def test_run_demo_writes_a_video_with_audio(demo_folder, tmp_path, capsys):
    from keyface.media import probe_media, read_video

    out = run_demo(tmp_path / "demo.mp4", seconds=1.0)  # default weights folder: the one of the fixture
    info = probe_media(out)
    assert info.video.num_frames == 25 and info.video.fps == 25
    assert (info.video.width, info.video.height) == (TINY.image_size, TINY.image_size)
    assert info.audio is not None and abs(info.audio.duration - 1.0) < 0.07
    frames = read_video(out).astype(np.float32)
    assert frames.std() > 10 and np.abs(np.diff(frames, axis=0)).mean() > 1  # visible noise that moves
    printed = capsys.readouterr().out
    assert str(demo_folder) in printed and "noise" in printed and "README" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.mp4"]  # job folder removed


def test_demo_audio_encoders_are_in_the_released_unilm_layout(fixture_set, demo_folder):
    """WavLM and BEATs are written under the release names with the inverse of the loaders' renaming: the same
    key layout as the released files (layer numbers aside), and the renaming round-trips exactly."""
    from keyface.audio.beats import BEATsConfig, beats_state_dict_from_unilm, beats_state_dict_to_unilm
    from keyface.audio.wavlm import wavlm_state_dict_from_unilm, wavlm_state_dict_to_unilm
    from keyface.audio.weights import BEATS_FILE, WAVLM_FILE, read_unilm_checkpoint

    def released(name):
        return read_unilm_checkpoint(fixture_set / "checkpoints" / "audio" / name, name, "fixture")

    def layout(keys):  # key names with layer numbers blanked: independent of the sizes
        return {re.sub(r"\.\d+\.", ".N.", key) for key in keys}

    beats = released(BEATS_FILE)
    config = BEATsConfig.from_cfg(beats.cfg)
    without_classifier = {k: v for k, v in beats.state_dict.items() if not k.startswith("predictor.")}
    back = beats_state_dict_to_unilm(beats_state_dict_from_unilm(beats.state_dict, config, "fixture"), config)
    assert back.keys() == without_classifier.keys()
    assert all(torch.equal(back[k], v) for k, v in without_classifier.items())

    wavlm = released(WAVLM_FILE)
    used = {k: v for k, v in wavlm.state_dict.items() if k not in ("mask_emb", "label_embs_concat")}
    back = wavlm_state_dict_to_unilm(wavlm_state_dict_from_unilm(wavlm.state_dict), wavlm.cfg)
    assert back.keys() == used.keys() and all(torch.equal(back[k], v) for k, v in used.items())

    for name, expected in ((BEATS_FILE, without_classifier), (WAVLM_FILE, used)):
        demo = read_unilm_checkpoint(demo_folder / "audio" / name, name, "demo")  # a weights_only .pt
        assert layout(demo.state_dict) == layout(expected), name


def test_weights_only_fills_an_empty_models_folder_and_refuses_a_real_one(tmp_path, capsys):
    from keyface.cli import EXIT_USER_ERROR, main
    from keyface.loading import find_model_files

    comfy_models = tmp_path / "ComfyUI" / "models" / "keyface"
    comfy_models.mkdir(parents=True)
    assert main(["demo", "--weights-only", "--models", str(comfy_models)]) == 0
    assert "noise" in capsys.readouterr().out and not list(tmp_path.glob("*.mp4"))
    files = find_model_files(comfy_models)
    assert files.keyframe.name == "keyframe.safetensors" and (files.audio / "WavLM-Base+.pt").is_file()

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keyframe.pt").write_bytes(b"weights")
    assert main(["demo", "--weights-only", "--models", str(tmp_path / "real")]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a KeyFace demo weights folder" in error
