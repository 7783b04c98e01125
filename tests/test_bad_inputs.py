"""The bad-input matrix of ``python -m keyface generate`` (issue 12), on the tiny demo weights.

Every refused case must exit with status 2 and print exactly one ``error:`` line naming the input (its flag or
its file), no traceback, and leave nothing under the output name nor any temporary file beside it. Every
unusual but valid input (silence, 8 channels at 96 kHz, mp3, an RGBA or 16-bit picture, ...) must produce a
playable mp4 with one frame per 40 ms of audio and nothing else beside it.

The cases run the CLI's entry point in-process (:func:`keyface.cli.main`: same exit status, same stderr; an
exception that is not a :class:`~keyface.errors.KeyFaceError` fails the test, as its traceback would reach the
user) and share one model load, so the whole matrix takes about 1.5 minutes of CPU time. Two cases run as real
subprocesses to show that the process behaves as the in-process entry point. Inputs are made with numpy, PyAV
and Pillow (no ffmpeg binary); audio is 0.4 s long (10 frames: one keyframe batch, one segment).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import require_face_detector
from PIL import Image

from keyface.cli import EXIT_USER_ERROR, main
from keyface.constants import VIDEO_FPS
from keyface.demo import draw_portrait

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK = 0
SECONDS = 0.4  # 10 frames
SAMPLE_RATE = 16_000
PORTRAIT_SIDE = 96
CHEAP = ("--steps", "10")  # the fewest steps the sampler accepts
AAC_FRAME = 1024  # samples


# ---- inputs ------------------------------------------------------------------------------------------------------


def speech(seconds: float = SECONDS, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """``(channels, samples)`` float32 in [-1, 1]: a 180 Hz tone with a syllable-rate (4 Hz) envelope."""
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


def _audio_stream(container, codec: str, sample_rate: int):
    stream = container.add_stream(codec, rate=sample_rate)
    stream.layout = "mono"
    return stream


def _encode_audio(container, stream, samples: np.ndarray, sample_rate: int) -> None:
    """Encode mono ``samples`` ``(1, n)`` into ``stream`` of ``container``."""
    frame_size = stream.codec_context.frame_size or 1024
    resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=sample_rate)
    planar = np.ascontiguousarray(samples[:1], dtype=np.float32)
    for start in range(0, planar.shape[1], frame_size):
        frame = av.AudioFrame.from_ndarray(planar[:, start : start + frame_size], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        for converted in resampler.resample(frame):
            for packet in stream.encode(converted):
                container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_encoded_audio(path: Path, codec: str, samples: np.ndarray, sample_rate: int = 48_000) -> Path:
    """Mono audio encoded with PyAV's ``codec`` into the container chosen by ``path``'s extension."""
    with av.open(str(path), "w") as container:
        _encode_audio(container, _audio_stream(container, codec, sample_rate), samples, sample_rate)
    return path


def write_video(path: Path, with_audio: bool, seconds: float = SECONDS) -> Path:
    """An h264 mp4 of the drawn portrait (64 px, 25 fps), with an AAC track of ``seconds`` or without audio."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("h264", rate=VIDEO_FPS)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        track = _audio_stream(container, "aac", 48_000) if with_audio else None  # every stream before muxing
        picture = av.VideoFrame.from_ndarray(draw_portrait(64), format="rgb24")
        for _ in range(round(seconds * VIDEO_FPS)):
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if track is not None:
            _encode_audio(container, track, speech(seconds, 48_000), 48_000)
    return path


def write_image(path: Path, array: np.ndarray) -> Path:
    """uint8 (h, w[, 3|4]) or uint16 (h, w) -> png (uint16: a 16-bit greyscale png)."""
    Image.fromarray(array).save(path, compress_level=1)
    return path


def portrait(side: int = PORTRAIT_SIDE) -> np.ndarray:
    return draw_portrait(side)


def truncated(source: Path, target: Path, keep: int | float) -> Path:
    """``target``: the first ``keep`` bytes (an int) or fraction (a float) of ``source``."""
    data = source.read_bytes()
    target.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return target


