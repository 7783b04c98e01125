"""``python -m keyface plan``: what a generation will do and need, before any weight is loaded.

For an audio file: frames, keyframes, keyframe batches, segments, the network calls of each network at the
settings' step counts, the device memory of each step and each offload mode (:mod:`keyface.memory`), the
offload mode and segments per call ``generate`` would choose on this device (or for ``--vram`` GB), and the disk
use of the job folder. Sizes are the official ones, or those of the checkpoints in ``--models`` (read from their
tensor shapes; the networks are built on the ``meta`` device, which allocates nothing).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import StageConfig
from .constants import FRAMES_PER_CLIP, VIDEO_FPS
from .errors import InputError
from .memory import DECODE_BLOCK_FRAMES, STEPS, MemoryEstimate, config_parameters
from .models.bundle import OFFLOAD_MODES

# Bytes of one latent file of the job folder beyond its float32 tensor: the safetensors header and metadata.
LATENT_FILE_OVERHEAD = 512
GIB = 1024**3


@dataclass(frozen=True)
class JobPlan:
    """Counts, memory and disk of one generation (see the module docstring). ``calls``: network calls per
    network (a keyframe call runs 3 guidance branches x 14 frames; an interpolation call ``segments_per_call``
    segments). ``memory``: step -> bytes (weights, activations, peak); ``peaks``: offload mode -> peak bytes."""

    frames: int
    seconds: float
    keyframes: int
    keyframe_batches: int
    segments: int
    chunks: int
    calls: dict[str, int]
    memory: dict[str, dict[str, int]]
    peaks: dict[str, int]
    device: str
    budget_bytes: int | None
    offload: str
    segments_per_call: int
    decode_block: int
    disk_bytes: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def plan_job(
    frames: int,
    estimate: MemoryEstimate,
    settings=None,
    *,
    device: str = "cpu",
    budget_bytes: int | None = None,
    offload: str = "auto",
    autoguidance: bool = True,
) -> JobPlan:
    """The :class:`JobPlan` of ``frames`` 25-fps frames of audio with ``settings`` (a
    :class:`~keyface.pipeline.GenerationSettings`; default: the defaults) for memory ``budget_bytes`` (None: no
    device memory to fit, a CPU)."""
    from .pipeline import DEFAULT_SEGMENTS_PER_CALL, GenerationSettings
    from .schedule import SlotRole, plan_schedule

    settings = settings or GenerationSettings()
    schedule = plan_schedule(frames, settings.schedule)
    if offload == "auto":
        offload = estimate.offload_mode(budget_bytes)
    block = DECODE_BLOCK_FRAMES if budget_bytes is None else estimate.decode_block(budget_bytes, offload)
    estimate = estimate.with_decode_block(block)
    per_call = settings.segments_per_call
    if per_call is None:
        per_call = (
            DEFAULT_SEGMENTS_PER_CALL if budget_bytes is None else estimate.segments_per_call(budget_bytes, offload)
        )
    keyframes = {
        slot.frame
        for batch in schedule.batches
        for slot in batch.slots
        if slot.role is SlotRole.KEYFRAME and slot.frame < schedule.n_output_frames
    }
    segment_calls = sum(math.ceil(len(chunk.segments) / per_call) for chunk in schedule.chunks)
    guided = autoguidance and settings.autoguidance_scale != 1.0
    calls = {
        "identity_encoder": 1,
        "keyframe": len(schedule.batches) * settings.steps_per_sample,
        "interpolation": segment_calls * settings.segment_steps_per_sample,
        "autoguidance": segment_calls * settings.segment_steps_per_sample if guided else 0,
        "decoder": math.ceil(schedule.n_output_frames / block),
    }
    c, h, w = (
        estimate.interpolation.latent_channels,
        estimate.interpolation.latent_size,
        estimate.interpolation.latent_size,
    )
    latent_file = FRAMES_PER_CLIP * c * h * w * 4 + LATENT_FILE_OVERHEAD
    memory = {
        step: {
            "weights": estimate.weights(step),
            "activations": estimate.activations(step, per_call),
            "peak": estimate.step_peak(step, per_call),
        }
        for step in STEPS
    }
    return JobPlan(
        frames=schedule.n_output_frames,
        seconds=schedule.n_output_frames / VIDEO_FPS,
        keyframes=len(keyframes),
        keyframe_batches=len(schedule.batches),
        segments=len(schedule.segments),
        chunks=len(schedule.chunks),
        calls=calls,
        memory=memory,
        peaks={mode: estimate.peak(mode, per_call) for mode in OFFLOAD_MODES},
        device=device,
        budget_bytes=budget_bytes,
        offload=offload,
        segments_per_call=per_call,
        decode_block=block,
        disk_bytes=(len(schedule.batches) + len(schedule.segments)) * latent_file,
    )


def stage_configs(models_folder: Path | None, size: int | None) -> tuple[StageConfig, StageConfig]:
    """The official keyframe and interpolation configurations, or those of the checkpoints in ``models_folder``;
    at ``size`` pixels when given."""
    if models_folder is None:
        configs = (StageConfig.official("keyframe"), StageConfig.official("interpolation"))
    else:
        from .checkpoints import read_stage_config
        from .loading import find_stage_file

        folder = Path(models_folder).expanduser()
        if not folder.is_dir():
            raise InputError(f"--models {folder}: no such folder (leave it out to plan with the official sizes)")
        configs = tuple(read_stage_config(find_stage_file(folder, role)) for role in ("keyframe", "interpolation"))
    if size is None:
        return configs
    factor = configs[1].decoder.downsample_factor
    if size < 64 or size % 64:
        raise InputError(f"--size {size}: give a multiple of 64 pixels (512 is the official size)")
    return tuple(replace(config, latent_size=size // factor) for config in configs)


def plan_from_arguments(args) -> JobPlan:
    """``python -m keyface plan``'s arguments -> :class:`JobPlan` (reads the audio; no weights)."""
    from .audio.io import load_audio, num_video_frames, to_encoder_waveform
    from .generate import settings_from_arguments
    from .identity import load_identity_image
    from .loading import resolve_device, resolve_dtype
    from .memory import free_device_memory

    load_identity_image(args.image, name=f"--image {args.image}")
    clip = load_audio(args.audio)
    frames = num_video_frames(to_encoder_waveform(clip).shape[0])
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    settings = settings_from_arguments(args)
    keyframe, interpolation = stage_configs(args.models, args.size)
    autoguidance = settings.autoguidance_scale != 1.0
    estimate = MemoryEstimate(
        keyframe,
        interpolation,
        config_parameters(keyframe, interpolation, autoguidance=autoguidance),
        dtype.itemsize,
    ).with_decode_block(DECODE_BLOCK_FRAMES)
    if args.vram is not None:
        if not args.vram > 0:
            raise InputError(f"--vram {args.vram:g}: give the GPU memory in GB, e.g. --vram 12")
        budget, device_name = round(args.vram * GIB), f"GPU with {args.vram:g} GB free"
    else:
        budget, device_name = free_device_memory(device), str(device)
    return plan_job(
        frames,
        estimate,
        settings,
        device=device_name,
        budget_bytes=budget,
        offload=args.offload,
        autoguidance=autoguidance,
    )


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GB"


