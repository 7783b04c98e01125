"""The core VIDEO type in and out: Video Combine's ``video`` output read back through the core type's API
(``get_components``, ``get_dimensions``, ``get_duration``), Load Audio taking its sound from a core VIDEO, and
Crop Face and the Keyframe Sampler taking a core VIDEO's first frame as the portrait."""

from __future__ import annotations

import io
import math

import pytest
import torch
from comfy_api.v0_0_2 import Input, InputImpl, Types
from test_nodes import NODES, SPEECH_FILE, comfy_root, host, model, run, workspace  # noqa: F401 (fixtures)

from keyface.errors import InputError

FRAMES, SIDE, FPS, RATE = 20, 48, 10.0, 16000


@pytest.fixture
def output_folder(tmp_path):
    host.configure(output=tmp_path)
    yield tmp_path
    host.configure(output=None)


def gradient_frames() -> torch.Tensor:
    """(FRAMES, SIDE, SIDE, 3) frames whose brightness rises frame by frame (so order is checkable)."""
    ramp = torch.linspace(0.1, 0.9, FRAMES)[:, None, None, None]
    return ramp.expand(FRAMES, SIDE, SIDE, 3).contiguous()


def tone(seconds: float) -> dict:
    samples = int(seconds * RATE)
    waveform = 0.3 * torch.sin(2 * math.pi * 220 * torch.arange(samples) / RATE)
    return {"waveform": waveform[None, None].repeat(1, 2, 1), "sample_rate": RATE}


def test_video_combine_outputs_the_written_mp4_as_a_core_video(output_folder):
    result = run("KeyFaceVideoCombine", images=gradient_frames(), audio=tone(FRAMES / FPS), fps=FPS, crf=0)
    (video,) = result["result"]
    (shown,) = result["ui"]["images"]
    assert isinstance(video, Input.Video) and isinstance(video, InputImpl.VideoFromFile)
    assert video.get_stream_source() == str(output_folder / shown["subfolder"] / shown["filename"])
    assert video.get_dimensions() == (SIDE, SIDE)
    assert video.get_duration() == pytest.approx(FRAMES / FPS, abs=0.15)
    components = video.get_components()
    assert isinstance(components, Types.VideoComponents)
    assert components.images.shape == (FRAMES, SIDE, SIDE, 3) and components.frame_rate == FPS
    brightness = components.images.mean(dim=(1, 2, 3))
    assert torch.allclose(brightness, torch.linspace(0.1, 0.9, FRAMES), atol=0.02)
    audio = components.audio
    assert audio["sample_rate"] > 0 and audio["waveform"].shape[:2] == (1, 2)
    assert audio["waveform"].shape[-1] / audio["sample_rate"] == pytest.approx(FRAMES / FPS, abs=0.1)
    assert NODES["KeyFaceVideoCombine"].RETURN_NAMES == ["video"]


def test_load_audio_takes_the_sound_of_a_core_video(output_folder):
    (video,) = run("KeyFaceVideoCombine", images=gradient_frames(), audio=tone(FRAMES / FPS), fps=FPS)["result"]
    load_audio = NODES["KeyFaceLoadAudio"]
    clip = load_audio.clip(None, 0.5, 1.0, None, video)
    assert clip.duration_seconds == pytest.approx(1.0, abs=0.01)
    assert clip.waveform.abs().max() > 0.1  # the tone, not silence
    with pytest.raises(InputError, match="^video / audio_input: connect one of them"):
        load_audio.clip(None, 0.0, 0.0, tone(1.0), video)
    silent = InputImpl.VideoFromComponents(Types.VideoComponents(images=gradient_frames(), frame_rate=FPS, audio=None))
    with pytest.raises(InputError, match="^video: the connected video has no sound track"):
        load_audio.clip(None, 0.0, 0.0, None, silent)
    assert load_audio.validate_inputs(audio="missing.wav", video=None) is True  # a connected video wins


# ------------------------------------------------------------------------------------ a VIDEO as the portrait


def portrait_clip(frames: int = 6) -> torch.Tensor:
    """(frames, SIDE, SIDE + 16, 3): a smooth portrait-like first frame (survives H.264), then darker frames."""
    rows, columns = torch.meshgrid(torch.linspace(0, 1, SIDE), torch.linspace(0, 1, SIDE + 16), indexing="ij")
    first = torch.stack([rows, columns, (rows + columns) / 2], dim=-1)
    return torch.stack([first * (1.0 - 0.15 * i) for i in range(frames)])