def text_file(path: Path, text: str = "not what the name says\n") -> Path:
    path.write_text(text)
    return path


class EvilPayload:
    """Unpickling this creates ``marker``: shows whether a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What a case may build on: a scratch folder, the valid inputs, the demo models, the real photo."""

    scratch: Path
    image: Path
    audio: Path
    models: Path
    photo: Path

    def models_with(self, changes: dict[str, Callable[[Path], object] | None]) -> Path:
        """A models folder of links to the demo models in which each ``changes`` entry (a relative path, file or
        folder) is left out (``None``) or written by the callable instead."""
        folder = self.scratch / "models"
        for entry in sorted(self.models.rglob("*")):
            relative = entry.relative_to(self.models)
            if entry.is_dir() or any(relative.is_relative_to(key) for key in changes):
                continue
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).symlink_to(entry)
        for relative, write in changes.items():
            if write is not None:
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                write(folder / relative)
        return folder


@dataclass
class Case:
    """``build`` returns the flags (flag -> value) replacing or adding to the valid arguments; ``names`` the texts
    the error line (refused) or stderr (valid) must contain and ``absent`` those it must not; ``early``: refused
    before any model is loaded; ``seconds``: the length of the audio a valid case gives."""

    build: Callable[[Inputs], dict]
    names: Callable[[Inputs, dict], list[str]]
    early: bool = True
    needs_detector: bool = False
    marks: tuple = ()
    seconds: float = SECONDS
    absent: tuple[str, ...] = ()


def file_of(flag: str) -> Callable[[Inputs, dict], list[str]]:
    return lambda inputs, args: [Path(args[flag]).name]


def texts(*words: str) -> Callable[[Inputs, dict], list[str]]:
    return lambda inputs, args: list(words)


def audio(make: Callable[[Path], Path]) -> Callable[[Inputs], dict]:
    return lambda inputs: {"--audio": make(inputs.scratch)}


def image(make: Callable[[Path], Path]) -> Callable[[Inputs], dict]:
    return lambda inputs: {"--image": make(inputs.scratch)}


def models(changes: Callable[[Inputs], dict]) -> Callable[[Inputs], dict]:
    return lambda inputs: {"--models": inputs.models_with(changes(inputs))}


def _two_faces(folder: Path, photo: Path) -> Path:
    with Image.open(photo) as source:
        face = np.asarray(source.convert("RGB").resize((256, 256)))
    return write_image(folder / "two-faces.png", np.concatenate([face, face], axis=1))


def _pickled_stage(marker: Path) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        torch.save({"module": {"weight": torch.zeros(2)}, "payload": EvilPayload(marker)}, target)

    return write


def _swapped(inputs: Inputs) -> dict:
    return {
        "keyframe.safetensors": lambda t: t.symlink_to(inputs.models / "interpolation.safetensors"),
        "interpolation.safetensors": lambda t: t.symlink_to(inputs.models / "keyframe.safetensors"),
    }


