"""Per-task overhead of the scale-out backends (keyface.scheduling), and a projection of the speed-up on N GPUs.

Not part of the test suite. On the demo's tiny random weights (:mod:`keyface.demo`) and random conditioning, one
job of ``--frames`` frames (one segment per call) runs on each backend into a fresh job folder:

* ``local``: the job's own models in this process: its stage-2 time per segment is the *segment compute* ``t``;
  a second run in the same folder (everything read back) gives the driver's *decode time* per segment ``d``.
* ``devices`` with 1 and 2 CPU "devices", ``ray`` (a local Ray cluster) with 1 and 2 actors: wall time per
  segment. With one worker the work is serial, so (wall - local wall) / tasks is the backend's *overhead per
  task* ``o`` (scheduling, serialising the inputs and the latents, the driver's bookkeeping).

Projection for N GPUs (N = 1, 2, 4, 8), with ``t`` measured here or given (``--segment-seconds``: a real
segment's GPU time), ``o`` the Ray overhead measured here and ``d`` the decode time per segment (measured, or
scaled like ``t`` when ``t`` is given)::

    speed-up(N) = (t + d) / max(d, (t + o) / N)

Assumptions (printed): every segment (and keyframe batch) is an independent task of equal cost; the N workers
are kept busy (the window holds 2 tasks per worker); the driver decodes frames in order at the same time, one
worker's worth of VAE decoding per segment, so it bounds the throughput; network and model loading time are not
counted (actors load once per run); the CPU measurement here shares cores between workers, so its 2-worker
speed-up understates what separate GPUs give.

stdout: one JSON object per line (``{"metric": "ray_overhead_ms_per_task", "value": ...}``); stderr: tables.

    python bench/scaling.py                         # demo weights, measured t
    python bench/scaling.py --segment-seconds 1.8   # projection for a GPU with 1.8 s per segment
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

GPU_COUNTS = (1, 2, 4, 8)


def emit(metric: str, value: float) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 6)}), flush=True)


def timed_run(models, conditioning, settings, folder: Path, backend=None) -> float:
    """Wall seconds of one job into a frame list."""
    from keyface.pipeline import TalkingHeadJob
    from keyface.video import FrameListSink

    started = time.perf_counter()
    TalkingHeadJob(models, conditioning, settings, job_folder=folder, backend=backend).run(FrameListSink())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=27, help="frames of the test job (default 27: 2 segments)")
    parser.add_argument("--segment-seconds", type=float, default=None, help="per-segment GPU time to project from")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    args = parser.parse_args(argv)

    from helpers import random_conditioning

    from keyface.demo import install_demo_weights
    from keyface.loading import find_model_files, load_models
    from keyface.pipeline import GenerationSettings
    from keyface.schedule import plan_schedule
    from keyface.scheduling import DevicesBackend

    work = Path(tempfile.mkdtemp(prefix="keyface-scaling-"))
    files = find_model_files(install_demo_weights(work / "weights"))
    models = load_models(files)
    conditioning = random_conditioning(models, args.frames)
    settings = GenerationSettings(num_steps=10, segments_per_call=1)
    schedule = plan_schedule(args.frames, settings.schedule)
    tasks = len(schedule.segments) + len(schedule.batches)
    segments = len(schedule.segments)

    timed_run(models, random_conditioning(models, 14), settings, work / "warm-up")  # first-call costs
    local_wall = timed_run(models, conditioning, settings, work / "local")
    reread_wall = timed_run(models, conditioning, settings, work / "local")
    compute = (local_wall - reread_wall) / tasks  # network time per task (segment or keyframe batch)
    decode = reread_wall / segments
    emit("local_s_per_task", compute)
    emit("decode_s_per_segment", decode)
    rows = [("local", 1, local_wall, 0.0)]

    def measure(name: str, workers: int, backend) -> float:
        wall = timed_run(models, conditioning, settings, work / f"{name}{workers}", backend)
        overhead = (wall - local_wall) / tasks if workers == 1 else float("nan")
        rows.append((name, workers, wall, overhead))
        emit(f"{name}_{workers}w_wall_s", wall)
        if workers == 1:
            emit(f"{name}_overhead_ms_per_task", overhead * 1000)
        return overhead

    for workers in (1, 2):
        with DevicesBackend(["cpu"] * workers) as backend:
            measure("devices", workers, backend)
    ray_overhead = None
    if not args.no_ray:
        import ray

        from keyface.scheduling import RayBackend

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            with RayBackend(files, workers=workers) as backend:
                backend.worker_pids()  # wait until the actors have loaded their models: not part of a task
                overhead = measure("ray", workers, backend)
                ray_overhead = overhead if workers == 1 else ray_overhead
        ray.shutdown()

    print(f"\n{'backend':8} {'workers':>7} {'wall s':>8} {'overhead ms/task':>17}", file=sys.stderr)
    for name, workers, wall, overhead in rows:
        shown = "" if overhead != overhead or name == "local" else f"{overhead * 1000:17.1f}"
        print(f"{name:8} {workers:>7} {wall:8.2f} {shown:>17}", file=sys.stderr)
    print(f"segment compute on this CPU: {compute * 1000:.0f} ms per task ({tasks} tasks)", file=sys.stderr)

    overhead = max(ray_overhead if ray_overhead is not None else rows[1][3], 0.0)
    segment = args.segment_seconds if args.segment_seconds is not None else compute
    decode_share = decode * (segment / compute if compute > 0 else 1.0)
    print(
        f"\nprojection: t = {segment:.3f} s per segment ({'given' if args.segment_seconds else 'measured'}), "
        f"o = {overhead * 1000:.1f} ms per task, d = {decode_share:.3f} s driver decode per segment",
        file=sys.stderr,
    )
    print(
        "assumptions: independent equal-cost tasks; N workers kept busy (2 tasks in flight each); the driver "
        "decodes in order meanwhile and bounds throughput at 1/d; model loading and network latency not counted",
        file=sys.stderr,
    )
    for count in GPU_COUNTS:
        speedup = (segment + decode_share) / max(decode_share, (segment + overhead) / count)
        emit(f"projected_speedup_{count}_gpus", speedup)
        print(f"  N = {count}: speed-up {speedup:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
