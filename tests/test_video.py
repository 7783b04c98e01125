"""keyface.video: frame sinks, streamed mp4 writing with the original audio (read back with keyface.media)."""

from __future__ import annotations

import errno
import json
import os
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from keyface.errors import InputError, KeyFaceError
from keyface.media import iter_video_frames, probe_media, read_video, write_image
from keyface.video import (
    AudioTrack,
    CallbackSink,
    FrameListSink,
    MapSink,
    Mp4Writer,
    TeeSink,
    to_uint8,
)

FPS = 25
AAC_FRAME = 1024  # samples per AAC frame: the granularity of the decoded audio length


def synthetic_frames(count: int, height: int = 64, width: int = 96) -> torch.Tensor:
    """Smooth moving gradients plus a bright square: float (count, 3, height, width) in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    frames = []
    for index in range(count):
        phase = index / count
        frame = torch.stack(
            [0.5 + 0.4 * torch.sin(6.28 * (xs + phase)), ys, 0.5 + 0.3 * torch.cos(3.14 * (xs * ys + phase))]
        )
        top = 8 + index % 20
        frame[:, top : top + 16, 20:36] = 0.95
        frames.append(frame)
    return torch.stack(frames)


def stereo_sine(seconds: float, sample_rate: int = 44100) -> np.ndarray:
    """Left 440 Hz, right 660 Hz at half level: (2, samples) float32."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.stack([0.6 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        chunks = [frame.to_ndarray() for frame in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    return np.concatenate(chunks, axis=1), rate


def dominant_frequency(signal: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / sample_rate)[np.argmax(spectrum)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------------
# to_uint8 and frame checks


def test_to_uint8_truncates_like_the_original():
    frame = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, -0.2, 0.0039, 0.004]).reshape(1, 1, 8).repeat(3, 1, 1)
    out = to_uint8(frame)
    assert out.shape == (1, 8, 3) and out.dtype == np.uint8
    # x * 255 truncated: 127.5 -> 127, 254.7 -> 254, 0.99 -> 0, 1.02 -> 1; out-of-range values are clamped
    assert out[0, :, 0].tolist() == [0, 127, 254, 255, 255, 0, 0, 1]
    batch = to_uint8(torch.rand(4, 3, 5, 7))
    assert batch.shape == (4, 5, 7, 3) and batch.flags["C_CONTIGUOUS"]
    values = np.random.default_rng(0).random((3, 6, 6), dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(values), (values * np.float32(255)).astype(np.uint8).transpose(1, 2, 0))


def test_to_uint8_rejects_wrong_layout_and_dtype():
    with pytest.raises(InputError, match="shaped"):
        to_uint8(torch.rand(5, 5, 3))
    with pytest.raises(InputError, match="float"):
        to_uint8(np.zeros((3, 4, 4), np.uint8))


def test_sinks_only_take_uint8_hwc_frames_and_say_how_to_convert():
    sink = FrameListSink()
    with pytest.raises(InputError, match="to_uint8"):
        sink.write(torch.rand(3, 8, 8))
    with pytest.raises(InputError, match="to_uint8"):
        sink.write(np.zeros((8, 8, 3), np.float32))


# --------------------------------------------------------------------------------------------------------
# in-memory sinks and composition


def test_list_callback_map_and_tee_sinks():
    frames = to_uint8(synthetic_frames(5, 16, 24))
    seen = []
    listed = FrameListSink()
    flipped = FrameListSink()
    with TeeSink(
        listed, CallbackSink(lambda f: seen.append(int(f.sum()))), MapSink(lambda f: f[:, ::-1], flipped)
    ) as tee:
        tee.write_frames(frames)
    assert tee.closed and listed.closed and flipped.closed
    np.testing.assert_array_equal(listed.stack(), frames)
    np.testing.assert_array_equal(flipped.stack(), frames[:, :, ::-1])
    assert seen == [int(f.sum()) for f in frames]
    assert tee.frames_written == listed.frames_written == 5
    with pytest.raises(KeyFaceError, match="after the sink was closed"):
        listed.write(frames[0])


def test_exception_in_with_block_aborts_every_inner_sink():
    inner = FrameListSink()
    with pytest.raises(RuntimeError), MapSink(lambda f: f, inner) as sink:
        sink.write(np.zeros((4, 4, 3), np.uint8))
        raise RuntimeError("boom")
    assert inner.closed and inner.frames == []


# --------------------------------------------------------------------------------------------------------
# mp4 writing