REFUSED: dict[str, Case] = {
    # -- audio
    "audio 0 bytes": Case(audio(lambda f: text_file(f / "empty.wav", "")), file_of("--audio")),
    "audio text renamed .wav": Case(audio(lambda f: text_file(f / "notes.wav")), file_of("--audio")),
    "audio truncated header": Case(
        audio(lambda f: truncated(write_wav(f / "full.wav", speech()), f / "header-cut.wav", 20)), file_of("--audio")
    ),
    "audio video without track": Case(audio(lambda f: write_video(f / "mute.mp4", False)), file_of("--audio")),
    "audio missing": Case(lambda inputs: {"--audio": inputs.scratch / "absent.wav"}, file_of("--audio")),
    # -- image
    "image text": Case(image(lambda f: text_file(f / "notes.png")), file_of("--image")),
    "image corrupt": Case(
        image(lambda f: truncated(write_image(f / "full.png", portrait()), f / "cut.png", 0.4)), file_of("--image")
    ),
    "image 0 bytes": Case(image(lambda f: text_file(f / "empty.jpg", "")), file_of("--image")),
    "image no face": Case(
        lambda inputs: {
            "--image": write_image(inputs.scratch / "wall.png", np.full((256, 256, 3), 128, np.uint8)),
            "--crop": "auto",
        },
        file_of("--image"),
        needs_detector=True,
    ),
    "image face index out of range": Case(
        lambda inputs: {"--image": _two_faces(inputs.scratch, inputs.photo), "--crop": "auto", "--face-index": "5"},
        texts("--face-index", "2 face(s)"),
        needs_detector=True,
    ),
    "crop box malformed": Case(lambda inputs: {"--crop": "10,20"}, texts("--crop")),
    # -- sampling parameters
    "steps below 10": Case(lambda inputs: {"--steps": "5"}, texts("--steps")),
    "steps not a number": Case(lambda inputs: {"--steps": "ten"}, texts("--steps")),
    "seed not a number": Case(lambda inputs: {"--seed": "abc"}, texts("--seed")),
    "seed too large": Case(lambda inputs: {"--seed": str(2**70)}, texts("--seed")),
    "seed negative": Case(lambda inputs: {"--seed": "-3"}, texts("--seed")),
    "audio scale negative": Case(lambda inputs: {"--audio-scale": "-1"}, texts("--audio-scale")),
    "audio scale nan": Case(lambda inputs: {"--audio-scale": "nan"}, texts("--audio-scale")),
    "identity scale inf": Case(lambda inputs: {"--identity-scale": "inf"}, texts("--identity-scale")),
    "autoguidance scale nan": Case(lambda inputs: {"--autoguidance-scale": "nan"}, texts("--autoguidance-scale")),
    "segments per call 0": Case(lambda inputs: {"--segments-per-call": "0"}, texts("--segments-per-call")),
    "fps 30": Case(lambda inputs: {"--fps": "30"}, texts("fps")),
    # -- emotion forms
    "emotion unknown name": Case(lambda inputs: {"--emotion": "furious"}, texts("furious")),
    "emotion broken timed list": Case(
        lambda inputs: {"--emotion": "neutral at x s, happy at"}, texts("--emotion", "NAME at SECONDS s")
    ),
    "emotion broken json": Case(lambda inputs: {"--emotion": '{"format": '}, texts("--emotion", "JSON")),
    "emotion missing file": Case(
        lambda inputs: {"--emotion": str(inputs.scratch / "curve.json")},
        texts("--emotion", "curve.json", "not found"),
        absent=("unknown emotion",),
    ),
    # -- output
    "output is a folder": Case(
        lambda inputs: {"--out": _folder(inputs.scratch / "out" / "clip.mp4")}, texts("clip.mp4", "is a folder")
    ),
    "output parent missing": Case(lambda inputs: {"--out": inputs.scratch / "nowhere" / "video.mp4"}, texts("nowhere")),
    "output wrong extension": Case(lambda inputs: {"--out": inputs.scratch / "out" / "video.txt"}, texts("video.txt")),
    "crf too large": Case(lambda inputs: {"--crf": "99"}, texts("--crf")),
    "crf negative": Case(lambda inputs: {"--crf": "-1"}, texts("--crf")),
    # -- where and how to run
    "device unknown": Case(lambda inputs: {"--device": "tpu"}, texts("device", "tpu")),
    "device cuda without a gpu": Case(
        lambda inputs: {"--device": "cuda"},
        texts("device", "cuda"),
        marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),),
    ),
    "precision unknown": Case(lambda inputs: {"--precision": "int8"}, texts("--precision")),
    # -- checkpoints
    "models folder missing": Case(lambda inputs: {"--models": inputs.scratch / "no-models"}, texts("no-models")),
    "checkpoint stages swapped": Case(models(_swapped), texts("keyframe.safetensors"), early=False),
    "checkpoint truncated": Case(
        models(lambda i: {"keyframe.safetensors": lambda t: truncated(i.models / "keyframe.safetensors", t, 0.5)}),
        texts("keyframe.safetensors"),
        early=False,
    ),
    "checkpoint text": Case(
        models(lambda i: {"keyframe.safetensors": text_file}), texts("keyframe.safetensors"), early=False
    ),
    "checkpoint text named .pt": Case(  # damaged, not "holds objects": converting it would not help
        models(lambda i: {"keyframe.safetensors": None, "keyframe.pt": text_file}),
        texts("keyframe.pt", "not a checkpoint"),
        early=False,
        absent=("convert",),
    ),
    "checkpoint malicious pickle": Case(
        models(lambda i: {"keyframe.safetensors": None, "keyframe.pt": _pickled_stage(i.scratch / "pwned")}),
        texts("keyframe.pt", "python -m keyface convert"),
        early=False,
    ),
    "vae missing": Case(models(lambda i: {"vae": None}), texts("vae")),
    "vae weights text": Case(
        models(lambda i: {"vae/diffusion_pytorch_model.safetensors": text_file}),
        texts("diffusion_pytorch_model.safetensors"),
        early=False,
    ),
    "encoder missing": Case(models(lambda i: {"audio/WavLM-Base+.pt": None}), texts("WavLM-Base+.pt"), early=False),
    "encoder text": Case(
        models(lambda i: {"audio/WavLM-Base+.pt": text_file}),
        texts("WavLM-Base+.pt", "not a checkpoint"),
        early=False,
        absent=("convert",),
    ),
    "encoder truncated": Case(
        models(lambda i: {"audio/WavLM-Base+.pt": lambda t: truncated(i.models / "audio/WavLM-Base+.pt", t, 0.5)}),
        texts("WavLM-Base+.pt"),
        early=False,
    ),
    "encoder malicious pickle": Case(
        models(lambda i: {"audio/WavLM-Base+.pt": _pickled_stage(i.scratch / "pwned")}),
        texts("WavLM-Base+.pt", "python -m keyface convert"),
        early=False,
    ),
}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# Valid inputs: each must give a playable mp4. Several unusual inputs share a run where they are independent.
VALID: dict[str, Case] = {
    "audio silence + image RGBA": Case(
        lambda inputs: {
            "--audio": write_wav(inputs.scratch / "silence.wav", np.zeros((1, round(SECONDS * SAMPLE_RATE)))),
            "--image": write_image(
                inputs.scratch / "rgba.png", np.dstack([portrait(), np.full(portrait().shape[:2], 90, np.uint8)])
            ),
        },
        texts(),
    ),
    "audio 0.1 s + image grey": Case(
        lambda inputs: {
            "--audio": write_wav(inputs.scratch / "short.wav", speech(0.1)),
            "--image": write_image(inputs.scratch / "grey.png", portrait().mean(2).astype(np.uint8)),
        },
        texts(),
        seconds=0.1,
    ),
    "audio 8 ch 96 kHz + image 16-bit": Case(
        lambda inputs: {
            "--audio": write_wav(inputs.scratch / "8ch.wav", speech(SECONDS, 96_000, 8), 96_000),
            "--image": write_image(inputs.scratch / "deep.png", (portrait().mean(2) * 257).astype(np.uint16)),
        },
        texts(),
    ),
    "audio truncated data + image 32 px": Case(
        lambda inputs: {
            "--audio": truncated(  # the header says 0.8 s, the data holds the first 0.4 s
                write_wav(inputs.scratch / "full.wav", speech(2 * SECONDS)), inputs.scratch / "cut.wav", 0.5
            ),
            "--image": write_image(inputs.scratch / "tiny.png", portrait(32)),
        },
        texts("enlarged"),  # the one warning line says the crop is enlarged
    ),
    "audio mp3 + image 8000 px": Case(
        lambda inputs: {
            "--audio": write_encoded_audio(inputs.scratch / "speech.mp3", "mp3", speech(SECONDS, 48_000), 48_000),
            "--image": write_image(
                inputs.scratch / "huge.png",
                np.asarray(Image.fromarray(portrait()).resize((8000, 8000), Image.Resampling.NEAREST)),
            ),
        },
        texts(),
    ),
    "audio flac + emotion timed list + crf 30": Case(
        lambda inputs: {
            "--audio": write_encoded_audio(inputs.scratch / "speech.flac", "flac", speech(SECONDS, 48_000), 48_000),
            "--emotion": "neutral at 0 s, happy at 0.2 s",
            "--crf": "30",
        },
        texts(),
    ),
    "audio ogg + emotion json file + seed 7": Case(
        lambda inputs: {
            "--audio": write_encoded_audio(inputs.scratch / "speech.ogg", "libopus", speech(SECONDS, 48_000), 48_000),
            "--emotion": str(
                text_file(
                    inputs.scratch / "curve.json",
                    '{"format": "keyface-emotion-v1", "valence": [[0, -0.5], [0.4, 0.5]], "arousal": [[0, 0.3]]}',
                )
            ),
            "--seed": "7",
        },
        texts(),
    ),
    "audio m4a + precision fp32 + device cpu": Case(
        lambda inputs: {
            "--audio": write_encoded_audio(inputs.scratch / "speech.m4a", "aac", speech(SECONDS, 48_000), 48_000),
            "--precision": "fp32",
            "--device": "cpu",
        },
        texts(),
    ),
    "audio video with track": Case(audio(lambda f: write_video(f / "talk.mp4", True)), texts()),
    "image two faces": Case(
        lambda inputs: {"--image": _two_faces(inputs.scratch, inputs.photo), "--crop": "auto"},
        texts("2 faces found", "--face-index"),  # the one warning line names the flag that picks another face
        needs_detector=True,
    ),
}


