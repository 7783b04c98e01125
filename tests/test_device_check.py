"""bench/device_check.py runs in-process at its smallest settings and prints parseable JSON lines."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lines(device_check) -> list[dict]:
    out = io.StringIO()
    argv = ["--device", "cpu", "--size", "64", "--model", "tiny", "--precisions", "fp32", "--sweep", "1", "2"]
    assert device_check.main([*argv, "--repeats", "1"], out=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def metric(lines, name: str) -> list[dict]:
    return [line for line in lines if line["metric"] == name]


def test_every_line_is_a_metric_with_a_value(lines):
    assert lines and all({"metric", "value"} <= set(line) for line in lines)
    assert lines[0]["metric"] == "setup" and lines[-1]["metric"] == "total_s"
    assert lines[0]["device"] == "cpu" and lines[0]["model"] == "tiny"


def test_step_times_and_compute_per_video_second(lines):
    steps = {(line["step"], line.get("segments_per_call")) for line in metric(lines, "step_s") if "offload" not in line}
    assert steps == {("keyframes", None), ("decode", None), ("segments", 1), ("segments", 2)}
    assert {line["step"] for line in metric(lines, "step_s") if line.get("offload") == "stream"} == {
        "keyframes",
        "segments",
    }
    assert all(line["value"] > 0 for line in metric(lines, "step_s"))
    per_video = metric(lines, "compute_s_per_video_s")
    assert [line["segments_per_call"] for line in per_video] == [1, 2] and all(line["value"] > 0 for line in per_video)


def test_cpu_peaks_are_counted_weights_plus_measured_activations_next_to_the_estimate(lines):
    peaks = metric(lines, "peak_bytes")
    assert {(line["step"], line["offload"]) for line in peaks} == {
        (step, mode)
        for step in ("identity", "keyframes", "segments", "decode")
        for mode in ("none", "stage", "sequential", "stream")
    }
    for line in peaks:
        assert line["measure"] == "cpu_live_tensor_bytes" and line["estimate_bytes"] > 0
        assert line["activation_bytes"] > 0 and line["value"] == line["weight_bytes"] + line["activation_bytes"]
        assert line["moves_weights"] == (line["offload"] == "stream")  # one device: only streaming's hooks move
    by = {(line["step"], line["offload"]): line for line in peaks}
    for step in ("identity", "keyframes", "segments", "decode"):
        # nothing moves in these three modes on a CPU: one computation, measured once
        assert len({by[step, mode]["activation_bytes"] for mode in ("none", "stage", "sequential")}) == 1
        assert by[step, "none"]["weight_bytes"] > by[step, "stage"]["weight_bytes"]  # all parts vs the step's own
        assert 0 < by[step, "stream"]["room_bytes"] == by[step, "stream"]["weight_bytes"]
        assert by[step, "stream"]["room_bytes"] <= by[step, "stage"]["weight_bytes"]
    none = {line["step"]: line["estimate_bytes"] for line in peaks if line["offload"] == "none"}
    stage = {line["step"]: line["estimate_bytes"] for line in peaks if line["offload"] == "stage"}
    assert all(none[step] > stage[step] for step in stage)
    sweep = metric(lines, "segments_per_call")
    assert all(line["measure"] == "cpu_live_tensor_bytes" and line["activation_bytes"] > 0 for line in sweep)
    assert sweep[0]["activation_bytes"] < sweep[1]["activation_bytes"]  # two segments per call hold more


def test_activation_calibration_is_close_to_the_constants(lines):
    factors = {line["step"]: line for line in metric(lines, "activation_factor")}
    assert set(factors) == {"keyframes", "segments", "decode", "identity"}
    for line in factors.values():
        assert line["measured_bytes"] > 0
        assert line["value"] <= line["constant"] <= 3 * line["value"]  # the constants err on the safe side


def test_fp32_against_itself_is_exact(lines):
    (difference,) = metric(lines, "max_abs_diff")
    assert difference["precision"] == "fp32" and difference["value"] == 0.0


def test_a_spent_time_budget_skips_the_rest(device_check):
    out = io.StringIO()
    argv = ["--device", "cpu", "--size", "64", "--model", "tiny", "--precisions", "fp32", "--time-budget", "0"]
    assert device_check.main(argv, out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["metric"] for line in lines] == ["setup", *["activation_factor"] * 4, "skipped", "total_s"]


def test_a_default_cpu_run_measures_fp32_and_bf16_and_says_why_fp16_is_left_out(device_check):
    out = io.StringIO()
    argv = ["--device", "cpu", "--size", "64", "--model", "tiny", "--time-budget", "0"]
    assert device_check.main(argv, out=out) == 0
    skipped = [json.loads(line) for line in out.getvalue().splitlines() if '"skipped"' in line]
    assert [line["value"] for line in skipped] == ["fp16", "fp32", "bf16"]
    assert "no fast kernels" in skipped[0]["reason"] and skipped[1]["reason"] == "time budget spent"


def test_the_sweep_skips_a_count_whose_expected_time_passes_the_deadline(device_check, monkeypatch):
    budget = device_check.Budget(100.0)
    assert budget.fits(50.0) and not budget.fits(150.0) and device_check.Budget(None).fits(1e9)
    monkeypatch.setattr(device_check, "timed", lambda *args, **kwargs: 10.0)  # a step of one segment: 10 s
    monkeypatch.setattr(device_check, "peak_of", lambda run, device: (1000, 0.0))
    monkeypatch.setattr(device_check, "segment_step", lambda *args: None)

    class Models:
        interpolation = torch.nn.Linear(1, 1)

    class Estimate:
        def activations(self, step, segments):
            return 1

    class Args:
        warmup, repeats = 0, 1

    out = io.StringIO()
    budget = device_check.Budget(50.0)  # 1 segment: 10 s; 4 segments: 2 runs x 4 x 10 s = 80 s > the 50 s left
    per_call = device_check.segments_sweep(out, Models(), None, Estimate(), "fp32", [1, 4], Args(), budget)
    assert set(per_call) == {1}
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[-1]["metric"] == "skipped" and lines[-1]["value"] == "segments_per_call 4"
    assert lines[-1]["reason"].startswith("time budget: about 80 s")
