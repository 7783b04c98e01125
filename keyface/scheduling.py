"""Where the pipeline's network calls run: stage tasks and the backends that execute them.

A :class:`~keyface.pipeline.TalkingHeadJob` turns its work into tasks: a :class:`KeyframeTask` (one keyframe
batch) or a :class:`SegmentTask` (one interpolation call over consecutive segments of a chunk). A task carries
everything its network call needs, already cut out of the job: the keyframe latents, its audio and emotion rows
and its start noise. The noise is drawn by the driver (the job's :class:`~keyface.noise.NoiseSource`, which
hands out every draw by position, in the original order whatever order the tasks run in), so a task's result
depends only on the task and the weights: any backend, any number of workers, the same frames.

Backends (all take a task and return its latents ``(14 * n, C, h, w)``, float32 on the CPU):

* :class:`LocalBackend` (the default): the job's own models, in the calling thread, one task at a time.
* :class:`DevicesBackend`: one process, one copy of the models per listed device (``cuda:0,cuda:1``; two
  ``cpu`` entries on a machine without GPUs), one thread per device taking the next task as its device frees up.
* :class:`RayBackend`: one Ray actor per GPU (or per CPU slot) of a Ray cluster, each loading the stage models
  from the same model files. Optional: ``pip install 'ray>=2.9'`` (``.[ray]`` from a checkout).

Parallel backends return :class:`concurrent.futures.Future` objects; the job keeps a window of them in flight,
writes each finished one to the job folder and streams frames as soon as the contiguous prefix is done. A worker
that dies mid-task (a Ray actor's process killed, its node lost) has the task resubmitted to another worker and a
replacement started; a task that fails for its input fails the job with the original error, not a Ray traceback.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .errors import InputError, KeyFaceError
from .models.bundle import KeyFaceModels, Residency
from .sampling import sample_keyframes, sample_segments

logger = logging.getLogger(__name__)

# Works in a checkout and in ComfyUI's Python alike (a node pack is not a pip-installed distribution there).
RAY_INSTALL_HINT = "pip install 'ray>=2.9' into the Python that runs KeyFace (from a checkout: pip install '.[ray]')"
# Tasks in flight per worker: one running, one queued behind it so that a worker never waits for the driver.
TASKS_PER_WORKER = 2

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class KeyframeTask:
    """Stage 1 for keyframe batch ``batch``.

    Attributes:
        identity_latent: ``(1, C, h, w)``.
        audio: ``(1, 14, 2, Dk)`` keyframe audio rows of the batch's slots.
        valence, arousal: ``(1, 14)``.
        noise: ``(14, C, h, w)`` start noise (the batch's draw).
    """

    batch: int
    identity_latent: torch.Tensor
    audio: torch.Tensor
    valence: torch.Tensor
    arousal: torch.Tensor
    noise: torch.Tensor
    num_steps: int
    audio_scale: float
    identity_scale: float

    @property
    def label(self) -> str:
        return f"keyframe batch {self.batch + 1}"


@dataclass(frozen=True)
class SegmentTask:
    """Stage 2 for segments ``segments`` (consecutive, of one chunk), sampled in one call.

    Attributes:
        start_latents, end_latents: ``(n, C, h, w)`` the keyframes each segment runs between.
        audio: ``(n, 14, 2, Di)`` interpolation audio rows of each segment's frames.
        noise: ``(14 * n, C, h, w)`` the segments' slices of their chunk's draw.
    """

    segments: tuple[int, ...]
    start_latents: torch.Tensor
    end_latents: torch.Tensor
    audio: torch.Tensor
    noise: torch.Tensor
    num_steps: int
    guidance_scale: float

    @property
    def label(self) -> str:
        return f"segments {self.segments[0] + 1}-{self.segments[-1] + 1}"


Task = KeyframeTask | SegmentTask


def run_task(models: KeyFaceModels, task: Task, callback: StepCallback | None = None) -> torch.Tensor:
    """The latents of ``task`` with ``models``: ``(14, C, h, w)`` for a keyframe batch, ``(14 * n, C, h, w)`` for
    ``n`` segments; float32 on the CPU."""
    if isinstance(task, KeyframeTask):
        with models.step("keyframes"):
            return sample_keyframes(
                models.keyframe,
                task.identity_latent,
                task.audio,
                task.valence,
                task.arousal,
                task.noise,
                num_steps=task.num_steps,
                audio_scale=task.audio_scale,
                identity_scale=task.identity_scale,
                callback=callback,
            ).cpu()
    with models.step("segments"):
        return sample_segments(
            models.interpolation,
            models.autoguidance,
            task.start_latents,
            task.end_latents,
            task.audio,
            task.noise,
            num_steps=task.num_steps,
            guidance_scale=task.guidance_scale,
            callback=callback,
        ).cpu()


class Backend(abc.ABC):
    """Runs tasks for a job. ``parallel`` backends take tasks through :meth:`submit`; the local one is called
    inline by the job (so its step progress and CPU estimate stay exactly as they were)."""

    parallel = True

    @property
    @abc.abstractmethod
    def workers(self) -> int:
        """Workers that run tasks at the same time."""

    @property
    def window(self) -> int:
        """Tasks a job keeps in flight (and so the most finished-but-unconsumed work it waits for)."""
        return TASKS_PER_WORKER * self.workers

    def prepare(self, models: KeyFaceModels) -> None:
        """Called by a job before its first task with the job's models (the weights every worker must match)."""

    @abc.abstractmethod
    def submit(self, task: Task) -> Future:
        """Start ``task``; the future's result is :func:`run_task`'s."""

    def close(self) -> None:
        """Stop the workers (a backend is reusable until closed; closing twice is harmless)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalBackend(Backend):
    """Today's behaviour: the job's own models, in the calling thread."""

    parallel = False

    @property
    def workers(self) -> int:
        return 1

    def submit(self, task: Task) -> Future:
        raise KeyFaceError("the local backend runs tasks inline; it has no submit")


# ---------------------------------------------------------------------------------------------- devices


def parse_devices(value: str | Sequence[str]) -> list[torch.device]:
    """``"cuda:0,cuda:1"`` (or a list) -> devices; checks that each exists here."""
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    if not names:
        raise InputError(f"devices: give a comma-separated list such as cuda:0,cuda:1, got {value!r}")
    devices = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputError(f"devices: {name!r} is not a device; use names such as cuda:0, cuda:1 or cpu") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise InputError(f"devices: {name} does not exist here ({count} CUDA devices); list existing ones")
        elif device.type != "cpu":
            raise InputError(f"devices: {name!r} is not supported; use cuda:N or cpu devices")
        devices.append(device)
    return devices


def models_on(models: KeyFaceModels, device: torch.device) -> KeyFaceModels:
    """A copy of ``models`` whose every part lives on ``device`` (no offloading, no host hooks)."""
    replica = copy.deepcopy(dataclasses.replace(models, residency=None))
    for module in replica.parts().values():
        module.to(device)
    replica.residency = Residency(device, device, "none")
    return replica


class DevicesBackend(Backend):
    """One model copy per device in this process; a thread per device runs the next queued task.

    Args:
        devices: ``"cuda:0,cuda:1"`` or a list of device names (``["cpu", "cpu"]`` for two CPU workers).
    """

    def __init__(self, devices: str | Sequence[str]):
        self.devices = parse_devices(devices)
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._models_key: tuple | None = None
        self._closed = False

    @property
    def workers(self) -> int:
        return len(self.devices)

    def prepare(self, models: KeyFaceModels) -> None:
        key = (id(models), tuple(sorted(models.files.items())))
        if key == self._models_key:
            return
        self._stop_threads()
        self._models_key = key
        self._queue = queue.Queue()
        for number, device in enumerate(self.devices):
            thread = threading.Thread(
                target=self._serve,
                args=(models_on(models, device), self._queue),
                name=f"keyface-{device}-{number}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _serve(models: KeyFaceModels, tasks: queue.Queue) -> None:
        while (item := tasks.get()) is not None:
            task, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode():
                    future.set_result(run_task(models, task))
            except BaseException as error:  # handed to the driver, which raises it
                future.set_exception(error)

    def submit(self, task: Task) -> Future:
        if not self._threads:
            raise KeyFaceError("DevicesBackend.submit before prepare(models): give the backend to a TalkingHeadJob")
        future: Future = Future()
        self._queue.put((task, future))
        return future

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []

    def close(self) -> None:
        self._stop_threads()


# ---------------------------------------------------------------------------------------------- ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise KeyFaceError(f"the ray backend needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


class StageWorker:
    """What one Ray actor runs: the stage models loaded from ``files`` on its GPU (or the CPU)."""

    def __init__(self, files, precision: str | torch.dtype, cpu_threads: int | None):
        from .loading import load_models, resolve_dtype

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)  # Ray starts workers with one thread: keep the driver's numerics
        dtype = precision if isinstance(precision, torch.dtype) else resolve_dtype(precision, device)
        self.models = models_on(load_models(files, "cpu", dtype), device)

    def run(self, task: Task) -> torch.Tensor:
        with torch.inference_mode():
            return run_task(self.models, task)

    def identity(self) -> tuple[int, dict[str, str]]:
        """This worker's process id and the identities of its weight files."""
        return os.getpid(), self.models.files


class RayBackend(Backend):
    """One Ray actor per worker, each holding the stage models loaded from the same model files.

    Args:
        files: the :class:`~keyface.loading.ModelFiles`; every node of the cluster must have them at these paths.
        address: a Ray cluster to join (``ray.init(address=...)``: ``"auto"`` or ``"ray://head:10001"``); ``None``
            starts a local one, unless Ray is already initialised in this process (then that one is used).
        workers: actors to start; ``None``: one per GPU of the cluster, or one per CPU slot without GPUs.
        precision: the network precision each actor resolves for its own device (``auto``, ``fp32``, ...), or
            a ``torch.dtype`` every actor uses (the driver's, e.g. ComfyUI's choice).
    """

    def __init__(
        self,
        files,
        *,
        address: str | None = None,
        workers: int | None = None,
        precision: str | torch.dtype = "auto",
    ):
        self.ray = import_ray()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be an integer >= 1, got {workers!r}")
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise InputError(
                    f"the Ray cluster at {address!r} could not be joined ({reason}); start it (`ray start --head` on "
                    "the head node) or check the address"
                ) from None
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self._resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        self._count = workers or gpus or max(int(resources.get("CPU", 1)), 1)
        self._files, self._precision = files, precision
        cpu_threads = None if gpus else torch.get_num_threads()
        self._actor_class = self.ray.remote(**self._resources, max_restarts=0)(StageWorker)
        self._worker_args = (files, precision, cpu_threads)
        self._lock = threading.Lock()
        self._idle: list = []
        self._pending: list[tuple[Task, Future]] = []
        self._running: dict = {}  # object ref -> (actor, task, future)
        self._starting: dict = {}  # readiness ref -> replacement actor still loading its models
        self._expected_files: dict[str, str] | None = None
        self.resubmitted = 0  # tasks run again after their worker died
        self._closed = False
        self._actors = [self._start_actor() for _ in range(self._count)]
        self._idle = list(self._actors)
        self._dispatcher = threading.Thread(target=self._dispatch, name="keyface-ray", daemon=True)
        self._dispatcher.start()

    @property
    def workers(self) -> int:
        return self._count

    def _start_actor(self):
        return self._actor_class.remote(*self._worker_args)

    def worker_pids(self) -> list[int]:
        """Process ids of the live actors (waits until they have loaded their models)."""
        return [pid for pid, _ in self.ray.get([actor.identity.remote() for actor in self._actors])]

    def prepare(self, models: KeyFaceModels) -> None:
        if self._expected_files == models.files:
            return
        for pid, files in self.ray.get([actor.identity.remote() for actor in self._actors]):
            if files != models.files:
                raise KeyFaceError(
                    f"a Ray worker (pid {pid}) loaded other weight files than this job's: {files} vs {models.files}; "
                    "give every node the same model files at the same paths"
                )
        self._expected_files = models.files

    def submit(self, task: Task) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise KeyFaceError("this Ray backend is closed; make a new one")
            self._pending.append((task, future))
        return future

    def _dispatch(self) -> None:
        ray = self.ray
        while not self._closed:
            with self._lock:
                while self._idle and self._pending:
                    task, future = self._pending.pop(0)
                    if not future.set_running_or_notify_cancel():
                        continue
                    actor = self._idle.pop(0)
                    self._running[actor.run.remote(task)] = (actor, task, future)
                refs = list(self._running) + list(self._starting)
            if not refs:
                threading.Event().wait(0.01)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=0.05)
            for ref in done:
                if ref in self._starting:
                    self._started(ref)
                    continue
                with self._lock:
                    actor, task, future = self._running.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
                    self._replace(actor, task, future, error)
                    continue
                except ray.exceptions.RayTaskError as error:
                    future.set_exception(_task_error(error))
                except BaseException as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
                with self._lock:
                    self._idle.append(actor)

    def _replace(self, actor, task: Task, future: Future, error: BaseException) -> None:
        """``actor`` died running ``task``: the task runs again first, on the next free worker; a replacement
        actor starts and takes tasks once it has loaded its models."""
        if self._closed:  # killed by close()
            future.cancel()
            return
        logger.warning("a Ray worker died running %s (%s); running it again on another worker", task.label, error)
        replacement = self._start_actor()
        with self._lock:
            self._actors = [replacement if a is actor else a for a in self._actors]
            self._starting[replacement.identity.remote()] = replacement
            self._pending.insert(0, (task, _Rerun(future)))
            self.resubmitted += 1

    def _started(self, ready) -> None:
        """A replacement actor finished loading (or failed to start: then the job runs on fewer workers)."""
        with self._lock:
            actor = self._starting.pop(ready)
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError as error:
            logger.warning("a replacement Ray worker failed to start (%s); going on with fewer workers", error)
            with self._lock:
                self._actors = [a for a in self._actors if a is not actor]
                if not self._actors:
                    self._fail_pending(KeyFaceError(f"every Ray worker died and none could be restarted: {error}"))
            return
        with self._lock:
            self._idle.append(actor)

    def _fail_pending(self, error: BaseException) -> None:
        for _, future in self._pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [future for _, future in self._pending] + [future for *_, future in self._running.values()]
            self._pending.clear()
        for future in pending:
            future.cancel()
        for actor in self._actors:
            self.ray.kill(actor)


