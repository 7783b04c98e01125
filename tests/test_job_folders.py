"""Job folders: where the nodes put them (ComfyUI's user folder, unless KEYFACE_CACHE_DIR is set), their removal
once Video Combine has written the whole video (unless the artist keeps them), and least-recently-used pruning
under a size cap, run whenever a job folder is opened, that never deletes the job in use."""

from __future__ import annotations

import os
import sys
import time
import types

import pytest
import torch
from test_nodes import PACK_NAME, FakeInterrupt, host, interrupt_after, run, write_speech

from keyface.jobs import JobFolder, prune_jobs
from keyface.paths import CACHE_DIR_ENV

job_folders = sys.modules[f"{PACK_NAME}.nodes.job_folders"]
samples = sys.modules[f"{PACK_NAME}.nodes.samples"]
LATENTS = torch.arange(14 * 4 * 8 * 8, dtype=torch.float32).reshape(14, 4, 8, 8)  # 14 KiB of job file


# ------------------------------------------------------------------------------------------ the library


def open_job(root, name: str, max_bytes: int = 2**40) -> JobFolder:
    """The job ``name`` in the size-capped jobs root ``root``, with one keyframe batch saved."""
    folder = JobFolder(None, {"job": name}, {"segments": 1}, root=root, max_bytes=max_bytes)
    if folder.keyframes(0) is None:
        folder.save_keyframes(0, LATENTS)
    return folder


def used(folder: JobFolder, seconds_ago: float) -> None:
    moment = time.time() - seconds_ago
    os.utime(folder.path, (moment, moment))


def folder_bytes(folder: JobFolder) -> int:
    return sum(path.stat().st_size for path in folder.path.rglob("*") if path.is_file())


def test_pruning_deletes_the_least_recently_used_jobs_first(tmp_path):
    jobs = {name: open_job(tmp_path, name) for name in "abcd"}
    for seconds_ago, name in zip((400, 300, 200, 100), "abcd", strict=True):
        used(jobs[name], seconds_ago)
    open_job(tmp_path, "a")  # reopened: a is now the most recently used
    size = folder_bytes(jobs["a"])
    removed = prune_jobs(tmp_path, max_bytes=2 * size)
    assert removed == [jobs["b"].path, jobs["c"].path]  # least recently used first, until two jobs remain
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([jobs["a"].path.name, jobs["d"].path.name])


def test_opening_a_job_prunes_the_others_but_never_the_job_in_use(tmp_path):
    old = open_job(tmp_path, "old")
    used(old, 60)
    current = open_job(tmp_path, "current", max_bytes=0)  # the cap cannot even hold the job being opened
    assert not old.path.exists()
    assert [path.name for path in tmp_path.iterdir()] == [current.path.name]
    current.save_keyframes(1, LATENTS + 1)
    assert torch.equal(current.keyframes(0), LATENTS) and torch.equal(current.keyframes(1), LATENTS + 1)
    reopened = open_job(tmp_path, "current", max_bytes=0)  # reopening it keeps its finished work
    assert torch.equal(reopened.keyframes(1), LATENTS + 1)


def test_reopening_a_job_marks_it_used(tmp_path):
    job = open_job(tmp_path, "a")
    used(job, 1000)
    before = job.path.stat().st_mtime
    JobFolder(job.path, {"job": "a"}, {"segments": 1})  # an explicit path (the Interpolator's) counts too
    assert job.path.stat().st_mtime > before + 900


def test_a_deleted_job_folder_is_set_up_again_when_its_job_saves(tmp_path):
    """A job still in use (a cached ComfyUI output) whose folder was pruned or removed recomputes and saves into
    a valid job folder again, which the next open accepts."""
    job = open_job(tmp_path, "a")
    job.remove()
    assert job.keyframes(0) is None
    job.save_keyframes(0, LATENTS)
    again = JobFolder(job.path, {"job": "a"}, {"segments": 1})
    assert torch.equal(again.keyframes(0), LATENTS)


# ------------------------------------------------------------------------------------------ the nodes


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    """A stand-in ``folder_paths`` module: the pack sees ComfyUI's user, input and temp folders."""
    folders = {name: tmp_path / name for name in ("user", "input", "temp")}
    fake = types.ModuleType("folder_paths")
    fake.get_user_directory = lambda: str(folders["user"])
    fake.get_input_directory = lambda: str(folders["input"])
    fake.get_temp_directory = lambda: str(folders["temp"])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    host._comfy.cache_clear()
    yield folders
    host._comfy.cache_clear()


