"""A long video through a per-frame node in batches (keyface.frame_batches, KeyFace Frame Batches -> Collect).

The per-frame node is the stand-in of core ``ImageUpscaleWithModel`` of test_upscale_host (2x nearest, then the
colour negative: an output no plain resize gives). Frames are compared exactly against the lossless batch store and
within H.264 tolerance in the final mp4; memory is measured in a subprocess, batch by batch through 60 s of video.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from keyface.constants import VIDEO_FPS
from keyface.errors import InputError
from keyface.frame_batches import BatchPlan, BatchStore, read_video_frames
from keyface.media import probe_media, read_video
from keyface.video import AudioTrack, Mp4Writer

SIDE = 32
SCALE = 2
SAMPLE_RATE = 16000
BATCH_FRAMES = 50  # frames per batch in the memory test


def source_frame(index: int, side: int = SIDE) -> np.ndarray:
    """A smooth moving pattern (H.264 keeps it close), uint8 (side, side, 3)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    phase = index / 7.0
    channels = [np.sin(2 * np.pi * (x + phase)), np.cos(2 * np.pi * (y - phase)), np.sin(2 * np.pi * (x + y))]
    return ((np.stack(channels, -1) * 0.4 + 0.5) * 255).astype(np.uint8)


def write_source(path: Path, num_frames: int, with_audio: bool = True) -> Path:
    """An mp4 of ``num_frames`` pattern frames at 25 fps (with a tone), written frame by frame."""
    audio = None
    if with_audio:
        t = np.arange(num_frames * SAMPLE_RATE // VIDEO_FPS, dtype=np.float32) / SAMPLE_RATE
        audio = AudioTrack((0.3 * np.sin(2 * np.pi * 440 * t))[None], SAMPLE_RATE)
    with Mp4Writer(path, VIDEO_FPS, audio) as writer:
        for index in range(num_frames):
            writer.write(source_frame(index))
    return path


def upscale(frames: np.ndarray) -> np.ndarray:
    """The stand-in ImageUpscaleWithModel on uint8 frames (n, h, w, 3): IMAGE in, IMAGE out, back to uint8."""
    from test_upscale_host import UpscaleModel, classic_node

    node = classic_node([])()
    image = torch.from_numpy(frames).float() / 255
    (upscaled,) = node.upscale(UpscaleModel(SCALE), image)
    return (upscaled.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def run_batches(source: Path, store: BatchStore, stop_after: int | None = None) -> int:
    """Process the missing batches of ``store`` from ``source``; returns how many were processed."""
    processed = 0
    while (index := store.next_batch()) is not None:
        if stop_after is not None and processed == stop_after:
            raise KeyboardInterrupt  # the artist pressed Cancel
        start, stop = store.plan.frame_range(index)
        store.save_batch(index, upscale(read_video_frames(source, start, stop)))
        processed += 1
    return processed


def test_read_video_frames_seeks_to_the_same_frames_as_a_full_decode(tmp_path):
    source = write_source(tmp_path / "in.mp4", 60, with_audio=False)
    everything = read_video(source)
    for start, stop in [(0, 7), (13, 29), (27, 28), (50, 60), (55, 80)]:
        part = read_video_frames(source, start, stop)
        assert part.shape == (min(stop, 60) - start, SIDE, SIDE, 3)
        np.testing.assert_array_equal(part, everything[start:stop])
    with pytest.raises(InputError, match="shorter"):
        read_video_frames(source, 70, 80)


def test_batches_are_stored_exactly_and_joined_into_one_mp4_with_audio(tmp_path):
    num_frames = 70
    source = write_source(tmp_path / "in.mp4", num_frames)
    decoded = read_video(source)
    store = BatchStore(tmp_path / "store", BatchPlan(num_frames, 16), VIDEO_FPS, {"file": "in.mp4"})
    assert store.plan.num_batches == 5 and store.plan.frame_range(4) == (64, 70)
    assert run_batches(source, store) == 5
    expected = upscale(decoded)
    assert expected.shape == (num_frames, SIDE * SCALE, SIDE * SCALE, 3)
    np.testing.assert_array_equal(np.stack(list(store.frames())), expected)  # the store is lossless

    clip = probe_media(source).audio
    track = AudioTrack(np.zeros((1, round(clip.duration * SAMPLE_RATE)), np.float32) + 0.1, SAMPLE_RATE)
    out = store.finish(tmp_path / "out.mp4", track)
    assert not store.folder.exists()
    info = probe_media(out)
    assert (info.video.width, info.video.height, info.video.num_frames) == (SIDE * SCALE, SIDE * SCALE, num_frames)
    assert info.audio is not None and abs(info.audio.duration - num_frames / VIDEO_FPS) < 0.07
    # the one encoder, fed the processed frames: the same frames as encoding them in one go
    with Mp4Writer(tmp_path / "reference.mp4", VIDEO_FPS) as reference:
        reference.write_frames(expected)
    joined = read_video(out)
    np.testing.assert_array_equal(joined, read_video(reference.path))
    difference = np.abs(joined.astype(np.int16) - expected).mean()
    print(f"mean |mp4 - processed| = {difference:.2f} / 255 (H.264 yuv420p, crf 18, 64 px)")
    assert difference < 8.0


def test_an_interrupted_run_resumes_at_the_first_missing_batch(tmp_path):
    source = write_source(tmp_path / "in.mp4", 40, with_audio=False)
    plan, identity = BatchPlan(40, 10), {"file": "in.mp4", "size": 1}
    store = BatchStore(tmp_path / "store", plan, VIDEO_FPS, identity)
    with pytest.raises(KeyboardInterrupt):
        run_batches(source, store, stop_after=2)
    assert store.next_batch() == 2
    reopened = BatchStore(tmp_path / "store", plan, VIDEO_FPS, identity)
    assert reopened.next_batch() == 2 and run_batches(source, reopened) == 2
    np.testing.assert_array_equal(np.stack(list(reopened.frames())), upscale(read_video(source)))
    # another source (or plan) in the same folder starts over
    assert BatchStore(tmp_path / "store", plan, VIDEO_FPS, {"file": "other.mp4"}).next_batch() == 0


def test_a_batch_that_lost_frames_is_refused_and_not_stored(tmp_path):
    store = BatchStore(tmp_path / "store", BatchPlan(20, 8), VIDEO_FPS, {})
    with pytest.raises(InputError, match="must keep every frame"):
        store.save_batch(0, [source_frame(i) for i in range(5)])
    assert store.next_batch() == 0 and not list(store.folder.glob("*.mkv"))


def _rss_samples_mib(seconds: int, folder: Path) -> list[float]:
    """The RSS of a subprocess that batches ``seconds`` of video through the upscaler into an mp4, sampled after
    every batch and after the join."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]),
        # a fixed mmap threshold: glibc's sliding one otherwise starts, at a random batch, to keep freed frame buffers
        # on the heap (a one-off step of ~20 MiB in RSS that is not memory in use)
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
    }
    done = subprocess.run(
        [sys.executable, __file__, str(seconds), str(folder)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_mib"]


def test_memory_does_not_grow_with_the_length(tmp_path):
    samples = _rss_samples_mib(60, tmp_path / "run")
    assert len(samples) == 60 * VIDEO_FPS // BATCH_FRAMES + 1
    # the allocator and the encoder keep a few MiB more or less from one batch to the next: compare the typical
    # level of the first and the last third of the run, not single samples
    third = len(samples) // 3
    early, late = np.median(samples[:third]), np.median(samples[-third:])
    batch_mib = BATCH_FRAMES * (SIDE * SCALE) ** 2 * 3 * 4 / 2**20  # one upscaled IMAGE batch, float32
    held_between = (len(samples) - third) * batch_mib  # what holding the frames would add from early to late
    print(
        f"RSS median, first third {early:.1f} MiB, last third {late:.1f} MiB (holding the frames: +{held_between:.0f})"
    )
    assert late - early < 0.3 * held_between


def _rss_mib() -> float:
    """Resident memory now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _measure(seconds: int, folder: Path) -> None:
    """Print the RSS after every batch and after the join, as JSON."""
    folder.mkdir(parents=True)
    num_frames = seconds * VIDEO_FPS
    source = write_source(folder / "in.mp4", num_frames, with_audio=False)
    store = BatchStore(folder / "store", BatchPlan(num_frames, BATCH_FRAMES), VIDEO_FPS, {"seconds": seconds})
    samples = []
    while (index := store.next_batch()) is not None:
        start, stop = store.plan.frame_range(index)
        store.save_batch(index, upscale(read_video_frames(source, start, stop)))
        samples.append(_rss_mib())
    out = store.finish(folder / "out.mp4")
    samples.append(_rss_mib())
    assert probe_media(out).video.num_frames == num_frames
    print(json.dumps({"rss_mib": samples}))


if __name__ == "__main__":
    _measure(int(sys.argv[1]), Path(sys.argv[2]))


# ---------------------------------------------------------------------------------------------------------
# the node pair in a loop, as ComfyUI's queue runs it


@pytest.fixture
def pair(node_pack, tmp_path, monkeypatch):
    """(Frame Batches, Collect, queued) with the output and batch folders under tmp_path; ``queued`` records the
    prompts Collect puts on the queue again."""
    from comfy_api.v0_0_2 import io

    module = sys.modules[f"{node_pack.__name__}.nodes.frame_batches"]
    host = sys.modules[f"{node_pack.__name__}.nodes.host"]
    monkeypatch.setenv("KEYFACE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "output").mkdir()
    host.configure(output=tmp_path / "output")
    queued = []
    monkeypatch.setattr(host, "queue_prompt_again", lambda prompt, extra_pnginfo, node_id: queued.append(node_id))
    prompt = {"1": {"class_type": "KeyFaceFrameBatches"}, "3": {"class_type": "KeyFaceCollect"}}
    batches = module.KeyFaceFrameBatches.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "1", io.Hidden.prompt: prompt})
    collect = module.KeyFaceCollect.PREPARE_CLASS_CLONE(
        {io.Hidden.unique_id: "3", io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: {"workflow": {"nodes": []}}}
    )
    yield batches, collect, queued
    host.configure(output=None)


def queue_runs(pair, source: Path, upscale_node, model, fail_on_call: int | None = None) -> str:
    """Run the prompt Frame Batches -> ImageUpscaleWithModel -> Collect once, then again for every re-queue."""
    batches, collect, queued = pair
    runs = len(queued) + 1
    while True:
        assert math.isnan(batches.fingerprint_inputs(batch_size=16, file=str(source)))  # never cached
        images, batch = batches.EXECUTE_NORMALIZED(batch_size=16, file=str(source)).args
        assert images.dtype == torch.float32 and images.shape[1:] == (SIDE, SIDE, 3)
        if fail_on_call is not None and len(upscale_node.calls) == fail_on_call:
            raise KeyboardInterrupt  # Cancel while the upscaler runs
        (upscaled,) = upscale_node.execute(model, images).args
        upscale_node.calls.append(len(images))
        (path,) = collect.EXECUTE_NORMALIZED(images=upscaled, batch=batch, crf=18, filename_prefix="video/batched").args
        if path:
            assert len(queued) == runs - 1  # every run but the last queued the next one, for Collect
            return path
        assert queued[-1] == "3" and len(queued) == runs
        runs += 1


def test_the_pair_runs_a_core_upscale_node_batch_by_batch_and_resumes_after_cancel(pair, tmp_path):
    from test_upscale_host import UpscaleModel, v3_node

    calls: list = []
    node = v3_node(calls, with_alias=False)
    node.calls = []
    source = write_source(tmp_path / "in.mp4", 70)
    with pytest.raises(KeyboardInterrupt):
        queue_runs(pair, source, node, UpscaleModel(SCALE), fail_on_call=2)
    path = queue_runs(pair, source, node, UpscaleModel(SCALE))
    assert node.calls == [16, 16, 16, 16, 6]  # 5 batches of 70 frames, each once: after Cancel, batch 3 onwards
    assert calls == [(16, SIDE, SIDE, 3)] * 4 + [(6, SIDE, SIDE, 3)]

    expected = upscale(read_video(source))
    with Mp4Writer(tmp_path / "reference.mp4", VIDEO_FPS) as reference:
        reference.write_frames(expected)
    np.testing.assert_array_equal(read_video(path), read_video(reference.path))
    info = probe_media(path)
    assert Path(path).parent == tmp_path / "output" / "video" and info.audio is not None
    assert "workflow" in info.metadata
    assert not list((tmp_path / "cache").rglob("*.mkv"))  # the batch folder went with the join


def test_the_prompt_is_queued_again_as_submitted_so_the_next_run_is_not_cached(node_pack):
    """ComfyUI 0.3.64 writes each node's fingerprint into the running prompt (``is_changed``) and reuses one it
    finds there: queued again with it, Frame Batches would be cached and the loop would repeat batch 1."""
    host = sys.modules[f"{node_pack.__name__}.nodes.host"]
    module = sys.modules[f"{node_pack.__name__}.nodes.frame_batches"]
    nan = module.KeyFaceFrameBatches.fingerprint_inputs(batch_size=8)
    running = {"1": {"class_type": "KeyFaceFrameBatches", "inputs": {"batch_size": 8}, "is_changed": [nan]}}
    assert host.submitted_prompt(running) == {"1": {"class_type": "KeyFaceFrameBatches", "inputs": {"batch_size": 8}}}
    assert "is_changed" in running["1"]  # the running prompt is left as it is
    again = module.KeyFaceFrameBatches.fingerprint_inputs(batch_size=8)
    assert [again] != [nan]  # a fresh NaN: never equal to the last one, even inside a list