# ---- running ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("valid-inputs")
    return write_image(folder / "portrait.png", portrait()), write_wav(folder / "speech.wav", speech())


@pytest.fixture(scope="module")
def shared_model_load():
    """Load the demo models (and audio encoders) once for the module: the valid cases differ only in inputs.
    Each cached load is the result of the real loader, so the checkpoints' checks run on the first load."""
    import keyface.loading
    from keyface.audio.features import AudioFeatureExtractor

    load_models, from_folder = keyface.loading.load_models, AudioFeatureExtractor.from_folder.__func__
    loaded, extractors = {}, {}

    def cached_load_models(files, device="cpu", dtype=torch.float32):
        key = (files, str(device), dtype)
        if key not in loaded:
            loaded[key] = load_models(files, device, dtype)
        return loaded[key]

    def cached_from_folder(cls, folder, **kwargs):
        key = (str(folder), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in extractors:
            extractors[key] = from_folder(cls, folder, **kwargs)
        return extractors[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keyface.loading, "load_models", cached_load_models)
        patch.setattr(AudioFeatureExtractor, "from_folder", classmethod(cached_from_folder))
        yield


def _argv(arguments: dict) -> list[str]:
    return ["generate", *CHEAP, *(str(x) for item in arguments.items() for x in item)]


def _generate(arguments: dict, capsys) -> tuple[int, str]:
    """Run the CLI in-process: (exit status, stderr). argparse's refusals exit through SystemExit."""
    try:
        status = main(_argv(arguments))
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def _setup(case: Case, demo_models: Path, valid_inputs, portrait_path: Path, tmp_path: Path) -> tuple[Inputs, dict]:
    if case.needs_detector:
        require_face_detector()
    (tmp_path / "out").mkdir()
    image_path, audio_path = valid_inputs
    inputs = Inputs(tmp_path, image_path, audio_path, demo_models, portrait_path)
    valid = {"--image": image_path, "--audio": audio_path, "--out": tmp_path / "out" / "video.mp4"}
    return inputs, {**valid, "--models": demo_models, **case.build(inputs)}


def _leftovers(out: Path) -> set[str]:
    """Names in the output's folder other than a folder given as the output itself."""
    if not out.parent.is_dir():
        return set()
    return {p.name for p in out.parent.iterdir()} - ({out.name} if out.is_dir() else set())


def assert_refused(status: int, err: str, case: Case, inputs: Inputs, arguments: dict) -> None:
    assert "Traceback" not in err, err
    assert status == EXIT_USER_ERROR, err
    lines = err.strip().splitlines()
    if lines and ": error: argument" in lines[-1]:  # argparse: the usage, then one line naming the flag
        lines = lines[-1:]
    lines = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) == 1 and "error: " in lines[0], err
    for text in case.names(inputs, arguments):
        assert text in lines[0], err
    for text in case.absent:
        assert text not in lines[0], err
    for flag in ("--image", "--audio"):  # an input file is named once, without FFmpeg's error number
        named = lines[0].count(str(arguments[flag]))
        assert named <= 1 and not (named and "[Errno" in lines[0]), err
    assert _leftovers(Path(arguments["--out"])) == set()
    assert not (inputs.scratch / "pwned").exists(), "a pickled payload ran while the weights were loaded"