def test_in_comfyui_job_folders_live_in_its_user_folder(comfyui, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    root = job_folders.jobs_root()
    assert root == comfyui["user"] / "keyface" / "jobs"
    assert comfyui["temp"] not in root.parents  # ComfyUI empties its temp folder at every start
    monkeypatch.setenv(CACHE_DIR_ENV, str(comfyui["user"].parent / "cache"))
    assert job_folders.jobs_root() == comfyui["user"].parent / "cache" / "jobs"


def test_in_comfyui_the_pack_puts_the_sample_inputs_into_its_input_folder(comfyui):
    samples.install_into_comfyui()
    assert sorted(path.name for path in comfyui["input"].iterdir()) == sorted(
        [samples.SAMPLE_PORTRAIT, samples.SAMPLE_SPEECH, samples.SAMPLE_SPEECH_LONG]
    )


@pytest.fixture(scope="module")
def loaded(demo_models, tmp_path_factory):
    """The demo weights' KEYFACE_MODEL and a short speech file in an input folder."""
    folder = tmp_path_factory.mktemp("input")
    write_speech(folder / "speech.wav")
    host.configure(models=demo_models, input=folder)
    try:
        (model,) = run("KeyFaceModelLoader", device="cpu")
    finally:
        host.configure(models=None, input=None)
    return model, folder


@pytest.fixture
def nodes(loaded, tmp_path):
    model, input_folder = loaded
    host.configure(models=None, input=input_folder, output=tmp_path / "output")
    try:
        yield model
    finally:
        host.configure(models=None, input=None, output=None)


def interpolated(model, seed: int, **interpolator):
    """Load Audio -> Crop Face (centre) -> Keyframe Sampler -> Keyframe Interpolator: the KEYFACE_VIDEO."""
    _, features, _, _ = run("KeyFaceLoadAudio", model=model, audio="speech.wav")
    picture = torch.rand(1, 72, 72, 3, generator=torch.Generator().manual_seed(seed))
    face, _, _ = run("KeyFaceCropFace", image=picture, mode="center", crop_size=64)
    keyframes, _ = run("KeyFaceKeyframeSampler", model=model, image=face, audio=features, seed=seed)
    (video,) = run("KeyFaceKeyframeInterpolator", keyframes=keyframes, **interpolator)
    return video


def segment_files(video) -> list[str]:
    return sorted(path.name for path in video.job.folder.segments_path.glob("segment_*.safetensors"))


def test_the_job_folder_is_removed_once_the_video_is_written(nodes):
    video = interpolated(nodes, seed=11)
    assert video.job.folder.path.parent == job_folders.jobs_root()
    assert segment_files(video) == ["segment_000000.safetensors", "segment_000001.safetensors"]
    frames = torch.stack(list(video.job.frames()))
    run("KeyFaceVideoCombine", video=video)
    assert not video.job.folder.path.exists()
    # ComfyUI keeps the video output: another Video Combine of it recomputes what the job no longer holds in
    # memory (all of it, for a video longer than the job's small caches), then removes the folder again
    video.job._batches.clear()
    video.job._segments.clear()
    assert torch.equal(torch.stack(list(video.job.frames())), frames)
    assert (video.job.folder.path / "job.json").is_file()
    assert segment_files(video) == ["segment_000000.safetensors", "segment_000001.safetensors"]
    run("KeyFaceVideoCombine", video=video)
    assert not video.job.folder.path.exists()


def test_the_job_folder_is_kept_when_asked(nodes):
    video = interpolated(nodes, seed=12, keep_job_folder=True)
    run("KeyFaceVideoCombine", video=video)
    assert segment_files(video) == ["segment_000000.safetensors", "segment_000001.safetensors"]
    assert (video.job.folder.path / "keyframes" / "batch_000000.safetensors").is_file()
    video.job.folder.remove()


def test_a_cancelled_video_keeps_its_job_folder(nodes, monkeypatch):
    video = interpolated(nodes, seed=13)
    monkeypatch.setattr(host, "check_interrupted", interrupt_after(3))
    with pytest.raises(FakeInterrupt):
        run("KeyFaceVideoCombine", video=video)
    assert segment_files(video) == ["segment_000000.safetensors", "segment_000001.safetensors"]
    video.job.folder.remove()
