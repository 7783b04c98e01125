"""A short preview video of a job's finished frames while stage 2 runs: the last seconds, small, refreshed.

:class:`SegmentPreview` listens to a :class:`~keyface.pipeline.TalkingHeadJob`'s progress events. Every few newly
finished segments (and at most once per some seconds of wall time) it decodes the finished frames it has not shown
yet (only the last :attr:`PreviewSettings.seconds` of them, every :attr:`PreviewSettings.frame_step`-th frame),
keeps them downscaled in a ring of fixed size (:class:`FrameRing`: never the whole video), writes the ring as an
animated WebP (atomically) and hands the file to the host's ``publish`` hook (ComfyUI: shown on the node). The
final preview, written by :meth:`SegmentPreview.finish`, is the host's to show. Without a host nothing is made.

Finished segments are the ones in the job folder (made from the current keyframes): the preview reads them back
from there, in frame order, up to the first one still missing, so it never starts work of its own.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .constants import VIDEO_FPS
from .errors import KeyFaceError
from .files import atomic_write
from .jobs import tensor_digest
from .progress import INTERPOLATION, ProgressEvent
from .video import to_uint8

logger = logging.getLogger(__name__)

PREVIEW_SUFFIX = ".webp"
_KEPT_FILES = 2  # the file the UI shows and the one it may still be loading


@dataclass(frozen=True)
class PreviewSettings:
    """What a segment preview shows and how often it is refreshed.

    Args:
        seconds: the preview shows the last this many seconds of finished frames.
        frame_step: every ``frame_step``-th video frame (2: 12.5 fps at 25 fps).
        max_side: longest side of the preview frames in pixels (never enlarged).
        every_segments: refreshed once this many more segments are finished ...
        min_interval: ... and at most once per this many seconds of wall time.
        quality: WebP quality, 0-100.
    """

    seconds: float = 2.0
    frame_step: int = 2
    max_side: int = 256
    every_segments: int = 4
    min_interval: float = 10.0
    quality: int = 70

    @property
    def capacity(self) -> int:
        """Frames a preview holds at most (the ring's size)."""
        return max(math.ceil(self.seconds * VIDEO_FPS / self.frame_step), 1)

    @property
    def fps(self) -> float:
        return VIDEO_FPS / self.frame_step


class FrameRing:
    """The last ``capacity`` preview frames ``(index, uint8 (h, w, 3))``; older ones fall out as new ones come."""

    def __init__(self, capacity: int):
        self._frames: deque[tuple[int, np.ndarray]] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._frames.maxlen

    def push(self, index: int, frame: np.ndarray) -> None:
        self._frames.append((index, frame))

    @property
    def last_index(self) -> int:
        """Video frame index of the newest frame, -1 when empty."""
        return self._frames[-1][0] if self._frames else -1

    def frames(self) -> list[np.ndarray]:
        return [frame for _, frame in self._frames]

    def __len__(self) -> int:
        return len(self._frames)


def write_animated_webp(path: str | Path, frames: list[np.ndarray], fps: float, quality: int = 70) -> Path:
    """Write uint8 RGB ``frames`` (each (h, w, 3)) as a looping animated WebP at ``fps``, atomically."""
    from PIL import Image

    pictures = [Image.fromarray(frame) for frame in frames]
    with atomic_write(path, "segment preview", {PREVIEW_SUFFIX}) as temp:
        pictures[0].save(
            temp,
            format="WEBP",
            save_all=True,
            append_images=pictures[1:],
            duration=round(1000 / fps),
            loop=0,
            quality=quality,
        )
    return Path(path)


def _downscale(pixels: torch.Tensor, max_side: int) -> torch.Tensor:
    """``(n, 3, H, W)`` pixels with the longest side at most ``max_side`` (area average), aspect kept."""
    height, width = pixels.shape[-2:]
    scale = min(max_side / max(height, width), 1.0)
    if scale == 1.0:
        return pixels
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    return torch.nn.functional.interpolate(pixels, size=size, mode="area")


class SegmentPreview:
    """Previews of ``job``'s finished frames, written into ``folder`` and given to ``publish(path)``.

    Use :meth:`on_event` as (part of) the job's progress callback during :meth:`TalkingHeadJob.interpolate`, then
    :meth:`finish` for the final preview. A preview that cannot be made (disk full, out of memory while decoding)
    is logged once and the previews stop; the job goes on.

    Args:
        job: the running :class:`~keyface.pipeline.TalkingHeadJob`.
        folder: where the preview files go (ComfyUI: its temp folder); at most two are kept.
        publish: called with the path of each new preview.
        settings: :class:`PreviewSettings`.
        clock: seconds of wall time (``time.monotonic``; tests pass their own).
    """

    def __init__(
        self,
        job,
        folder: str | Path,
        publish: Callable[[Path], None],
        settings: PreviewSettings = PreviewSettings(),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job, self.folder, self.publish, self.settings, self.clock = job, Path(folder), publish, settings, clock
        self.ring = FrameRing(settings.capacity)
        self.files: deque[Path] = deque()
        self._name = f"keyface_preview_{uuid.uuid4().hex[:12]}"
        self._written = 0
        self._finished_segments = 0  # segments 0 .. this - 1 are in the job folder
        self._shown_segments = 0  # ... and this many of them are in the last preview
        self._last_time = clock()
        self._running = False
        self._failed = False

    # ------------------------------------------------------------------------------------------- events

    def on_event(self, event: ProgressEvent) -> None:
        """A progress event of the job: during stage 2, refresh the preview when it is due."""
        if event.stage != INTERPOLATION or self._failed or self._running:
            return
        if self.clock() - self._last_time < self.settings.min_interval:
            return
        self._guarded(self._refresh_if_due)

    def finish(self) -> Path | None:
        """Write the final preview (the last seconds of every finished frame) and return it, not published: the
        host shows it as the result (ComfyUI: the node's ``ui`` output). None when there is nothing to show."""
        if self._failed:
            return None
        self._guarded(functools.partial(self._refresh, publish=False))
        return self.files[-1] if self.files and not self._failed else None

    def _guarded(self, action: Callable[[], None]) -> None:
        self._running = True  # reading keyframes back may report progress: no preview inside a preview
        try:
            action()
        except (KeyFaceError, OSError, RuntimeError) as error:  # RuntimeError: e.g. out of memory while decoding
            self._failed = True
            logger.warning("KeyFace: no more segment previews for this run: %s", error)
        finally:
            self._running = False

    def _refresh_if_due(self) -> None:
        self._scan()
        if self._finished_segments - self._shown_segments >= self.settings.every_segments:
            self._refresh()

    # ----------------------------------------------------------------------------------------- the work

    def _segment_latents(self, index: int) -> torch.Tensor | None:
        """Segment ``index``'s latents ``(14, C, h, w)`` when the job folder holds them for the current keyframes."""
        job = self.job
        segment = job.schedule.segments[index]
        digest = tensor_digest(job.slot_latent(segment.start_slot), job.slot_latent(segment.end_slot))
        return job.folder.segment(index, digest)

    def _scan(self) -> None:
        """Advance :attr:`_finished_segments` over the segments now in the job folder, in order."""
        segments = self.job.schedule.segments
        while self._finished_segments < len(segments) and self._segment_latents(self._finished_segments) is not None:
            self._finished_segments += 1

    def _finished_frames(self) -> int:
        """Output frames ``0 .. n - 1`` are finished: every segment they come from is."""
        done = 0
        for frame in self.job.schedule.output_frames(self.ring.last_index + 1):
            if any(source.segment >= self._finished_segments for source in frame.sources):
                break
            done = frame.index + 1
        return max(done, self.ring.last_index + 1)

    def _refresh(self, publish: bool = True) -> None:
        """Decode the finished frames not shown yet (the last ones only), write the preview and publish it."""
        self._scan()
        self._last_time = self.clock()
        settings, stop = self.settings, self._finished_frames()
        start = max(self.ring.last_index + 1, stop - settings.capacity * settings.frame_step)
        wanted = [
            frame for frame in self.job.schedule.output_frames(start, stop) if frame.index % settings.frame_step == 0
        ]
        self._shown_segments = self._finished_segments
        if not wanted:
            return
        for index, picture in zip((frame.index for frame in wanted), self._decode(wanted), strict=True):
            self.ring.push(index, picture)
        self._write(publish)

    def _decode(self, frames: list) -> list[np.ndarray]:
        """Downscaled uint8 pictures of output ``frames`` (a frame two segments share: the first one's)."""
        from .models.vae import to_pixels

        job = self.job
        latents_of = {k: self._segment_latents(k) for k in dict.fromkeys(f.sources[0].segment for f in frames)}
        pictures = []
        for first in range(0, len(frames), job.decode_block):
            block = frames[first : first + job.decode_block]
            latents = torch.stack([latents_of[f.sources[0].segment][f.sources[0].t] for f in block])
            with job.models.step("decode"), torch.inference_mode():
                pixels = to_pixels(job.models.decoder.decode(latents)).cpu().float()
            pictures.extend(to_uint8(_downscale(pixels, self.settings.max_side)))
        return pictures

    def _write(self, publish: bool) -> None:
        self._written += 1
        path = self.folder / f"{self._name}_{self._written:05d}{PREVIEW_SUFFIX}"
        self.folder.mkdir(parents=True, exist_ok=True)  # ComfyUI empties its temp folder at start-up
        write_animated_webp(path, self.ring.frames(), self.settings.fps, self.settings.quality)
        self.files.append(path)
        while len(self.files) > _KEPT_FILES:
            self.files.popleft().unlink(missing_ok=True)
        if publish:
            self.publish(path)
