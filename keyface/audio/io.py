"""Audio in: decoding files, the ComfyUI ``AUDIO`` dict, and the 16 kHz mono waveform of the encoders.

Every audio input becomes one :class:`AudioClip` (float32 ``(channels, samples)`` at its own rate):
:func:`load_audio` decodes a file, :meth:`AudioClip.from_comfy` is the one reader of a ComfyUI ``AUDIO``
dict, and :meth:`AudioClip.cut` trims a clip by seconds (samples counted by the one trimming rule,
:func:`keyface.media.samples_spanning`). The encoders then need 16 kHz mono (:func:`to_encoder_waveform`),
cut into 25-fps video frames of 640 samples (:func:`num_video_frames`).

Channel policy (``mode``):

* ``"default"``: channels are averaged, then resampled to 16 kHz.
* ``"reference"``: what the original feature script does (docs/audio.md#channel-policy **[quirk]**): when the rate is
  not 16 kHz only channel 0 is kept; at 16 kHz the channels are averaged. Use it for parity with old results.

The output video carries the clip itself, every channel at its own rate (``keyface.video.AudioTrack``), not
the 16 kHz mono the original muxed; :func:`raw_audio_frames` reproduces the original's muxed audio (its
``get_raw_audio``) for parity checks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import ENCODER_SAMPLE_RATE, SAMPLES_PER_FRAME
from ..errors import InputError
from ..media import samples_spanning

CHANNEL_MODES = ("default", "reference")
DECODE_BLOCK_SECONDS = 10.0  # audio decoded, resampled and muxed per step when a file is streamed

# Scale of each PCM sample format to [-1, 1] (integer formats as torchaudio.load reads them: int16 / 32768).
_PCM_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63, "flt": 1.0, "dbl": 1.0}
_PCM_OFFSET = {"u8": 128.0}


@dataclass(frozen=True)
class AudioClip:
    """A decoded audio signal.

    Attributes:
        waveform: ``torch.Tensor`` of shape ``(channels, samples)``, float32, nominally in [-1, 1].
        sample_rate: samples per second of ``waveform``.
        source: what the clip came from (a file path or ``"AUDIO input"``), used in error messages.
    """

    waveform: torch.Tensor
    sample_rate: int
    source: str = "audio"

    def __post_init__(self) -> None:
        _validate_waveform(self.waveform, self.sample_rate, self.source)
        object.__setattr__(self, "sample_rate", _as_rate(self.sample_rate, self.source))

    @property
    def num_channels(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[1])

    @property
    def duration_seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def to_comfy(self) -> dict[str, Any]:
        """The clip as a ComfyUI ``AUDIO`` dict: ``{"waveform": (1, channels, samples), "sample_rate": int}``."""
        return {"waveform": self.waveform.unsqueeze(0), "sample_rate": self.sample_rate}

    @classmethod
    def from_comfy(cls, audio: Any, name: str = "audio") -> AudioClip:
        """The one reader of a ComfyUI ``AUDIO`` dict ``{"waveform": (1, channels, samples), "sample_rate": int}``.

        ``name`` is the input named in the error raised for anything else: not such a dict, a waveform that
        is not a float tensor of that shape, a batch of several clips (KeyFace drives one video from one
        clip), an empty or non-finite waveform, a rate that is not a positive integer.
        """
        if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
            raise InputError(f"{name}: expected a ComfyUI AUDIO dict with 'waveform' and 'sample_rate'")
        waveform = audio["waveform"]
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 3:
            raise InputError(f"{name}: AUDIO 'waveform' must be a tensor of shape (batch, channels, samples)")
        if not waveform.is_floating_point():
            raise InputError(f"{name}: AUDIO 'waveform' must hold float samples in [-1, 1], got {waveform.dtype}")
        if waveform.shape[0] != 1:
            raise InputError(
                f"{name}: AUDIO holds a batch of {waveform.shape[0]} clips; KeyFace drives one video from one "
                "clip: pass a single clip (split or select the batch before this node)"
            )
        sample_rate = audio["sample_rate"]
        if isinstance(sample_rate, torch.Tensor) and sample_rate.numel() == 1:
            sample_rate = sample_rate.item()
        return cls(waveform[0].detach().to("cpu", torch.float32).contiguous(), _as_rate(sample_rate, name), name)

    def cut(self, start_seconds: float = 0.0, duration_seconds: float | None = None) -> AudioClip:
        """The part from ``start_seconds`` lasting ``duration_seconds`` (None: to the end), samples counted by
        :func:`keyface.media.samples_spanning`; a start at or past the end is an InputError."""
        first = samples_spanning(start_seconds, self.sample_rate)
        if first >= self.num_samples:
            raise InputError(
                f"start_seconds: {start_seconds} s is at or after the end of {self.source} "
                f"({self.duration_seconds:.2f} s)"
            )
        if first == 0 and duration_seconds is None:
            return self
        last = None if duration_seconds is None else first + samples_spanning(duration_seconds, self.sample_rate)
        return AudioClip(self.waveform[:, first:last].contiguous(), self.sample_rate, self.source)


def load_audio(path: str | os.PathLike, start: float = 0.0, duration: float | None = None) -> AudioClip:
    """Decode the first audio stream of any file PyAV (FFmpeg) reads: wav, mp3, flac, m4a, ogg, or a video.

    Args:
        path: the audio or video file.
        start: seconds to skip at the beginning.
        duration: seconds to keep from ``start`` (``None``: to the end).

    Returns:
        The whole clip in memory (for long files see :class:`AudioFileStream`), at the file's own sample
        rate, every channel kept. From an mp4 / mov / m4a file it ends where the container says the track
        ends (its sample durations and edit list), which FFmpeg's decoder does not apply at the end: the
        silence padding the encoder's last AAC frame is left out, so the audio of a KeyFace video reads back
        exactly as long as the video.
    """
    stream = AudioFileStream(path, start, duration)
    waveform = np.concatenate(list(stream.blocks()), axis=1)
    return AudioClip(torch.from_numpy(waveform), stream.sample_rate, stream.source)


class AudioFileStream:
    """The first audio track of a file, decoded block by block so that a long file is never held whole.

    ``blocks()`` decodes the file again on every call, from ``start`` for ``duration`` seconds (samples
    counted by :func:`keyface.media.samples_spanning`, the end stated by an mp4 container honoured: see
    :func:`load_audio`, which is the concatenation of these blocks). Opening checks the file, the times and
    that it has an audio track with a stated rate; decoding errors come from ``blocks()``.

    Attributes:
        sample_rate: samples per second of the track.
        channels: channel count of the track.
        source: the path as a string, for messages.
    """

    def __init__(self, path: str | os.PathLike, start: float = 0.0, duration: float | None = None):
        path = Path(path)
        self.source = str(path)
        if not path.is_file():
            raise InputError(f"audio file not found: {self.source}")
        if not math.isfinite(start) or start < 0:
            raise InputError(f"{self.source}: start must be a finite number of seconds >= 0, got {start}")
        if duration is not None and (not math.isfinite(duration) or duration <= 0):
            raise InputError(f"{self.source}: duration must be a positive number of seconds, got {duration}")
        self.path, self.start, self.duration = path, float(start), duration
        with self._open() as (_, stream):
            self.sample_rate = int(stream.rate or stream.codec_context.sample_rate)
            self.channels = int(stream.codec_context.channels)

    def check(self) -> None:
        """Decode the first samples: an empty or undecodable track raises its InputError now, not mid-run."""
        first = self.blocks(block_seconds=0)
        next(first)
        first.close()

    @contextmanager
    def _open(self):
        import av  # imported here: decoding is the only user

        try:
            container = av.open(self.source)
        except (av.FFmpegError, OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or error  # FFmpeg's text without its errno and the path again
            raise InputError(f"{self.source}: not a readable audio or video file ({reason})") from error
        with container:
            if not container.streams.audio:
                raise InputError(f"{self.source}: the file has no audio track")
            stream = container.streams.audio[0]
            if not (stream.rate or stream.codec_context.sample_rate):
                raise InputError(f"{self.source}: the audio track does not state its sample rate")
            yield container, stream

    def blocks(self, block_seconds: float = DECODE_BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """Yield the samples in order as float32 ``(channels, n)`` arrays of about ``block_seconds`` each."""
        import av

        name, rate = self.source, self.sample_rate
        first = samples_spanning(self.start, rate)
        last = None if self.duration is None else first + samples_spanning(self.duration, rate)
        pending: list[np.ndarray] = []
        pending_samples = 0
        block_samples = max(1, int(block_seconds * rate))
        yielded = False
        with self._open() as (container, stream):
            stated_end = _stated_end(container, stream, rate)
            if stated_end is not None:
                last = stated_end if last is None else min(last, stated_end)
            position = 0
            try:
                if first > 0 and stream.time_base is not None:
                    container.seek(int(self.start / stream.time_base), stream=stream)
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.time_base is not None:
                        position = samples_spanning(frame.pts * frame.time_base, rate)
                    samples = _frame_to_float(frame, name)
                    begin, end = position, position + samples.shape[1]
                    position = end
                    if end <= first:
                        continue
                    if last is not None and begin >= last:
                        break
                    if samples.shape[0] != self.channels:
                        raise InputError(
                            f"{name}: the channel count changes inside the audio track ({self.channels} to "
                            f"{samples.shape[0]})"
                        )
                    piece = samples[:, max(first - begin, 0) : (None if last is None else last - begin)]
                    pending.append(piece)
                    pending_samples += piece.shape[1]
                    if pending_samples >= block_samples:
                        yield np.concatenate(pending, axis=1)
                        yielded, pending, pending_samples = True, [], 0
            except av.FFmpegError as error:
                raise InputError(f"{name}: the audio track could not be decoded ({error})") from error
        if pending:
            yield np.concatenate(pending, axis=1)
        elif not yielded:
            where = f" after {self.start} s" if first > 0 else ""
            raise InputError(f"{name}: no audio samples{where} (the file is empty or shorter than the start time)")


def as_audio_clip(audio: AudioClip | dict | str | os.PathLike, name: str = "audio") -> AudioClip:
    """Accept a clip, a ComfyUI ``AUDIO`` dict or a file path, and return an :class:`AudioClip`."""
    if isinstance(audio, AudioClip):
        return audio
    if isinstance(audio, dict):
        return AudioClip.from_comfy(audio, name)
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(audio)
    raise InputError(
        f"{name}: expected an audio file path, a ComfyUI AUDIO dict or an AudioClip, got {type(audio).__name__}"
    )


def num_video_frames(num_samples_16k: int) -> int:
    """Number of 25-fps video frames ``F = ceil(samples / 640)`` for a 16 kHz signal
    (docs/audio.md#frames-and-sub-frames)."""
    return -(-int(num_samples_16k) // SAMPLES_PER_FRAME)


def resample_to_encoder_rate(
    waveform: torch.Tensor, sample_rate: int, new_rate: int = ENCODER_SAMPLE_RATE
) -> torch.Tensor:
    """Resample ``(..., samples)`` to 16 kHz (or ``new_rate``) with ``torchaudio.functional.resample``
    defaults, as the original."""
    if sample_rate == new_rate:
        return waveform
    import torchaudio.functional

    return torchaudio.functional.resample(waveform, orig_freq=sample_rate, new_freq=new_rate)


def to_encoder_waveform(clip: AudioClip, mode: str = "default") -> torch.Tensor:
    """The mono 16 kHz waveform the encoders see, shape ``(samples,)`` float32 (channel policy: module doc)."""
    return resample_to_encoder_rate(_encoder_mono(clip.waveform, clip.sample_rate, mode), clip.sample_rate).contiguous()


def encoder_waveform_blocks(
    blocks: Iterable[np.ndarray | torch.Tensor], sample_rate: int, mode: str = "default"
) -> Iterator[torch.Tensor]:
    """:func:`to_encoder_waveform` of a signal that arrives in ``(channels, n)`` blocks (e.g.
    :meth:`AudioFileStream.blocks`): yields consecutive ``(m,)`` float32 pieces of the same 16 kHz mono waveform
    (equal to the whole-clip result within float rounding, about 1e-7), holding only a block at a time."""
    resampler = ResampleStream(sample_rate, ENCODER_SAMPLE_RATE)
    for block in blocks:
        piece = resampler.push(_encoder_mono(torch.as_tensor(block), sample_rate, mode))
        if piece.shape[-1]:
            yield piece
    tail = resampler.finish()
    if tail.shape[-1]:
        yield tail


class WaveformFile:
    """A float32 waveform ``(samples,)`` kept raw in a file (the 16 kHz encoder input of a streamed extraction).

    Slicing ``waveform[a:b]`` reads those samples with an ordinary file read into a new tensor; nothing is
    memory-mapped, so however many windows are read, the process holds only the slices it keeps (reading a
    memory map leaves every page read resident). The file must hold ``num_samples`` samples; it may be
    sparse (unwritten ranges read as zeros).

    Args:
        path: the raw little-endian float32 file.
        num_samples: samples it holds (or the first of them this view covers).
    """

    def __init__(self, path: str | os.PathLike, num_samples: int):
        self.path = Path(path)
        self.num_samples = int(num_samples)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_samples,))

    def __len__(self) -> int:
        return self.num_samples

    def head(self, num_samples: int) -> WaveformFile:
        """The first ``num_samples`` samples, as a view of the same file (nothing read)."""
        return WaveformFile(self.path, min(int(num_samples), self.num_samples))

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError("WaveformFile supports slices only, e.g. waveform[a:b]")
        start, stop, step = index.indices(self.num_samples)
        if step != 1:
            raise ValueError("WaveformFile slices must have step 1")
        count = max(0, stop - start)
        samples = np.fromfile(self.path, dtype="<f4", count=count, offset=4 * start)
        if samples.size != count:
            raise OSError(f"{self.path}: holds fewer than {stop} samples")
        return torch.from_numpy(samples.astype(np.float32, copy=False))