def _decoded_frames(path: Path) -> tuple[int, float, int]:
    """(video frames, audio seconds, audio sample rate) of an mp4, decoding every frame."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        samples, rate = 0, container.streams.audio[0].rate
        for frame in container.decode(audio=0):
            samples += frame.samples
    return frames, samples / rate, rate


def expected_frames(audio_path: Path) -> int:
    """One frame per started 40 ms of the decoded audio (as the library decodes it)."""
    from keyface.audio.io import load_audio, num_video_frames

    clip = load_audio(audio_path)
    return num_video_frames(math.ceil(clip.num_samples * SAMPLE_RATE / clip.sample_rate))


def _params(cases: dict[str, Case]) -> list:
    return [pytest.param(name, id=name.replace(" ", "-"), marks=case.marks) for name, case in cases.items()]


@pytest.mark.parametrize("name", _params(REFUSED))
def test_generate_refuses(name, demo_models, valid_inputs, portrait_path, tmp_path, capsys, monkeypatch):
    case = REFUSED[name]
    inputs, arguments = _setup(case, demo_models, valid_inputs, portrait_path, tmp_path)
    if case.early:  # bad input is refused before any heavy work
        import keyface.loading

        def refuse(*args, **kwargs):
            raise AssertionError("models were loaded before the bad input was refused")

        monkeypatch.setattr(keyface.loading, "load_models", refuse)
    status, err = _generate(arguments, capsys)
    assert_refused(status, err, case, inputs, arguments)


@pytest.mark.parametrize("name", _params(VALID))
def test_generate_accepts(name, demo_models, valid_inputs, portrait_path, tmp_path, capsys, shared_model_load):
    case = VALID[name]
    inputs, arguments = _setup(case, demo_models, valid_inputs, portrait_path, tmp_path)
    status, err = _generate(arguments, capsys)
    assert "Traceback" not in err and "Warning:" not in err, err  # warnings are clean one-line messages
    assert status == EXIT_OK, err
    out = Path(arguments["--out"])
    assert _leftovers(out) == {out.name}  # no job folder, no temporary file
    frames, audio_seconds, rate = _decoded_frames(out)
    expected = expected_frames(Path(arguments["--audio"]))
    # the decoder's count of samples, within one frame of the length written (codecs pad a few ms)
    assert abs(expected - math.ceil(case.seconds * VIDEO_FPS)) <= 1, expected
    assert frames == expected
    assert abs(audio_seconds - frames / VIDEO_FPS) <= AAC_FRAME / rate  # the audio as long as the video
    if "--emotion" in arguments:  # the curve travels with the video, for python -m keyface evaluate
        from keyface.emotion import parse_emotion
        from keyface.evaluate.report import emotion_from_metadata
        from keyface.generate import read_emotion_argument
        from keyface.media import probe_media

        curve = parse_emotion(read_emotion_argument(arguments["--emotion"]))
        emotion = emotion_from_metadata(probe_media(out).metadata, frames, VIDEO_FPS)
        assert emotion is not None and emotion["valence"] == pytest.approx(list(curve.values_at(np.zeros(1))[0]))
    for text in case.names(inputs, arguments):
        assert text in err, err


def _subprocess(arguments: dict) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "keyface", *_argv(arguments)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)


@pytest.mark.parametrize("name", ["checkpoint malicious pickle", "seed not a number"])
def test_the_real_process_refuses_like_the_entry_point(name, demo_models, valid_inputs, portrait_path, tmp_path):
    case = REFUSED[name]
    inputs, arguments = _setup(case, demo_models, valid_inputs, portrait_path, tmp_path)
    result = _subprocess(arguments)
    assert_refused(result.returncode, result.stderr, case, inputs, arguments)
