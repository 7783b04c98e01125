"""Long videos through per-frame steps in bounded memory: read in batches, stored batch by batch, joined at the end.

A video of any length is cut into batches of ``batch_size`` frames (:class:`BatchPlan`). Each batch is read on its
own (:func:`read_video_frames` seeks into a file; a KeyFace job decodes just those frames), processed by whatever
the caller runs on it (an upscaler, a face restorer), and stored by a :class:`BatchStore` as one lossless segment
file in a folder on disk. When the last batch is stored, :meth:`BatchStore.finish` streams the segments, frame by
frame, into one mp4 through :class:`keyface.video.Mp4Writer` (the one encoder, with the audio muxed, renamed into
place on success) and removes the folder. Only one batch is ever held in memory; the disk holds the processed
frames losslessly until the end (H.264 RGB at qp 0: roughly a third of the raw size for talking-head video).

Layout::

    <folder>/batches.json          the plan: frames, batch size, fps, what the source is
    <folder>/batch_000003.mkv      processed frames of batch 3 (lossless H.264 RGB), written atomically

A segment file that exists is complete, so an interrupted run loses at most the batch in progress, and
:meth:`BatchStore.next_batch` names the first batch still missing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import InputError, KeyFaceError
from .files import atomic_write
from .media import _open_for_reading, iter_video_frames
from .video import AudioTrack, Mp4Writer

BATCHES_FORMAT = "keyface-batches-v1"
_PLAN = "batches.json"


@dataclass(frozen=True)
class BatchPlan:
    """``num_frames`` frames cut into batches of ``batch_size`` (the last one may be shorter)."""

    num_frames: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise InputError("video: it has no frames; nothing to cut into batches")
        if self.batch_size < 1:
            raise InputError(f"batch_size: must be at least 1, got {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_frames // self.batch_size)

    def frame_range(self, index: int) -> tuple[int, int]:
        """Frames ``start .. stop - 1`` of batch ``index``."""
        if not 0 <= index < self.num_batches:
            raise InputError(f"batch {index} is outside the plan's 0..{self.num_batches - 1}")
        start = index * self.batch_size
        return start, min(start + self.batch_size, self.num_frames)


def read_video_frames(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Frames ``start .. stop - 1`` of a video file, decoded after a seek to the keyframe before ``start``.

    Frame ``i`` is the one whose timestamp is nearest ``i / fps`` (constant frame rate, as KeyFace and most
    editors write). Returns uint8 RGB (stop - start, height, width, 3); fewer frames if the file ends first.
    """
    if not 0 <= start < stop:
        raise InputError(f"frame range {start}..{stop}: start must be >= 0 and below stop")
    if start == 0:
        frames = [frame for _, frame in zip(range(stop), iter_video_frames(path))]
        return np.stack(frames)
    import av

    with _open_for_reading(path) as container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        origin = stream.start_time or 0
        first = origin + int(Fraction(start, 1) / fps / stream.time_base)
        container.seek(first, stream=stream, backward=True, any_frame=False)
        frames = []
        try:
            for frame in container.decode(stream):
                index = round((frame.pts - origin) * stream.time_base * fps)
                if index >= stop:
                    break
                if index >= start:
                    frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as error:
            raise InputError(f"decoding {path} failed: {error}") from error
    if not frames:
        raise InputError(f"{path}: no frames from {start} on; the video is shorter")
    return np.stack(frames)


class LosslessSegmentWriter(Mp4Writer):
    """:class:`Mp4Writer` storing exact RGB (H.264 RGB, qp 0, .mkv), fast preset: the store's segment files."""

    codec = "libx264rgb"
    pix_fmt = "rgb24"

    def __init__(self, path: str | Path, fps: int | Fraction) -> None:
        super().__init__(path, fps, crf=0, preset="ultrafast")


class BatchStore:
    """The folder of one batched run: its plan and the processed batches stored so far.

    Opening a folder that holds another plan (other source, length, batch size or fps) empties it first.

    Args:
        folder: where the segments live (created if missing).
        plan: how the video is cut.
        fps: frame rate of the video (int or Fraction).
        source: a JSON-serialisable description of what is being processed (its identity and settings).
    """

    def __init__(self, folder: str | Path, plan: BatchPlan, fps: int | Fraction, source: dict) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        manifest = {"format": BATCHES_FORMAT, **asdict(plan), "fps": str(self.fps), "source": source}
        if self._read_manifest() != manifest:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / _PLAN, "batch plan") as temp:
                temp.write_text(json.dumps(manifest, indent=1))

    def _read_manifest(self) -> dict | None:
        try:
            return json.loads((self.folder / _PLAN).read_text())
        except (OSError, ValueError):
            return None

    def batch_path(self, index: int) -> Path:
        return self.folder / f"batch_{index:06d}.mkv"

    def stored(self, index: int) -> bool:
        return self.batch_path(index).is_file()

    def next_batch(self) -> int | None:
        """The first batch not stored yet, or None when all are."""
        return next((k for k in range(self.plan.num_batches) if not self.stored(k)), None)

    def save_batch(self, index: int, frames: Iterable[np.ndarray]) -> Path:
        """Store the processed frames of batch ``index``: uint8 RGB (height, width, 3) each, as many as the
        batch has. A batch stored before is replaced."""
        start, stop = self.plan.frame_range(index)
        with LosslessSegmentWriter(self.batch_path(index), self.fps) as writer:
            writer.write_frames(frames)
            if writer.frames_written != stop - start:
                raise InputError(
                    f"batch {index}: got {writer.frames_written} frames, but batch {index} has {stop - start} "
                    f"(frames {start}..{stop - 1}); the nodes between the batch pair must keep every frame"
                )
        return self.batch_path(index)

    def frames(self) -> Iterator[np.ndarray]:
        """Every stored frame in order, decoded one at a time: uint8 RGB (height, width, 3)."""
        missing = [k for k in range(self.plan.num_batches) if not self.stored(k)]
        if missing:
            raise KeyFaceError(f"{self.folder}: batches {missing[:5]} are not stored yet; run them first")
        for index in range(self.plan.num_batches):
            yield from iter_video_frames(self.batch_path(index))

    def finish(
        self,
        path: str | Path,
        audio: AudioTrack | None = None,
        *,
        crf: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Stream every stored frame into the mp4 ``path`` (audio muxed, renamed into place when complete),
        then delete the folder. Frames must all have one size (that of the processed frames)."""
        options = {} if crf is None else {"crf": crf}
        with Mp4Writer(path, self.fps, audio, metadata=metadata, **options) as writer:
            writer.write_frames(self.frames())
        shutil.rmtree(self.folder, ignore_errors=True)
        return writer.path