@pytest.fixture
def portrait_mp4(tmp_path) -> str:
    path = tmp_path / "portrait.mp4"
    InputImpl.VideoFromComponents(Types.VideoComponents(images=portrait_clip(), frame_rate=FPS)).save_to(str(path))
    return str(path)


def first_frame_as_image(video) -> torch.Tensor:
    return video.get_components().images[:1].float()


def test_portrait_inputs_take_an_image_or_a_core_video():
    for node_id in ("KeyFaceCropFace", "KeyFaceKeyframeSampler"):
        required = NODES[node_id].INPUT_TYPES()["required"]
        kind, options = required["image"]
        assert kind == "IMAGE,VIDEO" and "first frame" in options["tooltip"], node_id
        assert list(required).index("image") == (0 if node_id == "KeyFaceCropFace" else 1)


def test_crop_face_of_a_file_video_decodes_only_its_first_frame(portrait_mp4, monkeypatch):
    video = InputImpl.VideoFromFile(portrait_mp4)
    expected = run("KeyFaceCropFace", image=first_frame_as_image(video), mode="center", crop_size=64)
    monkeypatch.setattr(InputImpl.VideoFromFile, "get_components", lambda self: pytest.fail("decoded whole"))
    face, crop, info = run("KeyFaceCropFace", image=video, mode="center", crop_size=64)
    assert face.shape == (1, 64, 64, 3) and torch.equal(face, expected[0])
    assert crop.original.shape == (SIDE, SIDE + 16, 3) and info == expected[2]
    with open(portrait_mp4, "rb") as file:  # a VIDEO held in memory (BytesIO), as an upload can be
        in_memory = InputImpl.VideoFromFile(io.BytesIO(file.read()))
    assert torch.equal(run("KeyFaceCropFace", image=in_memory, mode="center", crop_size=64)[0], face)


def test_crop_face_of_a_video_made_of_frames_uses_the_first():
    clip = portrait_clip()
    video = InputImpl.VideoFromComponents(Types.VideoComponents(images=clip, frame_rate=FPS))
    face = run("KeyFaceCropFace", image=video, mode="center", crop_size=64)[0]
    assert torch.equal(face, run("KeyFaceCropFace", image=clip[:1], mode="center", crop_size=64)[0])
    assert not torch.equal(face, run("KeyFaceCropFace", image=clip[1:2], mode="center", crop_size=64)[0])


def test_a_video_without_frames_is_refused_in_one_line(tmp_path):
    empty = InputImpl.VideoFromComponents(
        Types.VideoComponents(images=torch.zeros(0, SIDE, SIDE, 3), frame_rate=FPS, audio=tone(1.0))
    )
    sound_only = tmp_path / "sound.m4a"
    import av

    with av.open(str(sound_only), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=RATE)
        samples = tone(0.5)["waveform"][0, :1].numpy()
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = RATE, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    cases = [
        (empty, "^image: the connected video has no frames"),
        (InputImpl.VideoFromFile(str(sound_only)), "^image: the connected video has no picture, only sound"),
        (InputImpl.VideoFromFile(str(broken)), "^image: the connected video cannot be read"),
        (InputImpl.VideoFromFile(str(tmp_path / "gone.mp4")), "^image: the connected video cannot be read"),
    ]
    for video, expected in cases:
        for node_id in ("KeyFaceCropFace", "KeyFaceKeyframeSampler"):
            inputs = {"model": None, "audio": object()} if node_id == "KeyFaceKeyframeSampler" else {}
            with pytest.raises(InputError, match=expected) as raised:
                run(node_id, image=video, **inputs)
            assert "\n" not in str(raised.value), node_id


def test_the_sampler_takes_a_video_as_the_portrait(model, portrait_mp4, monkeypatch):  # noqa: F811 (fixture)
    """The first frame of the VIDEO is the identity: the same job (identity latent, keyframes) as that frame as an
    IMAGE. The second run finds the first run's job folder, whose name is the fingerprint of the identity."""
    features = run("KeyFaceLoadAudio", model=model, audio=SPEECH_FILE)[1]
    video = InputImpl.VideoFromFile(portrait_mp4)
    as_image, images = run(
        "KeyFaceKeyframeSampler", model=model, image=first_frame_as_image(video), audio=features, keyframe_image_size=0
    )
    monkeypatch.setattr(InputImpl.VideoFromFile, "get_components", lambda self: pytest.fail("decoded whole"))
    as_video, _ = run("KeyFaceKeyframeSampler", model=model, image=video, audio=features, keyframe_image_size=0)
    assert as_video.job.folder.path == as_image.job.folder.path
    assert torch.equal(as_video.job.conditioning.identity_latent, as_image.job.conditioning.identity_latent)
