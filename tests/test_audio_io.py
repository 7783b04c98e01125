"""Decoding, ComfyUI AUDIO dicts, channel policy, 16 kHz frames and bad audio inputs (keyface.audio.io)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import torchaudio.functional
from safetensors.torch import load_file

from keyface.audio.io import (
    AudioClip,
    as_audio_clip,
    load_audio,
    num_video_frames,
    pad_to_frames,
    raw_audio_frames,
    to_encoder_waveform,
)
from keyface.constants import SAMPLES_PER_FRAME
from keyface.errors import InputError

FIXTURE_CLIPS = [("audio_clip16k_mono", "clip16k_mono.wav"), ("audio_clip44k_stereo", "clip44k_stereo.wav")]


def two_tones(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A stereo test signal (2, samples): 440 Hz left, 220 Hz right, different levels."""
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 220 * t)]).astype(np.float32)


def write_audio(path, waveform: np.ndarray, rate: int, codec: str, with_video: bool = False) -> None:
    """Encode ``waveform`` (channels, samples) with PyAV (optionally next to a short video stream)."""
    container = av.open(str(path), "w")
    video = None
    if with_video:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "stereo" if waveform.shape[0] == 2 else "mono"
    for start in range(0, waveform.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(waveform[:, start : start + 1024]), format="fltp", layout=stream.layout.name
        )
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    if video is not None:
        for index in range(5):
            image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            image.pts = index
            for packet in video.encode(image):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    container.close()


@pytest.mark.parametrize("clip_name, wav_name", FIXTURE_CLIPS)
def test_fixture_wav_decodes_like_torchaudio(fixture_set, clip_name, wav_name):
    expected = load_file(fixture_set / "audio" / f"{clip_name}.safetensors")
    clip = load_audio(fixture_set / "audio" / wav_name)
    assert clip.sample_rate == int(expected["sample_rate"])
    assert torch.equal(clip.waveform, expected["waveform"])


@pytest.mark.parametrize("clip_name, wav_name", FIXTURE_CLIPS)
def test_reference_waveform_and_raw_frames_match_fixture(fixture_set, clip_name, wav_name):
    expected = load_file(fixture_set / "audio" / f"{clip_name}.safetensors")
    clip = AudioClip(expected["waveform"], int(expected["sample_rate"]), clip_name)
    waveform = to_encoder_waveform(clip, "reference")
    frames = num_video_frames(waveform.shape[0])
    wavlm_input = expected["wavlm_input"][0]
    even_frames = frames + frames % 2
    assert wavlm_input.shape[0] == even_frames * SAMPLES_PER_FRAME
    torch.testing.assert_close(pad_to_frames(waveform, even_frames), wavlm_input, atol=1e-4, rtol=0)
    torch.testing.assert_close(raw_audio_frames(clip), expected["raw_audio_frames"], atol=1e-4, rtol=0)


def test_lossless_formats_round_trip(tmp_path):
    source = two_tones(44_100)
    for name, codec in [("tone.wav", "pcm_s16le"), ("tone.flac", "flac")]:
        write_audio(tmp_path / name, source, 44_100, codec)
        clip = load_audio(tmp_path / name)
        assert (clip.sample_rate, clip.num_channels, clip.num_samples) == (44_100, 2, source.shape[1])
        np.testing.assert_allclose(clip.waveform.numpy(), source, atol=1.5 / 32768)
        assert clip.source == str(tmp_path / name)


@pytest.mark.parametrize(
    "name, codec, rate, with_video",
    [
        ("tone.mp3", "libmp3lame", 44_100, False),
        ("tone.m4a", "aac", 44_100, False),
        ("tone.ogg", "libopus", 48_000, False),
        ("talk.mp4", "aac", 44_100, True),
    ],
)
def test_lossy_formats_and_video_audio_track(tmp_path, name, codec, rate, with_video):
    write_audio(tmp_path / name, two_tones(rate), rate, codec, with_video)
    clip = load_audio(tmp_path / name)
    assert clip.sample_rate == rate and clip.num_channels == 2
    assert abs(clip.duration_seconds - 1.0) < 0.1  # codec priming / padding only
    assert clip.waveform[0].abs().max() > 0.3  # the tone came through


