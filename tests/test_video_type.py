"""The core VIDEO type in and out: Video Combine's ``video`` output read back through the core type's API
(``get_components``, ``get_dimensions``, ``get_duration``), and Load Audio taking its sound from a core VIDEO."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_api.v0_0_2 import Input, InputImpl, Types
from test_nodes import NODES, host, run

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
