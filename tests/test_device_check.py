"""bench/device_check.py runs in-process at its smallest settings and prints parseable JSON lines."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

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


def test_memory_is_null_on_a_cpu_next_to_the_estimate(lines):
    peaks = metric(lines, "peak_bytes")
    assert {(line["step"], line["offload"]) for line in peaks} == {
        (step, mode)
        for step in ("identity", "keyframes", "segments", "decode")
        for mode in ("none", "stage", "sequential", "stream")
    }
    assert all(line["value"] is None and line["estimate_bytes"] > 0 for line in peaks)
    none = {line["step"]: line["estimate_bytes"] for line in peaks if line["offload"] == "none"}
    stage = {line["step"]: line["estimate_bytes"] for line in peaks if line["offload"] == "stage"}
    assert all(none[step] > stage[step] for step in stage)  # all parts resident vs the step's own


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