def test_start_and_duration_trim_exactly(tmp_path):
    source = two_tones(16_000, 2.0)
    write_audio(tmp_path / "tone.wav", source, 16_000, "pcm_s16le")
    clip = load_audio(tmp_path / "tone.wav", start=0.5, duration=0.25)
    assert clip.num_samples == 4_000
    np.testing.assert_allclose(clip.waveform.numpy(), source[:, 8_000:12_000], atol=1.5 / 32768)
    tail = load_audio(tmp_path / "tone.wav", start=1.5)
    assert tail.num_samples == 8_000


def test_comfy_audio_round_trip_and_batch_refused():
    waveform = torch.from_numpy(two_tones(22_050))
    clip = AudioClip.from_comfy({"waveform": waveform[None], "sample_rate": 22_050})
    assert clip.sample_rate == 22_050 and torch.equal(clip.waveform, waveform)
    comfy = clip.to_comfy()
    assert comfy["waveform"].shape == (1, 2, 22_050) and comfy["sample_rate"] == 22_050
    assert as_audio_clip(comfy).num_samples == 22_050
    with pytest.raises(InputError, match="batch of 2"):
        AudioClip.from_comfy({"waveform": torch.zeros(2, 1, 100), "sample_rate": 16_000}, "audio input")
    with pytest.raises(InputError, match="AUDIO dict"):
        AudioClip.from_comfy({"samples": torch.zeros(1, 1, 100)})
    with pytest.raises(InputError, match="sample_rate"):
        AudioClip.from_comfy({"waveform": torch.zeros(1, 1, 100), "sample_rate": -5})


@pytest.mark.parametrize("samples, frames", [(1, 1), (639, 1), (640, 1), (641, 2), (1279, 2), (1280, 2), (1281, 3)])
def test_frame_count_around_boundaries(samples, frames):
    assert num_video_frames(samples) == frames
    padded = pad_to_frames(torch.ones(samples), frames)
    assert padded.shape == (frames * SAMPLES_PER_FRAME,)
    assert padded[:samples].eq(1).all() and padded[samples:].eq(0).all()


def test_channel_policy_default_averages_reference_keeps_first_channel():
    stereo = torch.from_numpy(two_tones(44_100))
    clip = AudioClip(stereo, 44_100)
    expected_mean = torchaudio.functional.resample(stereo.mean(0), 44_100, 16_000)
    expected_left = torchaudio.functional.resample(stereo[0], 44_100, 16_000)
    torch.testing.assert_close(to_encoder_waveform(clip), expected_mean)
    torch.testing.assert_close(to_encoder_waveform(clip, "reference"), expected_left)
    at_16k = AudioClip(torch.from_numpy(two_tones(16_000)), 16_000)
    torch.testing.assert_close(to_encoder_waveform(at_16k, "reference"), at_16k.waveform.mean(0))
    with pytest.raises(InputError, match="mode"):
        to_encoder_waveform(clip, "original")


def test_bad_audio_inputs_name_the_input(tmp_path):
    with pytest.raises(InputError, match="not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError, match="corrupt.mp3"):
        load_audio(corrupt)
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(InputError, match="notes.txt"):
        load_audio(text)
    silent_video = tmp_path / "silent.mp4"
    container = av.open(str(silent_video), "w")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    with pytest.raises(InputError, match="silent.mp4: the file has no audio track"):
        load_audio(silent_video)
    write_audio(tmp_path / "short.wav", two_tones(16_000, 0.5), 16_000, "pcm_s16le")
    with pytest.raises(InputError, match="short.wav: no audio samples after 2.0 s"):
        load_audio(tmp_path / "short.wav", start=2.0)
    with pytest.raises(InputError, match="start"):
        load_audio(tmp_path / "short.wav", start=-1)
    with pytest.raises(InputError, match="empty"):
        AudioClip(torch.zeros(1, 0), 16_000, "speech input")
    with pytest.raises(InputError, match="speech input: the audio contains NaN"):
        AudioClip(torch.tensor([[0.0, float("nan")]]), 16_000, "speech input")
    with pytest.raises(InputError, match="infinite"):
        AudioClip.from_comfy({"waveform": torch.tensor([[[0.0, float("inf")]]]), "sample_rate": 16_000})
    with pytest.raises(InputError, match="floating point"):
        AudioClip(torch.zeros(1, 10, dtype=torch.int16), 16_000)
    with pytest.raises(InputError, match="expected an audio file path"):
        as_audio_clip(42)
