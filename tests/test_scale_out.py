"""Scale-out backends (keyface.scheduling) on the tiny demo weights: the devices backend with two CPU "devices"
and a local two-CPU Ray cluster give the local backend's frames exactly (both schedules); a Ray worker killed
mid-run has its tasks run again; the driver killed mid-run resumes to the same frames; a task's input error
arrives as the original one-line error; a cancel from the progress callback stops the run."""

from __future__ import annotations

import os
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
FAULT_FRAMES = 40  # three segments: one is still to run when the first finishes
SETTINGS = GenerationSettings(num_steps=10, segments_per_call=1)


@pytest.fixture(scope="module")
def setup(demo_models):
    files = find_model_files(demo_models)
    models = load_models(files)
    return files, models


_references: dict[tuple[str, int], np.ndarray] = {}


def run_job(
    setup, folder: Path, schedule: str = ALIGNED, backend=None, frames: int = FRAMES, **job_options
) -> np.ndarray:
    _, models = setup
    conditioning = random_conditioning(models, frames)
    sink = FrameListSink()
    settings = GenerationSettings(num_steps=SETTINGS.num_steps, segments_per_call=1, schedule=schedule)
    TalkingHeadJob(models, conditioning, settings, job_folder=folder, backend=backend, **job_options).run(sink)
    return sink.stack()


def local_frames(setup, tmp_path, schedule: str, frames: int = FRAMES) -> np.ndarray:
    if (schedule, frames) not in _references:
        _references[schedule, frames] = run_job(setup, tmp_path / f"local-{schedule}", schedule, frames=frames)
    return _references[schedule, frames]


@pytest.mark.parametrize("schedule", [ALIGNED, REFERENCE])
def test_devices_backend_gives_the_local_frames(setup, tmp_path, schedule):
    expected = local_frames(setup, tmp_path, schedule)
    with DevicesBackend("cpu,cpu") as backend:
        frames = run_job(setup, tmp_path / "devices", schedule, backend)
    assert frames.shape == expected.shape and len(frames) == FRAMES
    assert np.array_equal(frames, expected)
    assert len(list((tmp_path / "devices").glob("segments-*/segment_*.safetensors"))) == 2


def test_cancel_from_the_progress_callback_stops_the_devices_run(setup, tmp_path):
    def cancel(event):
        if event.stage == INTERPOLATION:
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


def test_resume_after_the_driver_is_killed_gives_the_same_frames(setup, demo_models, tmp_path):
    expected = local_frames(setup, tmp_path, ALIGNED, FAULT_FRAMES)
    folder = tmp_path / "killed"
    script = _DRIVER.format(
        tests=str(REPO_ROOT / "tests"),
        models=str(demo_models),
        steps=SETTINGS.num_steps,
        frames=FAULT_FRAMES,
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
    assert 1 <= finished < 3, f"{finished} of 3 segments finished before the kill"
    with DevicesBackend("cpu,cpu") as backend:
        assert np.array_equal(run_job(setup, folder, ALIGNED, backend, FAULT_FRAMES), expected)


def test_the_local_backend_is_the_default_and_has_no_submit():
    assert isinstance(make_backend(), LocalBackend) and not LocalBackend().parallel
    with pytest.raises(InputError, match="either --devices"):
        make_backend(devices="cpu", workers=2)
    with pytest.raises(InputError, match="devices: 'gpu7'"):
        DevicesBackend("gpu7")


def test_ray_missing_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(KeyFaceError, match=r"pip install 'keyface\[ray\]'") as caught:
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
        pytest.skip(f"ray is not installed ({error}); pip install 'keyface[ray]'")
    from keyface.scheduling import RayBackend

    python_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}}, log_to_driver=False
    )
    backend = RayBackend(setup[0], workers=2)
    yield backend
    backend.close()
    ray.shutdown()


@pytest.mark.parametrize("schedule", [ALIGNED, REFERENCE])
def test_ray_backend_gives_the_local_frames(setup, ray_backend, tmp_path, schedule):
    expected = local_frames(setup, tmp_path, schedule)
    assert np.array_equal(run_job(setup, tmp_path / "ray", schedule, ray_backend), expected)


def test_a_killed_ray_worker_has_its_tasks_run_again(setup, ray_backend, tmp_path):
    expected = local_frames(setup, tmp_path, ALIGNED, FAULT_FRAMES)
    pids = ray_backend.worker_pids()
    killed = list(pids)
    before = ray_backend.resubmitted

    def kill_workers(event):
        if event.stage == INTERPOLATION and pids:
            for pid in pids:  # both: one of them is running the next segment
                os.kill(pid, signal.SIGKILL)
            pids.clear()

    frames = run_job(setup, tmp_path / "fault", ALIGNED, ray_backend, FAULT_FRAMES, progress=kill_workers)
    assert not pids and ray_backend.resubmitted > before
    assert len(frames) == FAULT_FRAMES and np.array_equal(frames, expected)
    assert set(ray_backend.worker_pids()).isdisjoint(killed)  # replacements serve on


class _BadSegmentNoise(SeededNoise):
    """Segment noise of the wrong shape: the sampler (in the worker) refuses it."""

    def draw(self, index: int) -> torch.Tensor:
        noise = super().draw(index)
        return noise[:-1] if self.draws[index].kind is DrawKind.SEGMENTS else noise


def test_a_task_input_error_fails_the_job_with_the_original_message(setup, ray_backend, tmp_path):
    _, models = setup
    conditioning = random_conditioning(models, FRAMES)
    noise = _BadSegmentNoise(
        TalkingHeadJob(models, conditioning, SETTINGS, job_folder=tmp_path / "p").schedule, models.latent_shape
    )
    messages = []
    for name, backend in (("local", None), ("ray", ray_backend)):
        with pytest.raises(InputError) as caught:
            run_job(setup, tmp_path / name, ALIGNED, backend, noise=noise)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "noise has shape" in messages[1] and "\n" not in messages[1]
