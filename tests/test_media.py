"""keyface.media (reading media, stills, the frame -> sample rule) and the one ComfyUI AUDIO parser (issue 14)."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from keyface.audio.io import AudioClip
from keyface.errors import InputError
from keyface.media import (
    check_frame,
    iter_video_frames,
    probe_media,
    read_video,
    samples_for_frames,
    samples_spanning,
    write_image,
)
from keyface.video import AAC_SAMPLE_RATES, AudioTrack, Mp4Writer

# ---------------------------------------------------------------------------------------------------------
# the trimming rule


def test_samples_spanning_rounds_to_the_nearest_sample_despite_float_times():
    assert 0.07 * 44_100 == 3087.0000000000005 and 0.7 * 44_100 == 30869.999999999996  # ceil / floor: one off
    assert samples_spanning(0.07, 44_100) == 3_087 and samples_spanning(0.7, 44_100) == 30_870
    assert samples_spanning(0.3, 16_000) == 4_800
    assert samples_spanning(0.1, 44_100) == 4_410
    assert samples_spanning(Fraction(1, 3), 16_000) == 5_333
    assert samples_spanning(0, 48_000) == 0


@pytest.mark.parametrize("rate", AAC_SAMPLE_RATES)
def test_every_aac_rate_holds_whole_samples_per_25_fps_frame(rate):
    assert samples_for_frames(1, rate) * 25 == rate
    assert samples_for_frames(61, rate) == 61 * rate // 25


def test_frame_ranges_tile_the_track_at_a_fractional_frame_rate():
    fps = Fraction(2997, 100)
    bounds = [samples_for_frames(frame, 44_100, fps) for frame in range(200)]
    steps = set(np.diff(bounds).tolist())
    assert steps == {1471, 1472}  # 1471.47 samples per frame: no gap, no overlap, never more than one off
    assert all(abs(bounds[frame] - frame * 44_100 / float(fps)) <= 0.5 for frame in range(200))


def test_mp4_writer_pads_a_short_track_to_the_count_of_the_rule(tmp_path):
    """The writer's track for N frames has samples_for_frames(N) samples (zero-padded when short)."""
    from keyface.audio.io import load_audio

    fps = Fraction(2997, 100)
    with Mp4Writer(tmp_path / "a.mp4", fps=fps, audio=AudioTrack(np.zeros((1, 10), np.float32), 22_050)) as writer:
        for _ in range(9):
            writer.write(np.zeros((8, 8, 3), np.uint8))
    assert load_audio(tmp_path / "a.mp4").num_samples == samples_for_frames(9, 22_050, fps) == 6_622


# ---------------------------------------------------------------------------------------------------------
# the one ComfyUI AUDIO parser


def test_comfy_audio_is_read_once_and_keeps_channels_and_rate():
    waveform = torch.rand(1, 2, 300, dtype=torch.float64) - 0.5
    clip = AudioClip.from_comfy({"waveform": waveform, "sample_rate": torch.tensor(48_000)}, "audio")
    assert clip.waveform.dtype == torch.float32 and clip.waveform.shape == (2, 300) and clip.sample_rate == 48_000
    torch.testing.assert_close(clip.waveform, waveform[0].float())
    assert clip.to_comfy()["waveform"].shape == (1, 2, 300)


