"""Scale-out backends (keyface.scheduling) on the tiny demo weights: the devices backend with two CPU "devices"
and a local two-CPU Ray cluster give the local backend's frames exactly (both schedules); Ray workers killed
mid-run have their tasks run again; the driver killed mid-run resumes to the same frames; a task's input error
arrives as the original one-line error; a cancel from the progress callback stops the run.

Every job is the same 27-frame clip (one keyframe batch, two segments: the smallest with two tasks to spread),
so each schedule's local frames are computed once; the Ray tests share one local cluster and its two actors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, random_conditioning

from keyface.errors import InputError, Interrupted, KeyFaceError
from keyface.loading import find_model_files, load_models
from keyface.noise import DrawKind, SeededNoise
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.progress import INTERPOLATION
from keyface.schedule import ALIGNED, REFERENCE
from keyface.scheduling import DevicesBackend, LocalBackend, import_ray, make_backend
from keyface.video import FrameListSink

FRAMES = 27  # one keyframe batch, two segments
SETTINGS = GenerationSettings(num_steps=10, segments_per_call=1)


@pytest.fixture(scope="module")
def setup(demo_models):
    files = find_model_files(demo_models)
    models = load_models(files)
    return files, models


def run_job(setup, folder: Path, schedule: str = ALIGNED, backend=None, **job_options) -> np.ndarray:
    _, models = setup
    conditioning = random_conditioning(models, FRAMES)
    sink = FrameListSink()
    settings = GenerationSettings(num_steps=SETTINGS.num_steps, segments_per_call=1, schedule=schedule)
    TalkingHeadJob(models, conditioning, settings, job_folder=folder, backend=backend, **job_options).run(sink)
    return sink.stack()


class LocalRuns:
    """Each schedule's frames on the local backend, computed once, and the job folder they were made in."""

    def __init__(self, setup, root: Path):
        self.setup, self.root = setup, root
        self._frames: dict[str, np.ndarray] = {}

    def folder(self, schedule: str) -> Path:
        return self.root / schedule

    def frames(self, schedule: str) -> np.ndarray:
        if schedule not in self._frames:
            self._frames[schedule] = run_job(self.setup, self.folder(schedule), schedule)
        return self._frames[schedule]


@pytest.fixture(scope="module")
def local(setup, tmp_path_factory) -> LocalRuns:
    return LocalRuns(setup, tmp_path_factory.mktemp("local"))


@pytest.mark.parametrize("schedule", [ALIGNED, REFERENCE])
def test_devices_backend_gives_the_local_frames(setup, local, tmp_path, schedule):
    expected = local.frames(schedule)
    with DevicesBackend("cpu,cpu") as backend:
        frames = run_job(setup, tmp_path / "devices", schedule, backend)
    assert frames.shape == expected.shape and len(frames) == FRAMES
    assert np.array_equal(frames, expected)
    assert len(list((tmp_path / "devices").glob("segments-*/segment_*.safetensors"))) == 2


def test_cancel_from_the_progress_callback_stops_the_devices_run(setup, tmp_path):
    def cancel(event):  # the first event: the heartbeat while the keyframe batch runs
        raise Interrupted("cancelled by the test")

    sink = FrameListSink()
    _, models = setup
    conditioning = random_conditioning(models, FRAMES)
    with DevicesBackend(["cpu", "cpu"]) as backend, pytest.raises(Interrupted):
        TalkingHeadJob(models, conditioning, SETTINGS, job_folder=tmp_path, backend=backend, progress=cancel).run(sink)
    assert sink.closed and not sink.frames


_DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import random_conditioning
from keyface.loading import find_model_files, load_models
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.scheduling import DevicesBackend
from keyface.video import FrameListSink

models = load_models(find_model_files({models!r}))
settings = GenerationSettings(num_steps={steps}, segments_per_call=1)
with DevicesBackend("cpu") as backend:  # one worker: segments finish one by one
    TalkingHeadJob(models, random_conditioning(models, {frames}), settings, job_folder={folder!r},
                   backend=backend).run(FrameListSink())