class _Rerun(Future):
    """The future of a task run again: it completes the original (already running) future."""

    def __init__(self, original: Future):
        super().__init__()
        self.original = original

    def set_running_or_notify_cancel(self) -> bool:
        return not self.original.cancelled()

    def set_result(self, result) -> None:
        self.original.set_result(result)

    def set_exception(self, exception) -> None:
        self.original.set_exception(exception)

    def cancel(self) -> bool:
        return self.original.cancel()


def _task_error(error) -> BaseException:
    """The exception a task raised inside a Ray worker, without Ray's wrapping (its message is the traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return KeyFaceError(f"a Ray worker failed: {str(error).strip().splitlines()[-1]}")


# ---------------------------------------------------------------------------------------------- choosing


def make_backend(
    *,
    devices: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    files=None,
    precision: str = "auto",
) -> Backend:
    """The backend the CLI options ask for: ``devices`` -> :class:`DevicesBackend`; ``ray_address`` or
    ``workers`` -> :class:`RayBackend` (a local Ray cluster when no address); neither -> :class:`LocalBackend`."""
    if devices and (ray_address or workers):
        raise InputError("devices: give either --devices (one process) or --workers / --ray-address (Ray), not both")
    if devices:
        return DevicesBackend(devices)
    if ray_address or workers:
        if files is None:
            raise InputError("the ray backend needs the model files (every worker loads them)")
        return RayBackend(files, address=ray_address, workers=workers, precision=precision)
    return LocalBackend()