def test_mp4_round_trip_with_original_stereo_audio(tmp_path):
    frames = synthetic_frames(30)
    audio = AudioTrack(stereo_sine(2.0), 44100)  # longer than the 1.2 s video: cut to the video
    metadata = {
        "prompt": json.dumps({"3": {"class_type": "KeyFaceSampler"}}),
        "workflow": json.dumps({"nodes": [1] * 2000}),
    }
    path = tmp_path / "talk.mp4"
    with Mp4Writer(path, fps=FPS, audio=audio, metadata=metadata) as writer:
        for frame in frames:
            writer.write(to_uint8(frame))
    assert leftovers(tmp_path) == ["talk.mp4"]

    info = probe_media(path)
    assert (info.video.width, info.video.height, info.video.num_frames) == (96, 64, 30)
    assert info.video.fps == Fraction(25) and info.video.codec == "h264"
    assert (info.audio.sample_rate, info.audio.channels, info.audio.codec) == (44100, 2, "aac")
    assert info.audio.duration == pytest.approx(30 / FPS, abs=1 / 44100)  # container duration: exact
    assert info.metadata["prompt"] == metadata["prompt"] and info.metadata["workflow"] == metadata["workflow"]

    decoded = read_video(path)
    error = np.abs(decoded.astype(np.int16) - to_uint8(frames).astype(np.int16))
    assert decoded.shape == (30, 64, 96, 3)
    assert error.mean() < 3.5  # measured 2.4 with crf 18 (lossy H.264, 4:2:0 chroma on 64x96 frames)

    waveform, rate = decode_audio(path)
    expected = 30 * 44100 // FPS
    # measured: 53248 decoded samples for 52920 expected (the last AAC frame is padded); never short
    assert rate == 44100 and waveform.shape[0] == 2
    assert expected <= waveform.shape[1] < expected + AAC_FRAME
    middle = waveform[:, 4410:48510]
    assert dominant_frequency(middle[0], rate) == pytest.approx(440, abs=2)
    assert dominant_frequency(middle[1], rate) == pytest.approx(660, abs=2)
    source = audio.waveform[:, 4410:48510]
    assert np.corrcoef(middle[0], source[0])[0, 1] > 0.99  # same samples, same place: no A/V offset
    assert np.corrcoef(middle[1], source[1])[0, 1] > 0.99


def test_short_audio_is_padded_with_silence_to_the_video_length(tmp_path):
    path = tmp_path / "padded.mp4"
    tone = AudioTrack(torch.from_numpy(stereo_sine(0.4, 16000)[:1]), 16000)  # mono torch tensor, 0.4 s
    with Mp4Writer(path, audio=tone, preset="ultrafast") as writer:
        writer.write_frames(to_uint8(synthetic_frames(25, 32, 32)))
    info = probe_media(path)
    assert (info.audio.sample_rate, info.audio.channels) == (16000, 1)
    assert info.audio.duration == pytest.approx(1.0, abs=1 / 16000)
    waveform, _ = decode_audio(path)
    assert 16000 <= waveform.shape[1] < 16000 + AAC_FRAME
    assert np.abs(waveform[0, 1000:6000]).max() > 0.3  # the tone
    assert np.abs(waveform[0, 8000:15000]).max() < 0.01  # the padding


def test_odd_frame_size_is_padded_to_even(tmp_path):
    frames = to_uint8(synthetic_frames(3, 31, 45))
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, crf=0, preset="ultrafast") as writer:
        writer.write_frames(frames)
    decoded = read_video(path).astype(float)
    assert decoded.shape == (3, 32, 46, 3)
    # lossless luma, 4:2:0 chroma: the brightness matches closely (measured 1.5), the padding repeats the edge
    assert np.abs(decoded[:, :31, :45].mean(-1) - frames.mean(-1)).mean() < 2.5
    np.testing.assert_array_equal(decoded[:, 31], decoded[:, 30])
    np.testing.assert_array_equal(decoded[:, :, 45], decoded[:, :, 44])


