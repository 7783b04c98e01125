"""The memory estimate, segments_per_call "auto", the offload choice of the CLI, the CPU run estimate and
``python -m keyface plan``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import random_conditioning

from keyface import memory
from keyface.cli import EXIT_USER_ERROR, main
from keyface.config import StageConfig
from keyface.demo import write_demo_inputs
from keyface.errors import InputError
from keyface.loading import find_model_files, load_models
from keyface.memory import (
    DECODE_BLOCK_FRAMES,
    MEMORY_MARGIN,
    OFFICIAL_PARAMETERS,
    MemoryEstimate,
    config_parameters,
    meta_parameters,
)
from keyface.models.bundle import Residency
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.progress import ESTIMATE, ProgressEvent, cpu_estimate_event, terminal_progress_bar
from keyface.schedule import plan_schedule
from keyface.video import FrameListSink

REPO_ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3


@pytest.fixture(scope="module")
def loaded(demo_models):
    return load_models(find_model_files(demo_models))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), seconds=1.0)


def official_estimate(dtype_bytes: int = 2) -> MemoryEstimate:
    """The estimate ``plan`` makes for the official models (decoder calls of a block of 13 frames + 2 shared)."""
    keyframe, interpolation = StageConfig.official("keyframe"), StageConfig.official("interpolation")
    parameters = config_parameters(keyframe, interpolation)
    return MemoryEstimate(keyframe, interpolation, parameters, dtype_bytes).with_decode_block(DECODE_BLOCK_FRAMES)


# ---- the estimate -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_size", [64, 32])
def test_the_official_parameter_table_is_what_the_networks_hold(latent_size):
    keyframe, interpolation = (
        dataclasses.replace(StageConfig.official(kind), latent_size=latent_size)
        for kind in ("keyframe", "interpolation")
    )
    built = meta_parameters(keyframe, interpolation)
    assert config_parameters(keyframe, interpolation) == built
    if latent_size == 64:
        assert built == OFFICIAL_PARAMETERS


def test_weights_of_loaded_models_are_their_parameter_bytes(loaded):
    estimate = MemoryEstimate.for_models(loaded)
    unets = sum(p.numel() for p in loaded.interpolation.parameters()) + sum(
        p.numel() for p in loaded.autoguidance.parameters()
    )
    assert estimate.weights("segments") == 4 * unets
    configs = (loaded.keyframe.config, loaded.interpolation.config, loaded.identity_encoder.config)
    assert estimate.parameters == config_parameters(*configs)


def test_the_activation_estimate_covers_a_measured_forward(loaded):
    """The factors are calibrated so that the estimate is at or above the measured peak, and not wildly above."""
    from keyface.sampling import sample_segments

    estimate = MemoryEstimate.for_models(loaded)
    start = torch.randn(2, *loaded.latent_shape) * 0.2
    audio = torch.randn(2, 14, 2, loaded.interpolation.config.audio_feature_dim)
    noise = torch.randn(28, *loaded.latent_shape)
    with memory.activation_peak_bytes() as tracker:
        sample_segments(loaded.interpolation, loaded.autoguidance, start, start, audio, noise)
    assert 0 < tracker.peak <= estimate.activations("segments", 2) <= 3 * tracker.peak


@pytest.mark.parametrize("budget_gb", [0.001, 6, 9, 12, 16, 24, 48, 80, 1000])
@pytest.mark.parametrize("mode", ["stage", "none"])
def test_auto_segments_per_call_fits_the_budget(budget_gb, mode):
    estimate = official_estimate()
    budget = round(budget_gb * GB)
    count = estimate.segments_per_call(budget, mode)
    assert 1 <= count <= memory.MAX_SEGMENTS_PER_CALL
    resident = estimate.all_weights() if mode == "none" else estimate.weights("segments")
    usable = budget * (1 - MEMORY_MARGIN)
    if count > 1:
        assert resident + estimate.activations("segments", count) <= usable
    if count < memory.MAX_SEGMENTS_PER_CALL and resident + estimate.activations("segments", 1) <= usable:
        assert resident + estimate.activations("segments", count + 1) > usable  # the most that fit, not fewer


def test_auto_segments_per_call_grows_with_the_budget():
    estimate = official_estimate()
    counts = [estimate.segments_per_call(gb * GB) for gb in (8, 12, 16, 24, 40, 80)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 4


def test_auto_for_loaded_models_uses_the_given_budget_and_the_cpu_fallback(loaded):
    estimate = MemoryEstimate.for_models(loaded)
    budget = estimate.all_weights() + estimate.activations("segments", 5)
    budget = round(budget / (1 - MEMORY_MARGIN)) + 1
    assert memory.auto_segments_per_call(loaded, budget, fallback=2) == 5  # no residency: everything resident
    assert memory.auto_segments_per_call(loaded, fallback=3) == 3  # a CPU: nothing to fit


def test_the_offload_choice_follows_the_free_memory():
    estimate = official_estimate()
    smallest = estimate.with_decode_block(1)  # the decode block shrinks to fit, so it does not force an offload
    assert estimate.offload_mode(None) == "none"
    assert estimate.offload_mode(1000 * GB) == "none"
    assert estimate.offload_mode(round(smallest.peak("stage") / (1 - MEMORY_MARGIN)) + 1) == "stage"
    assert estimate.offload_mode(round(smallest.peak("stage") / (1 - MEMORY_MARGIN)) - 1) == "stream"
    assert estimate.offload_mode(8 * GB) == "stream"
    assert estimate.peak("none") > estimate.peak("stage") == estimate.peak("sequential")
    assert smallest.peak("stage") > smallest.peak("stream")  # streaming leaves mostly the activations to fit
    assert 10 * smallest.stream_weights("segments") < smallest.weights("segments")
    assert smallest.stream_weights("decode") == smallest.weights("decode")  # one block: nothing to prefetch


@pytest.mark.parametrize("budget_gb", [0.001, 4, 8, 12, 24, 80])
def test_the_decode_block_fits_the_budget(budget_gb):
    """Official sizes in fp32 VAE: the largest step at 13 frames per call (~17 GB) would force offloading on a
    12 GB card; the decode block shrinks instead, 1 .. 13 frames, the most that fit."""
    estimate = official_estimate()
    budget = round(budget_gb * GB)
    block = estimate.decode_block(budget, "stage")
    assert 1 <= block <= DECODE_BLOCK_FRAMES
    usable = budget * (1 - MEMORY_MARGIN)

    def fits(frames: int) -> bool:
        return estimate.weights("decode") + estimate.with_decode_block(frames).activations("decode") <= usable

    if block > 1:
        assert fits(block)
    if block < DECODE_BLOCK_FRAMES and fits(1):
        assert not fits(block + 1)
    if budget_gb == 12:
        assert 1 < block < DECODE_BLOCK_FRAMES
    if budget_gb == 80:
        assert block == DECODE_BLOCK_FRAMES


def test_decoded_frames_do_not_depend_on_the_decode_block(loaded, tmp_path):
    """The block only groups frames into decoder calls (the second run reads the latents back from the job
    folder): the pictures are the same for any block size, up to float rounding."""
    conditioning = random_conditioning(loaded, 29)
    videos = {}
    for block in (None, 4):
        job = TalkingHeadJob(loaded, conditioning, GenerationSettings(segments_per_call=2), job_folder=tmp_path)
        if block is not None:
            job._decode_block = block
        sink = FrameListSink()
        job.run(sink)
        videos[job.decode_block] = sink.stack().astype(int)
    assert sorted(videos) == [4, DECODE_BLOCK_FRAMES]  # auto on a CPU: the full block
    assert np.abs(videos[4] - videos[DECODE_BLOCK_FRAMES]).max() <= 1  # other CPU kernels per batch size


def test_segments_per_call_auto_and_bad_values():
    assert GenerationSettings().segments_per_call is None
    assert GenerationSettings(segments_per_call="auto").segments_per_call is None
    for bad in (0, -1, 1.5, "many", True):
        with pytest.raises(InputError, match="^segments_per_call must be an integer >= 1 or 'auto'"):
            GenerationSettings(segments_per_call=bad)


def test_frames_do_not_depend_on_segments_per_call(loaded, tmp_path):
    """Up to float rounding: a batch of another size may take other CPU kernels (measured: latents within
    8e-6, a few uint8 values in 100,000 off by one)."""
    conditioning = random_conditioning(loaded, 45)
    latents, frames = {}, {}
    for per_call in (1, 3, None):
        settings = GenerationSettings(segments_per_call=per_call)
        job = TalkingHeadJob(loaded, conditioning, settings, job_folder=tmp_path / str(per_call))
        latents[per_call] = torch.cat([job.segment(k) for k in range(len(job.schedule.segments))])
        sink = FrameListSink()
        job.run(sink)
        frames[per_call] = sink.stack().astype(int)
        assert job.segments_per_call == (per_call or 2)  # auto on a CPU: the original's 2
    for per_call in (3, None):
        assert torch.allclose(latents[per_call], latents[1], rtol=0, atol=1e-4)
        difference = np.abs(frames[per_call] - frames[1])
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


# ---- the offload mode of the CLI --------------------------------------------------------------------------------


def test_place_models_installs_the_chosen_residency(loaded, monkeypatch):
    from keyface.generate import place_models

    models = dataclasses.replace(loaded)
    estimate = MemoryEstimate.for_models(models).with_decode_block(1)  # what the offload choice assumes
    assert place_models(models, "cpu") == "none" and models.residency.mode == "none"
    assert place_models(models, "cuda", "stage") == "stage"  # given explicitly; nothing moves before a step
    assert (models.residency.device, models.residency.offload_device) == (torch.device("cuda"), torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in models.keyframe.parameters())
    stage_fits = round(estimate.peak("stage") / (1 - MEMORY_MARGIN)) + 1
    assert estimate.peak("none") > stage_fits * (1 - MEMORY_MARGIN)  # so "stage" is the choice, not "none"
    for budget, expected in ((stage_fits, "stage"), (estimate.weights("segments") // 2, "stream")):
        monkeypatch.setattr(memory, "free_device_memory", lambda device, budget=budget: budget)
        assert place_models(models, "cuda") == expected and models.residency.mode == expected
    with pytest.raises(InputError, match="--offload must be auto or one of none, stage, sequential, stream"):
        place_models(models, "cuda", "everything")


def read_video_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_offload_modes_give_identical_videos_through_the_cli(demo_models, inputs, tmp_path, monkeypatch):
    """Each mode runs the CLI with a residency whose device is a stand-in (moves are recorded, not made)."""
    import keyface.models.bundle as bundle

    moves: dict[str, list] = {}

    class Recording(Residency):
        def __init__(self, device, offload_device, mode):
            record = moves.setdefault(mode, [])
            super().__init__(
                torch.device("cuda"),
                offload_device,
                mode,
                load=lambda parts: record.extend(("load", name) for name in parts),
                unload=lambda parts: record.extend(("unload", name) for name in parts),
            )

    monkeypatch.setattr(bundle, "Residency", Recording)
    image, audio = inputs
    videos = {}
    for mode in ("none", "stage", "sequential"):
        out = tmp_path / f"{mode}.mp4"
        argv = ["generate", "--image", str(image), "--audio", str(audio), "--out", str(out)]
        assert main([*argv, "--models", str(demo_models), "--offload", mode, "--device", "cpu"]) == 0
        videos[mode] = read_video_frames(out)
    assert np.array_equal(videos["none"], videos["stage"]) and np.array_equal(videos["none"], videos["sequential"])
    assert moves["none"] == []
    assert ("load", "keyframe") in moves["stage"] and ("load", "decoder") in moves["stage"]
    # sequential returns every part after its step: as many unloads as loads
    assert [m for m, _ in moves["sequential"]].count("unload") == [m for m, _ in moves["sequential"]].count("load")


def test_speed_flags_call_apply_speed_options(demo_models, inputs, tmp_path, monkeypatch):
    from keyface.models import speed

    calls = []
    monkeypatch.setattr(speed, "apply_speed_options", lambda models, **options: calls.append(options))
    image, audio = inputs
    argv = ["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp_path / "v.mp4")]
    assert main([*argv, "--models", str(demo_models), "--device", "cpu", "--compile", "--channels-last"]) == 0
    assert calls == [{"compile": True, "channels_last": True}]


# ---- the CPU run estimate ---------------------------------------------------------------------------------------


def test_a_cpu_run_announces_its_duration_once_before_sampling(loaded, tmp_path):
    events: list[ProgressEvent] = []
    job = TalkingHeadJob(loaded, random_conditioning(loaded, 30), job_folder=tmp_path / "job", progress=events.append)
    job.run(FrameListSink())
    estimates = [i for i, event in enumerate(events) if event.stage == ESTIMATE]
    assert len(estimates) == 1
    assert events[estimates[0] - 1].stage == "keyframes" and events[estimates[0] - 1].completed == 1  # first call
    note = events[estimates[0]]
    assert "estimate" in note.detail and "GPU" in note.detail and "network calls" in note.detail
    sampling = [e for e in events if e.stage in ("keyframes", "interpolation")]
    assert (note.completed, note.total) == (1, events[estimates[0] - 1].total)
    assert len(sampling) > 1


def test_no_estimate_without_a_callback_or_off_the_cpu(loaded, tmp_path):
    events: list[ProgressEvent] = []

    class Elsewhere(Residency):  # a stand-in GPU: the parts do not move
        def step(self, models, names):
            return super().step(models, ())

    models = dataclasses.replace(
        loaded, residency=Elsewhere(torch.device("cuda"), torch.device("cpu"), "stage", load=lambda *a: None)
    )
    job = TalkingHeadJob(models, random_conditioning(loaded, 14), job_folder=tmp_path / "gpu", progress=events.append)
    job.generate_keyframes()
    assert events and not [e for e in events if e.stage == ESTIMATE]


def test_the_terminal_prints_the_estimate_as_one_line(capsys):
    with terminal_progress_bar() as on_event:
        on_event(ProgressEvent("keyframes", 1, 22, "keyframe batch 1/2, step 1/11"))
        on_event(cpu_estimate_event(3725.0, 484, 1, 22))
        on_event(ProgressEvent("keyframes", 2, 22, "keyframe batch 1/2, step 2/11"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert lines == [
        "note: running on the CPU: sampling will take about 1 h 02 min (484 network calls; an estimate from the time "
        "of the first call). KeyFace is meant for a GPU, where this takes a small fraction of that"
    ]


# ---- python -m keyface plan -------------------------------------------------------------------------------------


def run_plan(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_of_the_official_models(inputs, capsys):
    image, audio = inputs
    plan = run_plan(capsys, "--image", str(image), "--audio", str(audio), "--device", "cpu")
    schedule = plan_schedule(25)
    assert plan["frames"] == 25 and plan["seconds"] == 1.0
    assert (plan["keyframe_batches"], plan["segments"]) == (len(schedule.batches), len(schedule.segments))
    assert plan["keyframes"] == 2  # frames 0 and 13 (the one at 26 lies beyond the end)
    assert plan["calls"]["keyframe"] == len(schedule.batches) * 11
    assert plan["calls"]["interpolation"] == plan["calls"]["autoguidance"] == 11  # 2 segments, 2 per call
    assert (plan["offload"], plan["segments_per_call"], plan["budget_bytes"]) == ("none", 2, None)
    assert plan["disk_bytes"] == (len(schedule.batches) + len(schedule.segments)) * (14 * 4 * 64 * 64 * 4 + 512)
    estimate = official_estimate(dtype_bytes=4)
    assert plan["memory"]["segments"]["weights"] == estimate.weights("segments")
    assert plan["peaks"] == {mode: estimate.peak(mode, 2) for mode in ("none", "stage", "sequential", "stream")}


def test_plan_for_a_given_gpu_memory(inputs, capsys):
    image, audio = inputs
    plan = run_plan(capsys, "--image", str(image), "--audio", str(audio), "--vram", "12", "--precision", "bf16")
    estimate = official_estimate(dtype_bytes=2)
    assert plan["budget_bytes"] == 12 * GB
    assert plan["offload"] == estimate.offload_mode(12 * GB)
    assert plan["segments_per_call"] == estimate.segments_per_call(12 * GB, plan["offload"]) > 1
    assert plan["memory"]["keyframes"]["weights"] == 2 * OFFICIAL_PARAMETERS["keyframe"]


def test_plan_reads_the_sizes_of_a_models_folder(demo_models, loaded, inputs, capsys):
    image, audio = inputs
    plan = run_plan(capsys, "--image", str(image), "--audio", str(audio), "--models", str(demo_models))
    assert plan["memory"]["keyframes"]["weights"] == 4 * sum(p.numel() for p in loaded.keyframe.parameters())
    assert plan["disk_bytes"] == (plan["keyframe_batches"] + plan["segments"]) * (14 * 4 * 8 * 8 * 4 + 512)


def test_plan_prints_a_table_and_loads_no_network_code(inputs):
    image, audio = inputs
    code = (
        "import sys; from keyface.cli import main; "
        f"rc = main(['plan', '--image', {str(image)!r}, '--audio', {str(audio)!r}]); "
        "print('diffusers loaded' if 'diffusers' in sys.modules else 'no diffusers'); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "25 frames = 1.00 s" in result.stdout and "peak per offload mode" in result.stdout
    assert result.stdout.strip().endswith("no diffusers")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vram", "0"], "--vram 0: give the GPU memory in GB"),
        (["--size", "500"], "--size 500: give a multiple of 64 pixels"),
        (["--models", "/nonexistent/models"], "--models /nonexistent/models: no such folder"),
    ],
)
def test_plan_refuses_bad_input_with_one_line(inputs, capsys, argv, message):
    image, audio = inputs
    assert main(["plan", "--image", str(image), "--audio", str(audio), *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
