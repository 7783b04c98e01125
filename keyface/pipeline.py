"""The two-stage long-video pipeline: keyframes -> interpolated segments -> frames, in bounded memory.

Data flow (one :class:`TalkingHeadJob` per video)::

    identity latent, audio features, emotion per frame
        -> plan_schedule()                 keyframe batches, segments, chunks, output assembly (keyface.schedule)
        -> keyframe_batch(b)               stage 1: 14 keyframe latents per network call   (cached, resumable)
        -> segment(k)                      stage 2: 14 interpolated latents per segment    (cached, resumable)
        -> frames()                        decode one frame at a time, average shared keyframe frames
        -> run(sink)                       stream the frames to an mp4 / list / callback in order

Work happens on demand: asking for a frame computes (or loads from the job folder) exactly the keyframe
batches and segments it needs, in the original's order and with its noise draws. ``run`` therefore streams
the video chunk by chunk (frames leave as soon as they are final), while the ComfyUI nodes can run stage 1
for the whole video, let an artist edit keyframes, then run stage 2 (:meth:`TalkingHeadJob.generate_keyframes`,
:meth:`TalkingHeadJob.replace_keyframe`, :meth:`TalkingHeadJob.interpolate`). Memory holds a few batches and
segments at a time; everything finished lives in the job folder (:mod:`keyface.jobs`), so an interrupted run
resumes where it stopped and gives the frames of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from .audio.cache import entry_digest
from .constants import FRAMES_PER_CLIP
from .errors import InputError
from .jobs import JobFolder, tensor_digest
from .memory import KEYFRAME_GUIDANCE_BRANCHES, auto_decode_block, auto_segments_per_call
from .models.bundle import KeyFaceModels
from .noise import DEFAULT_SEED, NoiseSource, SeededNoise
from .progress import FRAMES, INTERPOLATION, KEYFRAMES, ProgressCallback, ProgressCounter, cpu_estimate_event
from .sampling import (
    AUTOGUIDANCE_SCALE,
    DEFAULT_NUM_STEPS,
    KEYFRAME_AUDIO_SCALE,
    KEYFRAME_IDENTITY_SCALE,
    ays_sigmas,
)
from .schedule import ALIGNED, SCHEDULE_MODES, Schedule, SlotRole, plan_schedule
from .scheduling import Backend, KeyframeTask, LocalBackend, SegmentTask, run_task
from .video import FrameSink, to_uint8

logger = logging.getLogger(__name__)

# Segments interpolated per network call where "auto" has no device memory to fit (a CPU): the original's
# `chunk_size = 2 * 14` frames (docs/sampler.md#interpolation-guidance); on a CPU larger calls are not faster and resume
# at coarser steps.
DEFAULT_SEGMENTS_PER_CALL = 2
AUTO = "auto"
# Latents kept in memory besides the job folder (a chunk holds 2 batches and up to 27 segments).
_CACHED_BATCHES = 4
_CACHED_SEGMENTS = 64
# Frames through the UNet per keyframe sampler step: 14 slots x 3 guidance branches (keyface.sampling).
_KEYFRAME_PASSES = KEYFRAME_GUIDANCE_BRANCHES * FRAMES_PER_CLIP


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: steps, guidance, seed, schedule, batching. Defaults are the original's (docs/sampler.md#defaults;
    docs/schedule.md#defaults)."""

    num_steps: int = DEFAULT_NUM_STEPS
    audio_scale: float = KEYFRAME_AUDIO_SCALE
    identity_scale: float = KEYFRAME_IDENTITY_SCALE
    autoguidance_scale: float = AUTOGUIDANCE_SCALE
    seed: int = DEFAULT_SEED
    schedule: str = ALIGNED
    segments_per_call: int | None = None  # None (or "auto"): as many as fit in free device memory
    interpolation_seed: int | None = None  # None: one noise stream for both stages, in the original order
    interpolation_steps: int | None = None  # stage 2's steps setting; None: num_steps for both stages

    def __post_init__(self):
        ays_sigmas(self.num_steps)  # validates num_steps with the sampler's own message
        if self.interpolation_steps is not None:
            try:
                ays_sigmas(self.interpolation_steps)
            except InputError as error:
                raise InputError(f"interpolation_steps: {error}") from None
        for name in ("audio_scale", "identity_scale", "autoguidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise InputError(
                    f"{name} must be >= 0, got {value!r}: a negative scale would invert the guidance (steer away "
                    "from what it conditions on); use 0 to switch it off"
                )
        if self.schedule not in SCHEDULE_MODES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {self.schedule!r}")
        if self.segments_per_call == AUTO:
            object.__setattr__(self, "segments_per_call", None)
        per_call = self.segments_per_call
        if per_call is not None and (isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1):
            raise InputError(f"segments_per_call must be an integer >= 1 or 'auto', got {per_call!r}")
        for name in ("seed", "interpolation_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64):
                raise InputError(f"{name} must be an integer in [0, 2**64), got {value!r}")

    @property
    def steps_per_sample(self) -> int:
        """Network evaluations (Euler steps) per sampled keyframe batch."""
        return len(ays_sigmas(self.num_steps)) - 1

    @property
    def segment_steps(self) -> int:
        """The steps setting of stage 2 (``interpolation_steps``, else ``num_steps``)."""
        return self.num_steps if self.interpolation_steps is None else self.interpolation_steps

    @property
    def segment_steps_per_sample(self) -> int:
        """Network evaluations (Euler steps) per interpolation call."""
        return len(ays_sigmas(self.segment_steps)) - 1


@dataclass(frozen=True)
class Conditioning:
    """What the video is conditioned on; per-frame arrays hold one entry per 25-fps frame of the audio.

    Attributes:
        identity_latent: ``(1, C, h, w)`` sampler-space latent of the identity image.
        keyframe_audio: ``(frames, 2, Dk)`` keyframe-stage audio features (may be memory-mapped).
        interpolation_audio: ``(frames, 2, Di)`` interpolation-stage audio features.
        valence, arousal: ``(frames,)`` emotion per frame.
    """

    identity_latent: torch.Tensor
    keyframe_audio: torch.Tensor
    interpolation_audio: torch.Tensor
    valence: torch.Tensor
    arousal: torch.Tensor

    def __post_init__(self):
        frames = len(self.keyframe_audio)
        if frames < 1:
            raise InputError("the audio features hold no frame: give at least one frame (40 ms) of audio")
        for name in ("interpolation_audio", "valence", "arousal"):
            if len(getattr(self, name)) < frames:
                raise InputError(f"{name} holds {len(getattr(self, name))} frames; the keyframe audio holds {frames}")
        if self.identity_latent.ndim != 4 or self.identity_latent.shape[0] != 1:
            raise InputError(f"identity_latent has shape {tuple(self.identity_latent.shape)}; expected (1, C, h, w)")
        for name in ("valence", "arousal"):
            values = torch.as_tensor(getattr(self, name))
            if not torch.isfinite(values).all():
                raise InputError(f"{name} contains NaN or infinite values")

    @property
    def num_frames(self) -> int:
        return len(self.keyframe_audio)

    def digests(self) -> dict[str, str]:
        """Content digests, for the job fingerprint (features straight from the feature cache: their entry's
        identity, nothing read)."""
        return {
            "identity": tensor_digest(self.identity_latent),
            "keyframe_audio": _array_digest(self.keyframe_audio),
            "interpolation_audio": _array_digest(self.interpolation_audio),
            "emotion": tensor_digest(torch.as_tensor(self.valence), torch.as_tensor(self.arousal)),
        }


class TalkingHeadJob:
    """One talking-head video: plans it, computes what is asked for, and streams the frames.

    Args:
        models: the loaded :class:`KeyFaceModels`.
        conditioning: identity latent, audio features and emotion (:class:`Conditioning`).
        settings: :class:`GenerationSettings`.
        job_folder: where finished work is kept for resuming (see :mod:`keyface.jobs`); ``None``: a folder named
            by the job's fingerprint under ``jobs_root``, so that the same inputs and settings resume wherever they
            are run from.
        jobs_root: the size-capped folder of fingerprint-named job folders (default: the KeyFace cache's,
            ``$KEYFACE_CACHE_DIR/jobs``); ignored when ``job_folder`` is given.
        noise: a :class:`~keyface.noise.NoiseSource` for the schedule (default: seeded from the settings).
        progress: called with a :class:`ProgressEvent` after every sampler step and output frame; it may raise
            (e.g. :class:`~keyface.errors.Interrupted`) to stop the job, finished work stays in the job folder.
        preview_keyframes: decode each finished keyframe batch for :attr:`ProgressEvent.preview`.
        backend: where the network calls run (:mod:`keyface.scheduling`): ``None`` is the
            :class:`~keyface.scheduling.LocalBackend` (this process, the job's models); a parallel backend
            (:class:`~keyface.scheduling.DevicesBackend`, :class:`~keyface.scheduling.RayBackend`) gives the same
            frames, with up to :attr:`~keyface.scheduling.Backend.window` tasks in flight. The caller closes it.
    """

    def __init__(
        self,
        models: KeyFaceModels,
        conditioning: Conditioning,
        settings: GenerationSettings = GenerationSettings(),
        *,
        job_folder: str | os.PathLike | None = None,
        jobs_root: str | os.PathLike | None = None,
        noise: NoiseSource | None = None,
        progress: ProgressCallback | None = None,
        preview_keyframes: bool = False,
        backend: Backend | None = None,
    ):
        self.models = models
        self.backend = backend or LocalBackend()
        self.conditioning = conditioning
        self.settings = settings
        self.schedule: Schedule = plan_schedule(conditioning.num_frames, settings.schedule)
        self.injected_noise = noise
        self.noise = noise or SeededNoise(
            self.schedule, models.latent_shape, settings.seed, settings.interpolation_seed
        )
        self.progress_callback = progress
        self.preview_keyframes = preview_keyframes
        digests = conditioning.digests()
        noise_id = "seeded" if noise is None else _noise_digest(noise)
        keyframe_job = {
            "schedule": settings.schedule,
            "frames": conditioning.num_frames,
            "inputs": {key: digests[key] for key in ("identity", "keyframe_audio", "emotion")},
            "settings": {key: getattr(settings, key) for key in ("num_steps", "audio_scale", "identity_scale", "seed")},
            "model": models.files.get("keyframe", ""),
            "noise": noise_id,
        }
        segment_job = {
            "interpolation_audio": digests["interpolation_audio"],
            "settings": {
                "num_steps": settings.segment_steps,
                "autoguidance_scale": settings.autoguidance_scale,
                "seed": settings.seed if settings.interpolation_seed is None else settings.interpolation_seed,
            },
            "models": [models.files.get("interpolation", ""), models.files.get("autoguidance", "")],
            "noise": noise_id,
        }
        self.folder = JobFolder(job_folder, keyframe_job, segment_job, root=jobs_root)
        self._batches: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._segments: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._replaced: dict[int, torch.Tensor] = {}
        self._progress = ProgressCounter(0, None)
        self._segments_per_call: int | None = None
        self._decode_block: int | None = None
        self._estimate_due = False
        self._planned_calls = (0, 0)  # keyframe batches and segments the current progress counter covers
        self._fanout: _Fanout | None = None  # the parallel backend's work of the current run

    def with_settings(self, **changes) -> TalkingHeadJob:
        """This job with some settings changed (e.g. stage 2's steps, guidance or seed), in the same folder.

        Keyframes stay (also replaced ones) unless a keyframe setting changes; segments made with other
        settings are recomputed.
        """
        job = TalkingHeadJob(
            self.models,
            self.conditioning,
            dataclasses.replace(self.settings, **changes),
            job_folder=self.folder.path,
            noise=self.injected_noise,
            progress=self.progress_callback,
            preview_keyframes=self.preview_keyframes,
            backend=self.backend,
        )
        job._replaced = dict(self._replaced)
        if job.folder.keyframe_fingerprint == self.folder.keyframe_fingerprint:
            job._batches = self._batches.copy()
        return job

    # ----------------------------------------------------------------------------------------------- sizes

    @property
    def num_frames(self) -> int:
        """Number of output frames (25 fps)."""
        return self.schedule.n_output_frames

    def keyframe_slots(self) -> list[tuple[int, int]]:
        """``(frame, slot_id)`` of every keyframe of the video that lies inside it, in frame order."""
        seen, slots = set(), []
        for batch in self.schedule.batches:
            for slot_id, slot in zip(batch.slot_ids, batch.slots):
                if slot.role is SlotRole.KEYFRAME and slot.frame < self.num_frames and slot.frame not in seen:
                    seen.add(slot.frame)
                    slots.append((slot.frame, slot_id))
        return sorted(slots)

    @property
    def segments_per_call(self) -> int:
        """Segments per interpolation call: the setting, or for ``None`` ("auto") the most that fit in the free
        memory of the compute device (:func:`keyface.memory.auto_segments_per_call`), chosen once per job."""
        if self._segments_per_call is None:
            requested = self.settings.segments_per_call
            self._segments_per_call = requested or auto_segments_per_call(
                self.models, fallback=DEFAULT_SEGMENTS_PER_CALL
            )
        return self._segments_per_call

    @property
    def decode_block(self) -> int:
        """Output frames per VAE decoder call: at most 13, fewer when the free device memory needs it
        (:func:`keyface.memory.auto_decode_block`); each frame is decoded alone either way (docs/models.md#vae)."""
        if self._decode_block is None:
            self._decode_block = auto_decode_block(self.models)
        return self._decode_block

    # ------------------------------------------------------------------------------------------ stage 1

    def keyframe_batch(self, batch: int) -> torch.Tensor:
        """Keyframe latents ``(14, C, h, w)`` of keyframe batch ``batch`` (sampled, or read back)."""
        if batch in self._batches:
            self._batches.move_to_end(batch)
            return self._batches[batch]
        latents = self.folder.keyframes(batch)
        steps = self.settings.steps_per_sample
        if latents is None:
            latents = self._sample_keyframe_batch(batch)
            self.folder.save_keyframes(batch, latents)
        else:
            self._progress.advance(steps, KEYFRAMES, f"keyframe batch {batch + 1} (resumed)")
        self._remember(self._batches, batch, latents, _CACHED_BATCHES)
        return latents

    def _keyframe_task(self, batch: int) -> KeyframeTask:
        """Stage 1 of ``batch`` as a task: its slots' audio and emotion rows and its start noise."""
        audio_frames = torch.tensor([slot.audio_frame for slot in self.schedule.batches[batch].slots])
        cond, settings = self.conditioning, self.settings
        return KeyframeTask(
            batch=batch,
            identity_latent=cond.identity_latent,
            audio=_rows(cond.keyframe_audio, audio_frames)[None],
            valence=_rows(cond.valence, audio_frames)[None].float(),
            arousal=_rows(cond.arousal, audio_frames)[None].float(),
            noise=self.noise.keyframes(batch),
            num_steps=settings.num_steps,
            audio_scale=settings.audio_scale,
            identity_scale=settings.identity_scale,
        )

    def _sample_keyframe_batch(self, batch: int) -> torch.Tensor:
        detail = f"keyframe batch {batch + 1}/{len(self.schedule.batches)}"

        def step(done: int, total: int) -> None:
            self._progress.advance(1, KEYFRAMES, f"{detail}, step {done}/{total}")
            self._estimate_after_first_call(started, _KEYFRAME_PASSES)

        task = self._keyframe_task(batch)
        started = time.perf_counter()
        latents = run_task(self.models, task, step)
        self._preview(batch, latents)
        return latents

    def _keyframes_finished(self, batch: int, latents: torch.Tensor) -> None:
        """A parallel backend finished keyframe batch ``batch``: keep it, report it."""
        self.folder.save_keyframes(batch, latents)
        self._remember(self._batches, batch, latents, max(_CACHED_BATCHES, self.backend.window))
        detail = f"keyframe batch {batch + 1}/{len(self.schedule.batches)}"
        self._progress.advance(self.settings.steps_per_sample, KEYFRAMES, detail)
        self._preview(batch, latents)

    def _preview(self, batch: int, latents: torch.Tensor) -> None:
        slots = self.schedule.batches[batch].slots
        detail = f"keyframe batch {batch + 1}/{len(self.schedule.batches)}"
        if self.preview_keyframes and self._progress.callback is not None:
            first_keyframe = next(i for i, slot in enumerate(slots) if slot.role is SlotRole.KEYFRAME)
            preview = to_uint8(self.decode_keyframes(latents[first_keyframe : first_keyframe + 1])[0])
            self._progress.advance(0, KEYFRAMES, f"{detail} done", preview)

    def slot_latent(self, slot_id: int) -> torch.Tensor:
        """Latent ``(C, h, w)`` of keyframe slot ``slot_id`` (a replaced keyframe if one was given)."""
        if slot_id in self._replaced:
            return self._replaced[slot_id]
        batch, position = divmod(slot_id, self.schedule.frames_per_clip)
        return self.keyframe_batch(batch)[position]

    def replace_keyframe(self, frame: int, latent: torch.Tensor) -> None:
        """Use ``latent`` ``(C, h, w)`` (e.g. an artist's edit, VAE-encoded) as the keyframe of ``frame``.

        Every slot depicting ``frame`` is replaced; segments made from the old keyframe are recomputed.
        """
        slot_ids = [
            slot_id
            for batch in self.schedule.batches
            for slot_id, slot in zip(batch.slot_ids, batch.slots)
            if slot.frame == frame and slot.role is not SlotRole.IDENTITY
        ]
        if not slot_ids:
            frames = [f for f, _ in self.keyframe_slots()]
            raise InputError(f"frame {frame} is not a keyframe of this video; keyframes are at frames {frames[:8]}...")
        if tuple(latent.shape) != self.models.latent_shape:
            raise InputError(f"keyframe latent has shape {tuple(latent.shape)}; expected {self.models.latent_shape}")
        for slot_id in slot_ids:
            self._replaced[slot_id] = latent.float().cpu()
        self._segments.clear()

    def generate_keyframes(self) -> None:
        """Run stage 1 for the whole video (every keyframe batch), reporting progress."""
        self._progress = ProgressCounter(
            len(self.schedule.batches) * self.settings.steps_per_sample, self.progress_callback
        )
        self._plan_estimate(len(self.schedule.batches), 0)
        if self.backend.parallel:
            _Fanout(self, batches=range(len(self.schedule.batches))).run()
            return
        for batch in range(len(self.schedule.batches)):
            self.keyframe_batch(batch)

    def decode_keyframes(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``(n, 3, H, W)`` in [0, 1] of keyframe latents ``(n, C, h, w)`` (keyframe decoder if loaded)."""
        from .models.vae import to_pixels

        decoder = self.models.keyframe_decoder or self.models.decoder
        with self.models.step("preview" if self.models.keyframe_decoder else "decode"), torch.inference_mode():
            return to_pixels(decoder.decode(latents)).cpu()

    # ------------------------------------------------------------------------------------------ stage 2

    def segment(self, index: int) -> torch.Tensor:
        """Latents ``(14, C, h, w)`` of segment ``index`` (interpolated, or read back)."""
        if index in self._segments:
            self._segments.move_to_end(index)
            return self._segments[index]
        if self.backend.parallel:
            fanout = self._fanout if self._fanout is not None and self._fanout.covers(index) else None
            (fanout or _Fanout(self, segments=[index])).run_until(self.call_group(index).start)
            if index in self._segments:
                return self._segments[index]
        self._interpolate_call(index)  # (parallel: read back a segment that left the memory cache)
        return self._segments[index]

    def interpolate(self) -> None:
        """Run stages 1 and 2 for the whole video (everything but decoding), reporting progress."""
        settings = self.settings
        batches_to_load = sum(batch not in self._batches for batch in range(len(self.schedule.batches)))
        self._progress = ProgressCounter(  # batches already in memory take no work, hence no progress
            batches_to_load * settings.steps_per_sample
            + len(self.schedule.segments) * settings.segment_steps_per_sample,
            self.progress_callback,
        )
        self._plan_estimate(len(self.schedule.batches), len(self.schedule.segments))
        if self.backend.parallel:
            self._fanout = _Fanout(self, segments=range(len(self.schedule.segments)))
        for segment in self.schedule.segments:
            self.segment(segment.index)

    def call_group(self, index: int) -> range:
        """The segments interpolated in one call with segment ``index``: consecutive segments of its chunk, at
        most ``segments_per_call``."""
        chunk = self.schedule.chunks[self.schedule.segments[index].chunk]
        per_call = self.segments_per_call
        first = chunk.segments.start + (index - chunk.segments.start) // per_call * per_call
        return range(first, min(first + per_call, chunk.segments.stop))

    def _missing_segments(self, group: range) -> list[tuple[int, torch.Tensor, torch.Tensor, str]]:
        """``(index, start, end, digest)`` of the segments of ``group`` not in the job folder; those that are
        are read back."""
        steps = self.settings.segment_steps_per_sample
        missing = []
        for k in group:
            segment = self.schedule.segments[k]
            start, end = self.slot_latent(segment.start_slot), self.slot_latent(segment.end_slot)
            digest = tensor_digest(start, end)
            stored = self.folder.segment(k, digest)
            if stored is None:
                missing.append((k, start, end, digest))
            else:
                self._remember(self._segments, k, stored, _CACHED_SEGMENTS)
                self._progress.advance(steps, INTERPOLATION, f"segment {k + 1} (resumed)")
        return missing

    def _segment_task(self, missing: list[tuple[int, torch.Tensor, torch.Tensor, str]]) -> SegmentTask:
        """Stage 2 of the ``missing`` segments (of one chunk) as one task: keyframes, audio rows, noise slices."""
        schedule, frames = self.schedule, self.schedule.frames_per_clip
        chunk = schedule.chunks[schedule.segments[missing[0][0]].chunk]
        chunk_noise = self.noise.segments(chunk.index)
        offsets = [(k - chunk.segments.start) * frames for k, *_ in missing]
        audio_frames = torch.tensor([schedule.segments[k].audio_frames for k, *_ in missing])
        return SegmentTask(
            segments=tuple(k for k, *_ in missing),
            start_latents=torch.stack([start for _, start, _, _ in missing]),
            end_latents=torch.stack([end for _, _, end, _ in missing]),
            audio=_rows(self.conditioning.interpolation_audio, audio_frames.flatten()).unflatten(0, audio_frames.shape),
            noise=torch.cat([chunk_noise[o : o + frames] for o in offsets]),
            num_steps=self.settings.segment_steps,
            guidance_scale=self.settings.autoguidance_scale,
        )

    def _interpolate_call(self, index: int) -> None:
        """Interpolate the call group of ``index``, its segments already in the job folder read back instead."""
        schedule = self.schedule
        missing = self._missing_segments(self.call_group(index))
        if not missing:
            return
        chunk = schedule.chunks[schedule.segments[index].chunk]
        frames = schedule.frames_per_clip
        detail = (
            f"segments {missing[0][0] + 1}-{missing[-1][0] + 1}/{len(schedule.segments)} "
            f"(chunk {chunk.index + 1}/{len(schedule.chunks)})"
        )

        def step(done: int, total: int) -> None:
            self._progress.advance(len(missing), INTERPOLATION, f"{detail}, step {done}/{total}")
            self._estimate_after_first_call(started, len(missing) * frames * self._networks_per_segment_step)

        task = self._segment_task(missing)
        started = time.perf_counter()
        self._segments_finished(missing, run_task(self.models, task, step), progress=False)

    def _segments_finished(self, missing: list, latents: torch.Tensor, progress: bool = True) -> None:
        """The latents ``(14 * n, C, h, w)`` of the ``missing`` segments are done: keep them (and report them,
        for a parallel backend, whose workers send no step progress)."""
        frames = self.schedule.frames_per_clip
        for (k, _, _, digest), segment_latents in zip(missing, latents.split(frames)):
            self.folder.save_segment(k, digest, segment_latents)
            self._remember(self._segments, k, segment_latents, _CACHED_SEGMENTS)
        if progress:
            steps = self.settings.segment_steps_per_sample * len(missing)
            label = f"segments {missing[0][0] + 1}-{missing[-1][0] + 1}/{len(self.schedule.segments)}"
            self._progress.advance(steps, INTERPOLATION, label)

    # ------------------------------------------------------------------------------------------ frames

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Output frames ``start .. stop - 1`` in order, each ``(3, H, W)`` float32 in [0, 1].

        Computes what those frames need. A frame shared by two segments is the mean of both in [0, 1].
        """
        stop = self.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.num_frames:
            raise InputError(f"frame range {start}..{stop} is outside the video's 0..{self.num_frames} frames")
        needed = {source.segment for frame in self.schedule.output_frames(start, stop) for source in frame.sources}
        settings = self.settings
        self._progress = ProgressCounter(
            len(needed) * settings.segment_steps_per_sample
            + self._batches_needed(needed) * settings.steps_per_sample
            + (stop - start),
            self.progress_callback,
        )
        self._plan_estimate(self._batches_needed(needed), len(needed))
        if self.backend.parallel:
            in_order = dict.fromkeys(
                source.segment for frame in self.schedule.output_frames(start, stop) for source in frame.sources
            )
            self._fanout = _Fanout(self, segments=in_order)
        return self._frames(start, stop)

    def _batches_needed(self, segments: set[int]) -> int:
        frames = self.schedule.frames_per_clip
        batches = {
            slot // frames
            for k in segments
            for slot in (self.schedule.segments[k].start_slot, self.schedule.segments[k].end_slot)
        }
        return len(batches)

    def _frames(self, start: int, stop: int) -> Iterator[torch.Tensor]:
        block = []
        for frame in self.schedule.output_frames(start, stop):
            block.append(frame)
            if len(block) == self.decode_block:
                yield from self._decode(block)
                block = []
        yield from self._decode(block)

    def _decode(self, frames: list) -> Iterator[torch.Tensor]:
        """Decode the segment frames behind output ``frames`` in one batch (each frame decoded alone)."""
        from .models.vae import to_pixels

        if not frames:
            return
        latents = torch.stack([self.segment(s.segment)[s.t] for frame in frames for s in frame.sources])
        with self.models.step("decode"), torch.inference_mode():
            pixels = to_pixels(self.models.decoder.decode(latents)).cpu()
        first = 0
        for frame in frames:
            count = len(frame.sources)
            self._progress.advance(1, FRAMES, f"frame {frame.index + 1}/{self.num_frames}")
            yield pixels[first : first + count].mean(dim=0) if count > 1 else pixels[first]
            first += count

    def run(self, sink: FrameSink) -> int:
        """Stream the whole video into ``sink`` (uint8 frames) and close it; returns the number of frames.

        On an exception (including an interruption from the progress callback) the sink is aborted; finished
        keyframes and segments stay in the job folder.
        """
        with sink:
            for pixels in self.frames():
                sink.write(to_uint8(pixels))
        return self.num_frames

    # ------------------------------------------------------------------------------------------ CPU estimate

    @property
    def _networks_per_segment_step(self) -> int:
        guided = self.models.autoguidance is not None and self.settings.autoguidance_scale != 1.0
        return 2 if guided else 1

    def _plan_estimate(self, batches: int, segments: int) -> None:
        """A run over ``batches`` keyframe batches and ``segments`` segments starts: on a CPU, its duration is
        sent once (an :data:`~keyface.progress.ESTIMATE` event) after its first network call."""
        device = next(self.models.interpolation.parameters()).device
        if self.models.residency is not None:
            device = self.models.residency.device
        self._estimate_due = self.progress_callback is not None and device.type == "cpu"
        self._planned_calls = (batches, segments)

    def _estimate_after_first_call(self, started: float, frame_passes: int) -> None:
        """``frame_passes`` frames went through a UNet since ``started``: scale that to the planned work."""
        if not self._estimate_due:
            return
        self._estimate_due = False
        batches, segments = self._planned_calls
        settings, frames = self.settings, self.schedule.frames_per_clip
        networks = self._networks_per_segment_step
        segment_calls = math.ceil(segments / self.segments_per_call) if segments else 0
        calls = batches * settings.steps_per_sample + segment_calls * settings.segment_steps_per_sample * networks
        passes = (
            batches * settings.steps_per_sample * _KEYFRAME_PASSES
            + segments * settings.segment_steps_per_sample * frames * networks
        )
        seconds = (time.perf_counter() - started) / frame_passes * passes
        self._progress.callback(cpu_estimate_event(seconds, calls, self._progress.completed, self._progress.total))

    # ------------------------------------------------------------------------------------------ helpers

    def _segment_slots(self, index: int) -> tuple[int, int]:
        segment = self.schedule.segments[index]
        return segment.start_slot, segment.end_slot

    @staticmethod
    def _remember(cache: OrderedDict, key: int, value: torch.Tensor, capacity: int) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)


class _Fanout:
    """The work of one run on a parallel backend: keyframe batches and segment call groups as tasks, submitted in
    frame order with at most :attr:`Backend.window` in flight.

    A call group is submitted once the keyframe batches it interpolates between are finished; every finished
    task goes to the job folder (so resuming works as with the local backend) and the job's memory cache, from
    which the frames stream as soon as the segments they need are done. While waiting, the progress callback
    gets a heartbeat event, so a cancel (a callback that raises) stops the run; unfinished tasks are cancelled.
    """

    # How often a waiting driver calls the progress callback (seconds).
    HEARTBEAT = 0.25

    def __init__(self, job: TalkingHeadJob, segments: Iterable[int] = (), batches: Iterable[int] = ()):
        self.job = job
        job.backend.prepare(job.models)
        frames, batches = job.schedule.frames_per_clip, list(batches)
        units: list[tuple[str, int]] = [("batch", b) for b in batches]
        seen_batches, self.groups = set(batches), {}
        for k in segments:
            group = job.call_group(k)
            if group.start in self.groups:
                continue
            self.groups[group.start] = group
            for slot in sorted({s for i in group for s in job._segment_slots(i)}):
                if slot not in job._replaced and slot // frames not in seen_batches:
                    seen_batches.add(slot // frames)
                    units.append(("batch", slot // frames))
            units.append(("group", group.start))
        self.units = deque(units)
        self.in_flight: dict[Future, tuple[str, int, list]] = {}
        self.running_batches: set[int] = set()
        self.finished_groups: set[int] = set()

    def covers(self, index: int) -> bool:
        return self.job.call_group(index).start in self.groups

    def run(self) -> None:
        """Run every task."""
        self._pump(lambda: not self.units and not self.in_flight)

    def run_until(self, group_start: int) -> None:
        """Run until the call group starting at segment ``group_start`` is finished."""
        self._pump(lambda: group_start in self.finished_groups)

    def _pump(self, finished) -> None:
        try:
            while not finished():
                self._submit()
                if not self.in_flight:
                    break
                self._collect()
        except BaseException:
            for future in self.in_flight:
                future.cancel()
            self.in_flight.clear()
            self.job._fanout = None
            raise

    def _submit(self) -> None:
        job = self.job
        while self.units and len(self.in_flight) < job.backend.window:
            kind, key = self.units[0]
            if kind == "batch":
                self.units.popleft()
                if key in job._batches or job.folder.keyframes(key) is not None:
                    job.keyframe_batch(key)  # read back (resume)
                    continue
                self.in_flight[job.backend.submit(job._keyframe_task(key))] = (kind, key, [])
                self.running_batches.add(key)
                continue
            group = self.groups[key]
            frames = job.schedule.frames_per_clip
            if any(slot // frames in self.running_batches for i in group for slot in job._segment_slots(i)):
                return  # waits for its keyframes; everything before it is in flight
            self.units.popleft()
            missing = job._missing_segments(group)
            if missing:
                self.in_flight[job.backend.submit(job._segment_task(missing))] = (kind, key, missing)
            else:
                self.finished_groups.add(key)

    def _collect(self) -> None:
        done, _ = wait(list(self.in_flight), timeout=self.HEARTBEAT, return_when=FIRST_COMPLETED)
        job = self.job
        if not done:
            stage = KEYFRAMES if any(kind == "batch" for kind, _, _ in self.in_flight.values()) else INTERPOLATION
            job._progress.advance(0, stage, f"{len(self.in_flight)} tasks on {job.backend.workers} workers")
            return
        for future in done:
            kind, key, missing = self.in_flight.pop(future)
            latents = future.result()  # a task's own error (bad input) is raised here, as it was raised there
            if kind == "batch":
                self.running_batches.discard(key)
                job._keyframes_finished(key, latents)
            else:
                job._segments_finished(missing, latents)
                self.finished_groups.add(key)


def _rows(values, indices: torch.Tensor) -> torch.Tensor:
    """``values[indices]`` as a float32 tensor; ``values`` may be a tensor, a numpy or a memory-mapped array."""
    if isinstance(values, torch.Tensor):
        return values[indices].float()
    return torch.from_numpy(np.asarray(values[indices.numpy()], dtype=np.float32))


def _array_digest(values) -> str:
    """Content digest of a feature array; one straight from the feature cache is named by its entry (reading it
    all would keep every page of the map resident: 2.2 GB per hour of audio with the released encoders)."""
    known = entry_digest(values)
    if known is not None:
        return known
    return tensor_digest(values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values)))


def _noise_digest(noise: NoiseSource) -> str:
    return tensor_digest(*(noise.draw(i) for i in range(len(noise.draws))))