class ResampleStream:
    """``torchaudio.functional.resample`` (its default filter) of a signal that arrives in pieces.

    ``push(x)`` takes the next ``(..., n)`` samples and returns the output samples that no later input can
    change; ``finish()`` returns the rest. Joined, the pieces equal the resampling of the whole signal
    within float rounding: the signal is resampled in chunks that start on a multiple of the reduced input
    rate (where the filter's phases repeat) with more than the filter's half width of real input on each
    side, and only each chunk's core is kept.
    """

    def __init__(self, orig_freq: int, new_freq: int, chunk_seconds: float = DECODE_BLOCK_SECONDS):
        self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)
        gcd = math.gcd(self.orig_freq, self.new_freq)
        self._orig, self._new = self.orig_freq // gcd, self.new_freq // gcd
        # the half width of torchaudio's default sinc filter (lowpass_filter_width 6, rolloff 0.99), plus one
        half_width = math.ceil(6 * self._orig / (0.99 * min(self._orig, self._new))) + 1
        self._context_blocks = -(-half_width // self._orig)  # input blocks of `_orig` samples
        self._chunk_blocks = max(1, int(chunk_seconds * self.orig_freq) // self._orig)
        self._buffer: torch.Tensor | None = None  # input from block `_buffer_block` on
        self._buffer_block = 0
        self._next_block = 0  # first block whose output is not yet returned

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        if self.orig_freq == self.new_freq:
            return samples
        self._buffer = samples if self._buffer is None else torch.cat([self._buffer, samples], dim=-1)
        ready = self._buffer_block + self._buffer.shape[-1] // self._orig - self._context_blocks
        if ready - self._next_block < self._chunk_blocks:
            return samples.new_zeros(samples.shape[:-1] + (0,))
        return self._resample(ready)

    def finish(self) -> torch.Tensor:
        if self.orig_freq == self.new_freq or self._buffer is None:
            return torch.zeros(0)
        return self._resample(None)

    def _resample(self, stop: int | None) -> torch.Tensor:
        """Output of input blocks ``[_next_block, stop)`` (``None``: to the end of the signal)."""
        out = resample_to_encoder_rate(self._buffer, self.orig_freq, self.new_freq)
        first = (self._next_block - self._buffer_block) * self._new
        if stop is None:
            return out[..., first:].contiguous()
        piece = out[..., first : (stop - self._buffer_block) * self._new].contiguous()
        keep_from = max(self._buffer_block, stop - self._context_blocks)
        self._buffer = self._buffer[..., (keep_from - self._buffer_block) * self._orig :]
        self._buffer_block, self._next_block = keep_from, stop
        return piece


def pad_to_frames(waveform: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Zero-pad (or cut) a ``(samples,)`` 16 kHz waveform to exactly ``num_frames * 640`` samples."""
    target = num_frames * SAMPLES_PER_FRAME
    if waveform.shape[-1] >= target:
        return waveform[..., :target]
    return torch.nn.functional.pad(waveform, (0, target - waveform.shape[-1]))


def raw_audio_frames(clip: AudioClip) -> torch.Tensor:
    """The audio muxed into the output video: channel mean at 16 kHz, zero-padded, shape ``(F, 640)``.

    Reproduces the original ``get_raw_audio`` (docs/audio.md#muxed-audio) in both channel modes.
    """
    mono = resample_to_encoder_rate(clip.waveform.mean(dim=0), clip.sample_rate)
    frames = num_video_frames(mono.shape[0])
    return pad_to_frames(mono, frames).reshape(frames, SAMPLES_PER_FRAME).contiguous()


def _encoder_mono(waveform: torch.Tensor, sample_rate: int, mode: str) -> torch.Tensor:
    """``(channels, n)`` -> ``(n,)`` by the channel policy of ``mode`` (module doc)."""
    if mode not in CHANNEL_MODES:
        raise InputError(f"mode: expected one of {CHANNEL_MODES}, got {mode!r}")
    if mode == "reference" and sample_rate != ENCODER_SAMPLE_RATE:
        return waveform[0]
    return waveform.mean(dim=0)


def _stated_end(container, stream, sample_rate: int) -> int | None:
    """The sample at which an mp4-family container says the audio track ends, else None (FFmpeg trims the
    encoder's padding itself where a format can say so, e.g. Ogg; mp4 states it only in sample durations)."""
    if "mp4" not in container.format.name.split(",") or stream.duration is None or stream.time_base is None:
        return None
    return samples_spanning(((stream.start_time or 0) + stream.duration) * stream.time_base, sample_rate)


def _frame_to_float(frame, name: str) -> np.ndarray:
    """One decoded PyAV frame as float32 ``(channels, samples)``."""
    format_name = frame.format.name.rstrip("p")
    if format_name not in _PCM_SCALE:
        raise InputError(f"{name}: unsupported decoded sample format {frame.format.name!r}")
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T  # packed: (1, samples * channels), interleaved
    data = data.astype(np.float32)
    if format_name in _PCM_OFFSET:
        data -= _PCM_OFFSET[format_name]
    if _PCM_SCALE[format_name] != 1.0:
        data /= np.float32(_PCM_SCALE[format_name])
    return data


def _as_rate(sample_rate: Any, name: str) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}: sample_rate must be a positive integer, got {sample_rate!r}")
    if sample_rate <= 0 or sample_rate != int(sample_rate):
        raise InputError(f"{name}: sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


def _validate_waveform(waveform: Any, sample_rate: Any, name: str) -> None:
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 2:
        raise InputError(f"{name}: waveform must be a tensor of shape (channels, samples)")
    if not waveform.is_floating_point():
        raise InputError(f"{name}: waveform must be floating point in [-1, 1], got {waveform.dtype}")
    _as_rate(sample_rate, name)
    if waveform.shape[0] < 1 or waveform.shape[1] < 1:
        raise InputError(f"{name}: the audio is empty ({tuple(waveform.shape)} channels x samples)")
    if not torch.isfinite(waveform).all():
        raise InputError(f"{name}: the audio contains NaN or infinite samples; repair or re-export the file")
