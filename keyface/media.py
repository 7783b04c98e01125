"""Media files below the pipeline: the frame type, stills, reading audio/video files back, and the one rule
that maps video frames to audio samples.

* Frames are **uint8 RGB arrays of shape (height, width, 3)** (:func:`check_frame`); :func:`write_image`
  writes one as PNG / WebP / JPEG.
* :func:`probe_media` describes a file's streams without decoding; :func:`iter_video_frames` and
  :func:`read_video` decode its first video stream (identity images may be a video's first frame).
* :func:`samples_spanning` / :func:`samples_for_frames` are THE trimming rule: every cut of an audio track
  (start / duration in seconds, a frame range, the track muxed with a video) counts its samples this way.

Nothing here imports torch; PyAV and Pillow are imported where they are used.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .constants import VIDEO_FPS
from .errors import InputError
from .files import atomic_write

IMAGE_FORMATS = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}


# ---------------------------------------------------------------------------------------------------------
# frames and stills


def check_frame(frame: Any, where: str) -> np.ndarray:
    """Return ``frame`` if it is a uint8 (height, width, 3) array, else raise an InputError naming ``where``."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        described = f"{type(frame).__name__} {getattr(frame, 'dtype', '')} {tuple(getattr(frame, 'shape', ()))}".strip()
        raise InputError(
            f"{where}: frames must be uint8 numpy arrays shaped (height, width, 3), got {described}; "
            "convert float (3, H, W) frames in [0, 1] with keyface.video.to_uint8"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"{where}: empty frame of shape {frame.shape}")
    return frame


def write_image(path: str | os.PathLike, image: np.ndarray, *, metadata: dict[str, str] | None = None) -> Path:
    """Write a uint8 (height, width, 3) RGB image as PNG, WebP or JPEG, atomically (temp file + rename).

    ``metadata`` is stored as PNG text chunks (ComfyUI's ``prompt`` / ``workflow`` convention); other
    formats ignore it. Returns the absolute path written.
    """
    from PIL import Image, PngImagePlugin

    image = check_frame(image, f"image output {path}")
    with atomic_write(path, "image output", IMAGE_FORMATS) as temp:
        image_format = IMAGE_FORMATS[temp.suffix.lower()]  # the temporary name keeps the target's extension
        save_options: dict[str, Any] = {}
        if image_format == "PNG" and metadata:
            info = PngImagePlugin.PngInfo()
            for key, value in metadata.items():
                info.add_text(key, value)
            save_options["pnginfo"] = info
        elif image_format in ("WEBP", "JPEG"):
            save_options["quality"] = 95
        Image.fromarray(image).save(temp, format=image_format, **save_options)
    return Path(path).expanduser().absolute()


# ---------------------------------------------------------------------------------------------------------
# audio samples <-> time and video frames


def samples_spanning(seconds: float | Fraction, sample_rate: int) -> int:
    """The number of samples in the first ``seconds`` of a track at ``sample_rate``: round(seconds * rate).

    This is the one trimming rule. Rounding to the nearest sample (not floor / ceil) because the times come
    as floats (``0.07 * 44100`` is 3087.0000000000005, whose ceiling adds a sample; ``0.7 * 44100`` is
    30869.999999999996, whose floor drops one) and because the nearest sample ends the audio within half a
    sample of the video. The product is taken exactly (``Fraction``), so frame boundaries are monotone and
    consecutive ranges tile a track without a gap or an overlap.
    """
    return round(Fraction(seconds) * int(sample_rate))


def samples_for_frames(num_frames: int, sample_rate: int, fps: int | Fraction = VIDEO_FPS) -> int:
    """The samples that ``num_frames`` video frames at ``fps`` cover: :func:`samples_spanning` of
    ``num_frames / fps`` seconds. It is also the index of the first sample of frame ``num_frames``, so
    frames [a, b) carry samples [samples_for_frames(a), samples_for_frames(b)). At 25 fps every AAC rate
    gives a whole number (16 kHz: 640 per frame, 44.1 kHz: 1764, 48 kHz: 1920)."""
    return samples_spanning(Fraction(int(num_frames)) / Fraction(fps), sample_rate)


# ---------------------------------------------------------------------------------------------------------
# reading media files


@dataclass(frozen=True)
class VideoStreamInfo:
    """The first video stream of a file: size in pixels, frame rate, number of frames, duration in seconds."""

    width: int
    height: int
    fps: Fraction
    num_frames: int
    duration: float
    codec: str


@dataclass(frozen=True)
class AudioStreamInfo:
    """The first audio stream of a file: rate in Hz, channel count, duration in seconds (container value)."""

    sample_rate: int
    channels: int
    duration: float
    codec: str


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe_media` finds in a file; ``video`` / ``audio`` are None when that stream is absent."""

    path: Path
    video: VideoStreamInfo | None
    audio: AudioStreamInfo | None
    metadata: dict[str, str] = field(default_factory=dict)


def _open_for_reading(path: str | os.PathLike):
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"media file {path} does not exist (or is not a file)")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise InputError(f"cannot read {path} as audio/video: {error}") from error


def _stream_duration(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: container durations are in microseconds
    return 0.0


def probe_media(path: str | os.PathLike) -> MediaInfo:
    """Describe a media file: video size / fps / frame count, audio rate / channels / duration, tags.

    The frame count is the container's when it records one, else the number of video packets (no decoding).
    """
    with _open_for_reading(path) as container:
        video = audio = None
        if container.streams.video:
            stream = container.streams.video[0]
            num_frames = stream.frames
            if not num_frames:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            rate = stream.average_rate or stream.guessed_rate or Fraction(0)
            video = VideoStreamInfo(
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                fps=Fraction(rate),
                num_frames=int(num_frames),
                duration=_stream_duration(stream, container),
                codec=stream.codec_context.name,
            )
        if container.streams.audio:
            stream = container.streams.audio[0]
            audio = AudioStreamInfo(
                sample_rate=stream.codec_context.sample_rate,
                channels=stream.codec_context.channels,
                duration=_stream_duration(stream, container),
                codec=stream.codec_context.name,
            )
        return MediaInfo(Path(path), video, audio, dict(container.metadata))


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decode the first video stream frame by frame: yields uint8 RGB arrays (height, width, 3)."""
    import av

    with _open_for_reading(path) as container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as error:
            raise InputError(f"decoding {path} failed: {error}") from error


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode (up to ``max_frames``) frames of a video into one uint8 array (frames, height, width, 3)."""
    frames = list(itertools.islice(iter_video_frames(path), max_frames))
    if not frames:
        raise InputError(f"{path}: the video stream has no frames")
    return np.stack(frames)