@pytest.mark.parametrize("suffix", [".mkv", ".mov"])
def test_other_containers_and_fractional_fps(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    with Mp4Writer(
        path, fps=29.97, audio=AudioTrack(stereo_sine(0.5, 48000), 48000), metadata={"comment": "hi"}
    ) as writer:
        writer.write_frames(to_uint8(synthetic_frames(12, 32, 32)))
    info = probe_media(path)
    assert info.video.num_frames == 12 and info.video.fps == Fraction(2997, 100)
    assert info.audio.sample_rate == 48000
    assert {key.lower(): value for key, value in info.metadata.items()}["comment"] == "hi"  # Matroska: COMMENT
    assert read_video(path, max_frames=5).shape == (5, 32, 32, 3)


def test_frames_of_another_size_are_refused(tmp_path):
    with pytest.raises(InputError, match="same size"), Mp4Writer(tmp_path / "x.mp4") as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
        writer.write(np.zeros((32, 48, 3), np.uint8))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interruption_leaves_no_file_and_no_temp(tmp_path, interruption):
    path = tmp_path / "out.mp4"
    with pytest.raises(interruption), Mp4Writer(path, audio=AudioTrack(stereo_sine(1.0), 44100)) as writer:
        for index, frame in enumerate(to_uint8(synthetic_frames(10, 32, 32))):
            writer.write(frame)
            if index == 5:
                assert len(leftovers(tmp_path)) == 1  # the hidden temporary file, not out.mp4
                assert not path.exists()
                raise interruption()
    assert leftovers(tmp_path) == []


def test_unclosed_writer_leaves_nothing_when_collected(tmp_path):
    writer = Mp4Writer(tmp_path / "lost.mp4")
    writer.write(np.zeros((16, 16, 3), np.uint8))
    del writer
    import gc

    gc.collect()
    assert leftovers(tmp_path) == []


def test_existing_file_is_replaced_only_on_success(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError), Mp4Writer(path) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
        raise RuntimeError
    assert path.read_bytes() == b"previous"
    with Mp4Writer(path) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
    assert probe_media(path).video.num_frames == 1


def test_bad_output_paths_are_refused_before_any_work(tmp_path, monkeypatch):
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    with pytest.raises(InputError, match=f"{folder} is a folder"):
        Mp4Writer(folder)
    with pytest.raises(InputError, match="unsupported extension '.avi'"):
        Mp4Writer(tmp_path / "out.avi")
    with pytest.raises(InputError, match="does not exist"):
        Mp4Writer(tmp_path / "missing" / "out.mp4")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(InputError, match=f"{locked}.*not writable"):
        Mp4Writer(locked / "out.mp4")
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(KeyFaceError, match="out.mp4.*Permission denied"):
        Mp4Writer(tmp_path / "out.mp4")
    assert leftovers(tmp_path) == ["folder.mp4", "locked"]


def _full_disk(self, packets):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_gives_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    original_mux = Mp4Writer._mux
    calls = []

    def mux_until_full(self, packets):
        calls.append(1)
        if len(calls) > 6:
            _full_disk(self, packets)
        original_mux(self, packets)

    monkeypatch.setattr(Mp4Writer, "_mux", mux_until_full)
    path = tmp_path / "full.mp4"
    full = f"writing {path} failed: No space left on device; free some disk space"
    with pytest.raises(KeyFaceError, match=full), Mp4Writer(path, audio=AudioTrack(stereo_sine(1.0), 44100)) as writer:
        writer.write_frames(to_uint8(synthetic_frames(10, 32, 32)))
    assert leftovers(tmp_path) == []


def test_disk_full_while_finishing_gives_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "full.mp4"
    writer = Mp4Writer(path)
    writer.write_frames(to_uint8(synthetic_frames(10, 32, 32)))
    monkeypatch.setattr(Mp4Writer, "_mux", _full_disk)
    with pytest.raises(KeyFaceError, match=f"writing {path} failed: No space left"):
        writer.close()
    assert writer.closed
    assert leftovers(tmp_path) == []


def test_close_without_frames_is_an_error_and_leaves_nothing(tmp_path):
    writer = Mp4Writer(tmp_path / "empty.mp4")
    with pytest.raises(KeyFaceError, match="no frames"):
        writer.close()
    assert leftovers(tmp_path) == []


def test_audio_track_validation():
    track = AudioTrack(torch.zeros(2, 300), 48000)
    assert track.waveform.shape == (2, 300) and track.waveform.dtype == np.float32 and track.channels == 2
    np.testing.assert_array_equal(track.segment(290, 310)[:, 10:], 0)
    with pytest.raises(InputError, match="44056 Hz.*44100"):
        AudioTrack(np.zeros((1, 10), np.float32), 44056)
    with pytest.raises(InputError, match="channels, samples"):
        AudioTrack(np.zeros((10, 2, 2), np.float32), 16000)


def test_memory_stays_flat_while_writing_many_frames(tmp_path):
    """2,000 frames of 256x256 (393 MB raw) are encoded as they arrive: memory must not grow with the count."""
    base = np.linspace(0, 255, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)

    def rss_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    tracemalloc.start()
    try:
        with Mp4Writer(tmp_path / "long.mp4", audio=AudioTrack(stereo_sine(1.0), 44100), preset="ultrafast") as writer:
            for index in range(2000):
                writer.write(np.roll(base, index, axis=1))
                if index == 300:
                    rss_after_warmup = rss_bytes()
                    tracemalloc.reset_peak()
            rss_at_end = rss_bytes()
            _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # measured: Python peak ~0.6 MB (a few frames), RSS growth < 5 MB over the last 1,700 frames
    assert python_peak < 5 * base.nbytes
    assert rss_at_end - rss_after_warmup < 40 * 2**20
    assert probe_media(tmp_path / "long.mp4").video.num_frames == 2000


# --------------------------------------------------------------------------------------------------------
# stills and reading


def test_write_image_is_atomic_and_keeps_metadata(tmp_path):
    image = to_uint8(synthetic_frames(1, 20, 30))[0]
    path = write_image(tmp_path / "preview.png", image, metadata={"workflow": '{"a": 1}'})
    assert leftovers(tmp_path) == ["preview.png"]
    with Image.open(path) as stored:
        np.testing.assert_array_equal(np.asarray(stored), image)
        assert stored.text["workflow"] == '{"a": 1}'
    write_image(tmp_path / "preview.webp", image)
    with Image.open(tmp_path / "preview.webp") as stored:
        assert stored.size == (30, 20)
    with pytest.raises(InputError, match="unsupported extension"):
        write_image(tmp_path / "preview.gif", image)


def test_probe_and_iterate_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        probe_media(tmp_path / "nothing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(InputError, match="cannot read"):
        probe_media(text)
    with pytest.raises(InputError):
        next(iter_video_frames(text))