"""


def test_resume_after_the_driver_is_killed_gives_the_same_frames(setup, local, demo_models, tmp_path):
    """The driver (its keyframes already in the job folder) is SIGKILLed once it finished the first of the two
    segments; the rerun computes only the second and gives the local frames."""
    expected = local.frames(ALIGNED)
    folder = tmp_path / "killed"
    shutil.copytree(local.folder(ALIGNED), folder)
    for path in folder.glob("segments-*/segment_*.safetensors"):
        path.unlink()
    script = _DRIVER.format(
        tests=str(REPO_ROOT / "tests"),
        models=str(demo_models),
        steps=SETTINGS.num_steps,
        frames=FRAMES,
        folder=str(folder),
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", script], env=environment)
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob("segments-*/segment_*.safetensors")):
            assert driver.poll() is None, "the driver ended before finishing a segment"
            assert time.monotonic() < deadline, "the driver finished no segment in 120 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    finished = len(list(folder.glob("segments-*/segment_*.safetensors")))
    assert finished == 1, f"{finished} of 2 segments finished before the kill"
    with DevicesBackend("cpu,cpu") as backend:
        assert np.array_equal(run_job(setup, folder, ALIGNED, backend), expected)


def test_the_local_backend_is_the_default_and_has_no_submit():
    assert isinstance(make_backend(), LocalBackend) and not LocalBackend().parallel
    with pytest.raises(InputError, match="either --devices"):
        make_backend(devices="cpu", workers=2)
    with pytest.raises(InputError, match="devices: 'gpu7'"):
        DevicesBackend("gpu7")


def test_ray_missing_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(KeyFaceError, match=r"pip install 'ray>=2\.9' into the Python that runs KeyFace") as caught:
        import_ray()
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_backend(setup):
    try:
        import ray
    except ImportError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"ray is not importable on CI ({error}); scripts/install.sh installs the [ray] extra")
        pytest.skip(f"ray is not installed ({error}); pip install '.[ray]'")
    from keyface.scheduling import RayBackend

    python_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}}, log_to_driver=False
    )
    backend = RayBackend(setup[0], workers=2)
    yield backend
    backend.close()
    ray.shutdown()


def test_ray_backend_gives_the_local_frames(setup, local, ray_backend, tmp_path):
    assert np.array_equal(run_job(setup, tmp_path / "ray", REFERENCE, ray_backend), local.frames(REFERENCE))


def test_a_killed_ray_worker_has_its_task_run_again_and_the_frames_stay_the_same(setup, local, ray_backend, tmp_path):
    """The aligned schedule's Ray frames, with one actor SIGKILLed while each runs one of the two segments: the
    other runs that segment again (a replacement actor starts meanwhile, serving once it has loaded)."""
    expected = local.frames(ALIGNED)
    victim = ray_backend.worker_pids()[0]
    before = ray_backend.resubmitted
    killed = []

    def kill_a_worker(event):
        if event.stage == INTERPOLATION and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    frames = run_job(setup, tmp_path / "fault", ALIGNED, ray_backend, progress=kill_a_worker)
    assert killed and ray_backend.resubmitted == before + 1
    assert len(frames) == FRAMES and np.array_equal(frames, expected)


class _BadKeyframeNoise(SeededNoise):
    """Keyframe noise of the wrong shape: the sampler (in the worker) refuses it, in the job's first task."""

    def draw(self, index: int) -> torch.Tensor:
        noise = super().draw(index)
        return noise[:-1] if self.draws[index].kind is DrawKind.KEYFRAMES else noise


def test_a_task_input_error_fails_the_job_with_the_original_message(setup, ray_backend, tmp_path):
    _, models = setup
    conditioning = random_conditioning(models, FRAMES)
    noise = _BadKeyframeNoise(
        TalkingHeadJob(models, conditioning, SETTINGS, job_folder=tmp_path / "p").schedule, models.latent_shape
    )
    messages = []
    for name, backend in (("local", None), ("ray", ray_backend)):
        with pytest.raises(InputError) as caught:
            run_job(setup, tmp_path / name, ALIGNED, backend, noise=noise)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "noise has shape" in messages[1] and "\n" not in messages[1]