@pytest.mark.parametrize(
    "audio, message",
    [
        (None, "expected a ComfyUI AUDIO dict"),
        ({"samples": torch.zeros(1, 1, 10)}, "expected a ComfyUI AUDIO dict"),
        ({"waveform": torch.zeros(1, 10), "sample_rate": 16_000}, r"shape \(batch, channels, samples\)"),
        ({"waveform": np.zeros((1, 1, 10), np.float32), "sample_rate": 16_000}, "must be a tensor"),
        ({"waveform": torch.zeros(1, 1, 10, dtype=torch.int16), "sample_rate": 16_000}, "float samples"),
        ({"waveform": torch.zeros(2, 1, 10), "sample_rate": 16_000}, "batch of 2 clips"),
        ({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16_000}, "the audio is empty"),
        ({"waveform": torch.full((1, 1, 10), float("nan")), "sample_rate": 16_000}, "NaN or infinite"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": 0}, "positive integer"),
        ({"waveform": torch.zeros(1, 1, 10), "sample_rate": 44_100.5}, "positive integer"),
    ],
)
def test_bad_comfy_audio_is_one_line_naming_the_input(audio, message):
    with pytest.raises(InputError, match=message) as caught:
        AudioClip.from_comfy(audio, "speech")
    assert str(caught.value).startswith("speech: ") and "\n" not in str(caught.value)


def test_clip_cut_uses_the_rule_and_names_a_start_past_the_end():
    clip = AudioClip(torch.arange(16_000, dtype=torch.float32)[None] / 16_000, 16_000, "audio_input")
    part = clip.cut(0.1, 0.3)
    assert part.num_samples == 4_800 and part.waveform[0, 0] == clip.waveform[0, 1_600]
    assert clip.cut(0.5).num_samples == 8_000 and clip.cut() is clip
    with pytest.raises(InputError, match=r"^start_seconds: 1.0 s is at or after the end of audio_input \(1.00 s\)"):
        clip.cut(1.0)


def test_video_combine_reads_its_audio_input_with_the_one_parser(tmp_path):
    from helpers import execute_node

    from nodes import host
    from nodes.video import KeyFaceVideoCombine

    images = torch.zeros(3, 8, 8, 3)

    def combine(fps, crf, prefix, **inputs):
        return execute_node(KeyFaceVideoCombine, fps=fps, crf=crf, filename_prefix=prefix, **inputs)

    with pytest.raises(InputError, match="^audio: AUDIO holds a batch of 2 clips"):
        combine(25.0, 18, "x", images=images, audio={"waveform": torch.zeros(2, 1, 99), "sample_rate": 16000})
    with pytest.raises(InputError, match="^audio: the audio contains NaN"):
        combine(25.0, 18, "x", images=images, audio={"waveform": torch.full((1, 1, 9), np.inf), "sample_rate": 8})
    host.configure(output=tmp_path)
    try:
        result = combine(
            25.0, 18, "clip", images=images, audio={"waveform": torch.zeros(1, 2, 5), "sample_rate": 16_000}
        )
    finally:
        host.configure(output=None)
    info = probe_media(tmp_path / result.ui.as_dict()["images"][0]["filename"])
    assert info.video.num_frames == 3 and info.audio.channels == 2
    assert info.audio.duration == pytest.approx(3 / 25, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------
# reading media and stills


def test_reading_a_written_video_back(tmp_path):
    frames = np.stack([np.full((12, 20, 3), 40 * index, np.uint8) for index in range(5)])
    with Mp4Writer(tmp_path / "v.mp4", crf=0, preset="ultrafast") as writer:
        writer.write_frames(frames)
    info = probe_media(tmp_path / "v.mp4")
    assert (info.video.width, info.video.height, info.video.num_frames, info.video.fps) == (20, 12, 5, 25)
    assert info.audio is None
    decoded = read_video(tmp_path / "v.mp4")
    assert decoded.shape == (5, 12, 20, 3)
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 2
    np.testing.assert_array_equal(next(iter_video_frames(tmp_path / "v.mp4")), decoded[0])
    assert read_video(tmp_path / "v.mp4", max_frames=2).shape[0] == 2


def test_check_frame_and_write_image(tmp_path):
    with pytest.raises(InputError, match="preview: frames must be uint8"):
        check_frame(np.zeros((4, 4, 3), np.float32), "preview")
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    path = write_image(tmp_path / "still.png", image)
    from PIL import Image

    with Image.open(path) as stored:
        np.testing.assert_array_equal(np.asarray(stored), image)


def test_identity_and_face_read_media_without_the_output_module():
    code = (
        "import sys; import keyface.identity, keyface.face; "
        "assert 'keyface.video' not in sys.modules, 'keyface.video imported'; "
        "assert 'torch' not in sys.modules and 'av' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