def format_plan(plan: JobPlan) -> str:
    """The plan as the text ``python -m keyface plan`` prints."""
    lines = [
        f"video      {plan.frames} frames = {plan.seconds:.2f} s at {VIDEO_FPS} fps",
        f"keyframes  {plan.keyframes} in {plan.keyframe_batches} keyframe batches; {plan.segments} segments in "
        f"{plan.chunks} chunks",
        "network calls " + ", ".join(f"{name} {count}" for name, count in plan.calls.items()),
        f"device     {plan.device}: offload {plan.offload}, segments per call {plan.segments_per_call}, "
        f"frames per decoder call {plan.decode_block}"
        + (f" (free {_gib(plan.budget_bytes)})" if plan.budget_bytes is not None else ""),
        "memory per step (estimate)      weights   activations          peak",
    ]
    for step, row in plan.memory.items():
        lines.append(f"  {step:<28}{_gib(row['weights']):>10}{_gib(row['activations']):>14}{_gib(row['peak']):>14}")
    lines.append("peak per offload mode  " + ", ".join(f"{mode} {_gib(peak)}" for mode, peak in plan.peaks.items()))
    lines.append(
        f"job folder about {plan.disk_bytes / 1024**2:.1f} MB of latents (removed after success unless --keep-job)"
    )
    return "\n".join(lines)


def plan_command(args) -> JobPlan:
    plan = plan_from_arguments(args)
    print(plan.to_json() if args.json else format_plan(plan), file=sys.stdout)
    return plan
