"""Frames out: streamed video files with their audio, in-memory frame lists, per-frame transforms.

Frames reach a sink one at a time, in order, as **uint8 RGB arrays of shape (height, width, 3)**
(:func:`keyface.media.check_frame`): that is the one frame type every :class:`FrameSink` accepts. The
pipeline makes float frames in [0, 1] with layout (3, height, width); :func:`to_uint8` converts them the way
the original code does (truncation of x * 255, docs/schedule.md#output-assembly), once, at the boundary. Reading media
files back and writing stills live in :mod:`keyface.media`.

A sink is used as a context manager: leaving the block normally finishes it (``close``), an exception or
Ctrl-C discards it (``abort``)::

    with Mp4Writer("out.mp4", fps=25, audio=AudioTrack(waveform, 44100)) as sink:
        for frame in frames:            # float (3, H, W) tensors in [0, 1]
            sink.write(to_uint8(frame))

:class:`Mp4Writer` encodes each frame as it arrives (H.264 yuv420p + AAC through PyAV, no system ffmpeg),
writes to a hidden temporary file next to the target and renames it into place only when ``close``
succeeds, so an interrupted run never leaves a half-written file under the requested name.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .constants import VIDEO_FPS
from .errors import InputError, KeyFaceError
from .files import AtomicOutput
from .media import check_frame, samples_for_frames

DEFAULT_CRF = 18  # x264 constant-rate factor: visually near-lossless; the original used torchvision's default (23)
DEFAULT_PRESET = "medium"
DEFAULT_AUDIO_BITRATE = 192_000

# ffmpeg's muxer for each accepted extension; all of them carry H.264 + AAC and string tags.
VIDEO_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# mp4/mov flags: moov atom first (previews start before the whole file is read) and keep every metadata key
# (ComfyUI stores `prompt` / `workflow` JSON; without use_metadata_tags only standard keys survive).
MP4_MUXER_OPTIONS = {"movflags": "+faststart+use_metadata_tags"}
# The sample rates the AAC encoder accepts (ISO 14496-3 sampling-frequency table).
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# ffmpeg's default channel layout for each channel count.
CHANNEL_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


# ---------------------------------------------------------------------------------------------------------
# frame conversion


def to_uint8(frames: Any) -> np.ndarray:
    """Convert float pixels in [0, 1] to uint8 RGB, channels last, by truncation like the original
    (docs/schedule.md#output-assembly).

    Args:
        frames: a torch tensor or numpy array, float, layout (3, height, width) for one frame or
            (frames, 3, height, width) for several. Values outside [0, 1] are clamped first.

    Returns:
        uint8 array (height, width, 3) or (frames, height, width, 3), C-contiguous.
    """
    if hasattr(frames, "detach"):  # torch tensor: stay in float32 as the original did before .numpy()
        frames = frames.detach().to("cpu").float().numpy()
    array = np.asarray(frames)
    if array.ndim not in (3, 4) or array.shape[-3] != 3:
        raise InputError(
            f"to_uint8: expected float frames shaped (3, height, width) or (frames, 3, height, width), "
            f"got shape {tuple(array.shape)}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"to_uint8: expected float pixels in [0, 1], got dtype {array.dtype}")
    scaled = np.clip(array.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(255)
    return np.ascontiguousarray(np.moveaxis(scaled.astype(np.uint8), -3, -1))


# ---------------------------------------------------------------------------------------------------------
# sinks


class FrameSink(abc.ABC):
    """Receives frames one at a time, in order: uint8 RGB arrays (height, width, 3).

    ``close()`` finishes the output, ``abort()`` discards it; both are idempotent and after either one
    ``write`` raises. As a context manager the sink closes on normal exit and aborts on any exception
    (including KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.frames_written = 0
        self._state = "open"

    @property
    def closed(self) -> bool:
        """True once the sink was closed or aborted."""
        return self._state != "open"

    def write(self, frame: np.ndarray) -> None:
        """Take one frame, uint8 (height, width, 3)."""
        if self.closed:
            raise KeyFaceError(f"{self!r}: write after the sink was {self._state}")
        self._write(check_frame(frame, repr(self)))
        self.frames_written += 1

    def write_frames(self, frames: Iterable[np.ndarray]) -> None:
        """Write every frame of an iterable, in order."""
        for frame in frames:
            self.write(frame)

    def close(self) -> None:
        """Finish the output (flush, finalise the file); aborts instead if finishing fails."""
        if self.closed:
            return
        try:
            self._close()
        except BaseException:
            self._state = "closing failed"
            self._abort()
            raise
        self._state = "closed"

    def abort(self) -> None:
        """Discard the output: nothing is kept under the requested name."""
        if self.closed:
            return
        self._state = "aborted"
        self._abort()

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @abc.abstractmethod
    def _write(self, frame: np.ndarray) -> None: ...

    def _close(self) -> None:
        """Subclass hook: finish the output."""

    def _abort(self) -> None:
        """Subclass hook: discard the output (must not raise)."""


class FrameListSink(FrameSink):
    """Keeps every frame in memory (tests, previews, short clips); ``frames`` is the list of arrays."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[np.ndarray] = []

    def _write(self, frame: np.ndarray) -> None:
        self.frames.append(frame.copy())

    def _abort(self) -> None:
        self.frames.clear()

    def stack(self) -> np.ndarray:
        """All frames as one uint8 array (frames, height, width, 3)."""
        if not self.frames:
            raise KeyFaceError("FrameListSink.stack: no frames were written")
        return np.stack(self.frames)

    def __repr__(self) -> str:
        return f"FrameListSink({len(self.frames)} frames)"


class CallbackSink(FrameSink):
    """Calls ``on_frame(frame)`` for each frame (progress displays, custom consumers)."""

    def __init__(self, on_frame: Callable[[np.ndarray], None]) -> None:
        super().__init__()
        self._on_frame = on_frame

    def _write(self, frame: np.ndarray) -> None:
        self._on_frame(frame)

    def __repr__(self) -> str:
        return f"CallbackSink({getattr(self._on_frame, '__name__', self._on_frame)!r})"


class MapSink(FrameSink):
    """Applies a per-frame transform (upscaler, face paste-back, ...) and passes the result to ``inner``.

    ``transform`` takes and returns uint8 (height, width, 3) frames; the output size may differ from the
    input size but must be the same for every frame. Closing or aborting the MapSink does the same to
    ``inner``.
    """

    def __init__(self, transform: Callable[[np.ndarray], np.ndarray], inner: FrameSink) -> None:
        super().__init__()
        self.transform = transform
        self.inner = inner

    def _write(self, frame: np.ndarray) -> None:
        self.inner.write(self.transform(frame))

    def _close(self) -> None:
        self.inner.close()

    def _abort(self) -> None:
        self.inner.abort()

    def __repr__(self) -> str:
        return f"MapSink({getattr(self.transform, '__name__', type(self.transform).__name__)}, {self.inner!r})"


class TeeSink(FrameSink):
    """Sends each frame to several sinks (e.g. a file and an in-memory preview).

    Closing closes each sink in order; if one fails the ones not yet closed are aborted and the error is
    raised. Aborting aborts all.
    """

    def __init__(self, *sinks: FrameSink) -> None:
        super().__init__()
        if not sinks:
            raise InputError("TeeSink: give at least one sink")
        self.sinks = sinks

    def _write(self, frame: np.ndarray) -> None:
        for sink in self.sinks:
            sink.write(frame)

    def _close(self) -> None:
        for index, sink in enumerate(self.sinks):
            try:
                sink.close()
            except BaseException:
                for later in self.sinks[index + 1 :]:
                    later.abort()
                raise

    def _abort(self) -> None:
        for sink in self.sinks:
            sink.abort()

    def __repr__(self) -> str:
        return f"TeeSink{self.sinks!r}"


# ---------------------------------------------------------------------------------------------------------
# audio for the mp4


@dataclass(frozen=True)
class AudioTrack:
    """An audio track to mux with the video, kept at its own rate and channel count.

    Attributes:
        waveform: float32 samples, layout (channels, samples), nominally in [-1, 1].
        sample_rate: samples per second; one the AAC encoder accepts (:data:`AAC_SAMPLE_RATES`).
    """

    waveform: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        waveform = self.waveform
        if hasattr(waveform, "detach"):
            waveform = waveform.detach().to("cpu").float().numpy()
        waveform = np.asarray(waveform)
        if waveform.ndim == 1:
            waveform = waveform[None, :]
        if waveform.ndim != 2 or waveform.shape[0] not in CHANNEL_LAYOUTS:
            raise InputError(
                f"audio: waveform must be shaped (channels, samples) with 1-8 channels, got {tuple(waveform.shape)}"
            )
        if not np.issubdtype(waveform.dtype, np.floating):
            raise InputError(f"audio: waveform must hold float samples in [-1, 1], got dtype {waveform.dtype}")
        if int(self.sample_rate) not in AAC_SAMPLE_RATES:
            raise InputError(
                f"audio: sample rate {self.sample_rate} Hz cannot be stored as AAC; resample to one of "
                f"{', '.join(map(str, AAC_SAMPLE_RATES))} Hz"
            )
        object.__setattr__(self, "waveform", np.ascontiguousarray(waveform, dtype=np.float32))
        object.__setattr__(self, "sample_rate", int(self.sample_rate))

    @classmethod
    def muxable(cls, waveform: Any, sample_rate: int) -> AudioTrack:
        """A track of ``waveform`` (channels, samples) at its own rate when AAC can store that rate, else
        resampled to 48 kHz (torchaudio's default filter)."""
        if int(sample_rate) in AAC_SAMPLE_RATES:
            return cls(waveform, sample_rate)
        import torch
        import torchaudio

        resampled = torchaudio.functional.resample(torch.as_tensor(waveform).float(), int(sample_rate), 48000)
        return cls(resampled, 48000)

    @property
    def channels(self) -> int:
        return self.waveform.shape[0]

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.waveform.shape[1] / self.sample_rate

    def segment(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as (channels, stop - start) float32, zero-padded past the end."""
        piece = self.waveform[:, start:stop]
        missing = (stop - start) - piece.shape[1]
        if missing > 0:
            piece = np.concatenate([piece, np.zeros((self.channels, missing), np.float32)], axis=1)
        return np.ascontiguousarray(piece)


class StreamedAudioTrack:
    """The first audio track of a file, muxed without holding it: decoded block by block as the writer asks
    for its samples (and resampled to 48 kHz when AAC cannot store its rate, as :meth:`AudioTrack.muxable`),
    so the memory it takes does not grow with the length.

    Samples are read in order (``segment`` from where the previous one stopped; asking for sample 0 again
    starts the file over), which is how :class:`Mp4Writer` reads its track.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from .audio.io import AudioFileStream

        self._source = AudioFileStream(path)
        if self._source.channels not in CHANNEL_LAYOUTS:
            raise InputError(f"audio: {path} has {self._source.channels} channels; the output video takes 1-8")
        rate = self._source.sample_rate
        self.sample_rate = rate if rate in AAC_SAMPLE_RATES else 48000
        self._start_over()

    @property
    def channels(self) -> int:
        return self._source.channels

    def segment(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as (channels, stop - start) float32, zero-padded past the end."""
        if start == 0 and self._position != 0:
            self._start_over()
        if start != self._position:
            raise KeyFaceError(f"{self!r}: samples are read in order; asked for {start}, next is {self._position}")
        while self._buffer.shape[1] < stop - start and self._pieces is not None:
            piece = next(self._pieces, None)
            if piece is None:
                self._pieces = None
                piece = self._resampler.finish()
            self._buffer = np.concatenate([self._buffer, np.asarray(piece, np.float32).reshape(self.channels, -1)], 1)
        piece, self._buffer = self._buffer[:, : stop - start], self._buffer[:, stop - start :]
        self._position = stop
        missing = (stop - start) - piece.shape[1]
        if missing > 0:
            piece = np.concatenate([piece, np.zeros((self.channels, missing), np.float32)], axis=1)
        return np.ascontiguousarray(piece)

    def _start_over(self) -> None:
        import torch

        from .audio.io import ResampleStream

        self._resampler = ResampleStream(self._source.sample_rate, self.sample_rate)
        self._pieces = (self._resampler.push(torch.from_numpy(block)) for block in self._source.blocks())
        self._buffer = np.zeros((self.channels, 0), np.float32)
        self._position = 0

    def __repr__(self) -> str:
        return f"StreamedAudioTrack({self._source.source!r})"


# ---------------------------------------------------------------------------------------------------------
# mp4 writing


class Mp4Writer(FrameSink):
    """Encodes frames into an H.264 (yuv420p) video, optionally with an AAC audio track, as they arrive.

    Audio follows the video: the track is cut, or zero-padded, to exactly the samples the written frames
    cover (:func:`keyface.media.samples_for_frames`, ``frames * rate / fps``), at its own rate, and encoded
    alongside the video (each frame's span of samples after the frame), so nothing accumulates in memory.
    AAC codes 1024-sample frames: the encoder adds 1024 priming samples in front and pads the last frame
    with silence. A .mp4 / .mov file states the exact length: the last packet lasts only its real samples
    and the edit list, counted in audio samples (the movie time scale is the audio rate), skips the
    priming and lasts ``frames / fps``. A decoder that honours the whole edit list (Apple's;
    :func:`keyface.audio.io.load_audio`) gets exactly the covered samples; FFmpeg (PyAV) skips the
    priming but decodes the last frame whole, so there the audio lasts up to 1023 samples of silence
    longer (under one AAC frame: < 64 ms at 16 kHz, < 23.2 ms at 44.1 kHz, < 21.3 ms at 48 kHz). .mkv
    states no end (the AAC encoder marks no end trim, so no discard padding is written): decoders read the same
    whole last frame. Matroska stores metadata keys upper-case.

    Frames must all have the frame size of the first one. yuv420p needs even width and height: an odd
    size is padded by one replicated row / column (the file is then one pixel larger).

    The file appears under ``path`` only after a successful :meth:`close`; until then it is a hidden
    ``.<name>.*.partial.mp4`` file in the same folder, removed by :meth:`abort`, by an exception inside a
    ``with`` block, or when the writer is garbage collected unclosed.

    Args:
        path: the output file; extension .mp4, .m4v, .mov or .mkv.
        fps: frames per second (int or Fraction).
        audio: the track to mux (:class:`AudioTrack`; :class:`StreamedAudioTrack` for a long file), or None
            for a silent video.
        crf: x264 constant-rate factor (0 lossless - 51 worst).
        preset: x264 speed/size preset ("ultrafast" ... "veryslow").
        metadata: string tags stored in the container (e.g. ComfyUI's ``prompt`` / ``workflow`` JSON).
        audio_bitrate: AAC bit rate in bit/s.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int | Fraction = VIDEO_FPS,
        audio: AudioTrack | None = None,
        *,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        metadata: dict[str, str] | None = None,
        audio_bitrate: int = DEFAULT_AUDIO_BITRATE,
    ) -> None:
        super().__init__()
        self.fps = Fraction(fps).limit_denominator(1_000_000)  # 29.97 -> 2997/100, not a binary fraction
        if self.fps <= 0:
            raise InputError(f"fps: must be positive, got {fps}")
        if not 0 <= int(crf) <= 51:
            raise InputError(f"crf: must be in 0-51, got {crf}")
        if audio is not None and not isinstance(audio, (AudioTrack, StreamedAudioTrack)):
            raise InputError(
                "audio: pass a keyface.video.AudioTrack(waveform, sample_rate), a StreamedAudioTrack(path) or None"
            )
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise InputError(f"metadata: keys and values must be strings, got {key!r}: {type(value).__name__}")
        self.audio = audio
        self._options = {"crf": str(int(crf)), "preset": preset}
        self._metadata = dict(metadata or {})
        self._audio_bitrate = int(audio_bitrate)
        self._output = AtomicOutput(path, VIDEO_CONTAINERS, "video output")
        self.path = self._output.path
        self._container = None
        self._video_stream = None
        self._audio_stream = None
        self._frame_size: tuple[int, int] | None = None
        self._audio_samples_written = 0

    # The video codec and pixel format; a subclass may choose another pair (an RGB one needs no even size).
    codec = "libx264"
    pix_fmt = "yuv420p"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- FrameSink hooks

    def _write(self, frame: np.ndarray) -> None:
        import av

        if self._container is None:
            self._open(frame.shape[0], frame.shape[1])
        if frame.shape[:2] != self._frame_size:
            raise InputError(
                f"{self.path}: frame {self.frames_written} is {frame.shape[1]}x{frame.shape[0]}, but the video "
                f"is {self._frame_size[1]}x{self._frame_size[0]}; every frame must have the same size"
            )
        video_frame = av.VideoFrame.from_ndarray(self._even(frame), format="rgb24")
        video_frame.pts = self.frames_written
        self._guarded(lambda: self._mux(self._video_stream.encode(video_frame)))
        if self.audio is not None:
            self._guarded(lambda: self._encode_audio_until(self.frames_written + 1))

    def _close(self) -> None:
        if self._container is None:
            raise KeyFaceError(f"{self.path}: no frames were written; nothing to save")

        def finish() -> None:
            self._mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode(None))
            self._container.close()

        self._guarded(finish)
        self._container = None
        self._output.commit()

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the file is being thrown away; a failing trailer does not matter
                pass
            self._container = None
        self._output.discard()

    # -- internals

    def _open(self, height: int, width: int) -> None:
        import av

        self._frame_size = (height, width)
        container_format = VIDEO_CONTAINERS[self.path.suffix.lower()]
        options = {}
        if container_format in ("mp4", "mov"):
            options = dict(MP4_MUXER_OPTIONS)
            if self.audio is not None:
                # edit lists count in the movie's time scale: in audio samples the audio's stated end is exact
                # (ffmpeg's default, 1000 per second, rounds it to a millisecond at fractional frame rates)
                options["movie_timescale"] = str(self.audio.sample_rate)
        try:
            self._container = av.open(str(self._output.temp_path), "w", format=container_format, options=options)
        except OSError as error:
            raise self._output.write_error(error) from error
        for key, value in self._metadata.items():
            self._container.metadata[key] = value
        video = self._container.add_stream(self.codec, rate=self.fps)
        video.width, video.height = (width + width % 2, height + height % 2) if self._subsampled else (width, height)
        video.pix_fmt = self.pix_fmt
        video.options = self._options
        self._video_stream = video
        if self.audio is not None:
            audio = self._container.add_stream(
                "aac", rate=self.audio.sample_rate, layout=CHANNEL_LAYOUTS[self.audio.channels]
            )
            audio.bit_rate = self._audio_bitrate
            self._audio_stream = audio

    def _encode_audio_until(self, frame_count: int) -> None:
        import av

        stop = samples_for_frames(frame_count, self.audio.sample_rate, self.fps)
        if stop <= self._audio_samples_written:
            return
        samples = self.audio.segment(self._audio_samples_written, stop)
        # Plane by plane: PyAV 18 counts 9 planes in an 8-channel frame, so AudioFrame.from_ndarray fails on 7.1.
        layout = CHANNEL_LAYOUTS[self.audio.channels]
        audio_frame = av.AudioFrame(format="fltp", layout=layout, samples=samples.shape[1])
        for plane, channel in zip(audio_frame.planes, samples):
            plane.update(channel)
        audio_frame.sample_rate = self.audio.sample_rate
        audio_frame.pts = self._audio_samples_written
        self._mux(self._audio_stream.encode(audio_frame))
        self._audio_samples_written = stop

    @property
    def _subsampled(self) -> bool:
        """yuv420p halves the chroma resolution: the frame size must be even."""
        return self.pix_fmt == "yuv420p"

    def _even(self, frame: np.ndarray) -> np.ndarray:
        return _pad_to_even(frame) if self._subsampled else frame

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run an encode/mux step; an OSError (disk full, I/O) becomes a KeyFaceError naming the file."""
        try:
            step()
        except OSError as error:
            raise self._output.write_error(error) from error


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Replicate the last row / column when height / width is odd (yuv420p subsamples chroma by 2)."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
