"""One prepared check of a device: speed and memory of every KeyFace step on random weights, as JSON lines.

For the day a GPU is lent: ``python bench/device_check.py`` (CUDA, official full sizes at 512x512, fp16 and bf16)
finishes in a few minutes on a data-centre GPU and prints, one JSON object per line (``{"metric", "value",
...}``):

* ``step_s``: seconds per denoising step of each stage (keyframes: 3 guidance branches x 14 frames;
  interpolation: main + autoguidance network, per segments-per-call) and per VAE decode block, per precision;
* ``peak_bytes``: peak device memory of each step under each offload mode (none / stage / sequential / stream),
  with the estimate of :mod:`keyface.memory` next to it (``estimate_bytes``) and the measured activation factor;
  ``step_s`` lines with ``offload: stream``: seconds per step when streaming block by block;
* ``compute_s_per_video_s``: seconds of compute per second of video at the official step counts;
* ``segments_per_call``: the sweep (seconds per segment and peak memory for each count);
* ``max_abs_diff``: one keyframe denoising step in fp16 / bf16 against fp32, same weights and inputs.

Every ``peak_bytes`` / ``segments_per_call`` line says what its memory value is (``measure``):
``cuda_max_memory_allocated`` on CUDA; ``cpu_live_tensor_bytes`` on a CPU: the peak bytes of the tensors a step
creates (:func:`keyface.memory.activation_peak_bytes`; the process's RSS barely moves, as the allocator reuses
freed heap), with the weights each offload mode keeps on the device counted next to it.

On a CPU (``--device cpu``, the default without CUDA) the networks keep the official structure at reduced
widths unless ``--model full`` (full-size init and steps take many minutes there; ``--model tiny``: the
demo's); the precisions are fp32 (what ``auto`` runs there) and bf16, fp16 is skipped with a ``skipped`` line
(:data:`CPU_SKIPPED`); steps run without a warm-up; the offload modes none / stage / sequential move nothing
(one device) while ``stream`` runs its hooks. ``--size 64`` finishes every section in about two to four
minutes on two cores::

    python bench/device_check.py --device cpu --size 64
    python bench/device_check.py --time-budget 300 --sweep 1 2 4 8 16

Weights are random (default init, seeded): nothing is read from disk. ``--time-budget`` skips what is left
(with a ``skipped`` line) once the budget is spent.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import sys
import time

import torch

from keyface.config import DecoderConfig, EncoderConfig, StageConfig
from keyface.constants import FRAMES_PER_CLIP, VIDEO_FPS
from keyface.memory import (
    DECODER_ACTIVATION_FACTOR,
    ENCODER_ACTIVATION_FACTOR,
    UNET_ACTIVATION_FACTOR,
    MemoryEstimate,
    activation_peak_bytes,
)
from keyface.models.bundle import OFFLOAD_MODES, STEP_PARTS, KeyFaceModels, Residency
from keyface.models.streaming import compute_device
from keyface.sampling import AUTOGUIDANCE_SCALE, Autoguidance, KeyframeGuidance, ays_sigmas

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU default: the official structure at reduced widths (multiples of 32, for GroupNorm's 32 groups):
# UNet levels 64/128/256/256 with heads of 16 channels, tokens / 4; VAE levels 32/64/128/128.
UNET_WIDTH_DIVISOR = 5
WIDTH_DIVISOR = 4
# Left out of a CPU run by default: fp16 has no fast CPU kernels (a reduced-width step takes tens of seconds, and
# up to 8x bf16's), and bf16 already shows what half precision changes; fp32 is what precision auto runs there.
CPU_SKIPPED = {
    "fp16": "fp16 on a CPU has no fast kernels (several times slower than bf16); bf16 stands for half "
    "precision here, fp32 is what precision auto picks on a CPU; ask with --precisions fp16"
}
MID_SIGMA = 4.248  # a mid-schedule AYS level; the cost of a step does not depend on it


def emit(out, metric: str, value, **extra) -> None:
    if isinstance(value, float):
        value = round(value, 6)
    print(json.dumps({"metric": metric, "value": value, **extra}), file=out, flush=True)


def stage_configs(size: int, model: str) -> tuple[StageConfig, StageConfig, EncoderConfig]:
    """``model``: ``full`` (official), ``reduced`` (see ``UNET_WIDTH_DIVISOR``) or ``tiny`` (the demo's sizes),
    at ``size`` pixels."""
    if model == "tiny":
        from keyface.demo import TINY

        configs = [TINY.stage_config(kind) for kind in ("keyframe", "interpolation")]
        configs = [dataclasses.replace(c, latent_size=size // c.decoder.downsample_factor) for c in configs]
        decoder = TINY.decoder_config()
        encoder = EncoderConfig(
            block_out_channels=decoder.block_out_channels, layers_per_block=decoder.layers_per_block
        )
        return configs[0], configs[1], encoder
    full_size = model == "full"
    configs = []
    for kind in ("keyframe", "interpolation"):
        config = StageConfig.official(kind)
        if not full_size:
            unet, d = config.unet, WIDTH_DIVISOR
            unet = dataclasses.replace(
                unet,
                block_out_channels=tuple(w // UNET_WIDTH_DIVISOR for w in unet.block_out_channels),
                num_head_channels=unet.num_head_channels // d,
                context_dim=unet.context_dim // d,
                emotion_embedding_dim=unet.emotion_embedding_dim // d,
            )
            decoder = DecoderConfig(block_out_channels=tuple(w // d for w in config.decoder.block_out_channels))
            config = dataclasses.replace(
                config, unet=unet, decoder=decoder, audio_feature_dim=config.audio_feature_dim // d
            )
        configs.append(dataclasses.replace(config, latent_size=size // config.decoder.downsample_factor))
    encoder = EncoderConfig()
    if not full_size:
        encoder = EncoderConfig(block_out_channels=tuple(w // WIDTH_DIVISOR for w in encoder.block_out_channels))
    return configs[0], configs[1], encoder


def build_models(configs, device: torch.device) -> KeyFaceModels:
    """Random-weight models (default init, seed 0) built directly on ``device``, all float32."""
    from keyface.models.stages import InterpolationModel, InterpolationNetwork, KeyframeModel
    from keyface.models.vae import FrameDecoder, IdentityEncoder

    keyframe, interpolation, encoder = configs
    torch.manual_seed(0)
    with torch.device(device):
        return KeyFaceModels(
            keyframe=KeyframeModel(keyframe).eval(),
            interpolation=InterpolationModel(interpolation).eval(),
            autoguidance=InterpolationNetwork(interpolation).eval(),
            decoder=FrameDecoder(interpolation.decoder).eval(),
            keyframe_decoder=FrameDecoder(keyframe.decoder).eval(),
            identity_encoder=IdentityEncoder(encoder).eval(),
        )


class Inputs:
    """Seeded random inputs of one call of each step (on the CPU; moved where the model is)."""

    def __init__(self, models: KeyFaceModels, segments: int, decode_frames: int):
        generator = torch.Generator().manual_seed(1)
        c, h, w = models.latent_shape
        frames = FRAMES_PER_CLIP
        kf, ip = models.keyframe.config, models.interpolation.config
        self.identity = torch.randn(1, c, h, w, generator=generator) * 0.2
        self.keyframe_audio = torch.randn(1, frames, 2, kf.audio_feature_dim, generator=generator)
        self.emotion = torch.zeros(1, frames)
        self.keyframe_noise = torch.randn(frames, c, h, w, generator=generator)
        self.start = torch.randn(segments, c, h, w, generator=generator) * 0.2
        self.end = torch.randn(segments, c, h, w, generator=generator) * 0.2
        self.segment_audio = torch.randn(segments, frames, 2, ip.audio_feature_dim, generator=generator)
        self.segment_noise = torch.randn(segments * frames, c, h, w, generator=generator)
        self.decode_latents = torch.randn(decode_frames, c, h, w, generator=generator)
        self.image = torch.rand(1, 3, models.image_size, models.image_size, generator=generator) * 2 - 1


def _device_of(module) -> torch.device:
    return compute_device(module)  # streamed (offload stream): the device its blocks move to, not the weights'


def keyframe_step(models: KeyFaceModels, inputs: Inputs) -> torch.Tensor:
    """One keyframe denoising step (the three guidance branches in one call), as the sampler runs it."""
    device = _device_of(models.keyframe)
    with torch.inference_mode():
        cond = models.keyframe.condition(
            inputs.identity.to(device), inputs.keyframe_audio.to(device), inputs.emotion, inputs.emotion
        )
        guidance = KeyframeGuidance(models.keyframe, cond)
        sigma = torch.full((FRAMES_PER_CLIP,), MID_SIGMA, device=device)
        return guidance(inputs.keyframe_noise.to(device) * math.sqrt(1 + MID_SIGMA**2), sigma)


def segment_step(models: KeyFaceModels, inputs: Inputs, segments: int) -> torch.Tensor:
    """One interpolation denoising step of ``segments`` segments (main + autoguidance network)."""
    device = _device_of(models.interpolation)
    frames = segments * FRAMES_PER_CLIP
    with torch.inference_mode():
        cond = models.interpolation.condition(
            inputs.start[:segments].to(device),
            inputs.end[:segments].to(device),
            inputs.segment_audio[:segments].to(device),
        )
        guidance = Autoguidance(models.interpolation, models.autoguidance, cond, AUTOGUIDANCE_SCALE)
        sigma = torch.full((frames,), MID_SIGMA, device=device)
        return guidance(inputs.segment_noise[:frames].to(device), sigma)


def decode_step(models: KeyFaceModels, inputs: Inputs) -> torch.Tensor:
    with torch.inference_mode():
        return models.decoder.decode(inputs.decode_latents.to(_device_of(models.decoder)))


def identity_step(models: KeyFaceModels, inputs: Inputs) -> torch.Tensor:
    with torch.inference_mode():
        return models.identity_encoder.encode(inputs.image.to(_device_of(models.identity_encoder)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` runs after ``warmup`` untimed ones, in seconds."""
    for _ in range(warmup):
        run()
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def in_precision(models: KeyFaceModels, dtype: torch.dtype) -> KeyFaceModels:
    """A copy of ``models`` whose UNet stages run in ``dtype`` (the float32 originals are kept for comparisons);
    the VAE parts are shared and stay float32, as in :func:`keyface.loading.load_models`."""
    if dtype == torch.float32:
        return models
    networks = ("keyframe", "interpolation", "autoguidance")
    return dataclasses.replace(models, **{name: copy.deepcopy(getattr(models, name)).to(dtype) for name in networks})


def bundle_bytes_on(models: KeyFaceModels, device: torch.device) -> int:
    return sum(
        t.numel() * t.element_size()
        for module in models.parts().values()
        for t in (*module.parameters(), *module.buffers())
        if t.device.type == device.type
    )


class Budget:
    """The time left for the run (``seconds`` None: no limit)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> bool:
        return self.deadline is None or time.perf_counter() < self.deadline

    def fits(self, seconds: float) -> bool:
        """Whether work expected to take ``seconds`` ends before the deadline."""
        return self.deadline is None or time.perf_counter() + seconds < self.deadline


# What a memory value measures (the "measure" field of peak_bytes and segments_per_call lines).
MEASURES = {
    "cuda": "cuda_max_memory_allocated",
    "cpu": "cpu_live_tensor_bytes",  # keyface.memory.activation_peak_bytes; weights counted, see check_offload_peaks
}


def peak_of(run, device: torch.device) -> tuple[int | None, float]:
    """Peak memory while ``run`` runs once, and its seconds: on CUDA the peak bytes allocated on the device, on a
    CPU the peak bytes of the tensors created inside and alive at once (:func:`activation_peak_bytes`: the
    activations; the allocator reuses freed heap, so the process's RSS barely moves), elsewhere None. The CPU
    tracker hooks every operator, so those seconds are not a clean step time."""
    start = time.perf_counter()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), time.perf_counter() - start
    if device.type != "cpu":
        run()
        return None, time.perf_counter() - start
    with activation_peak_bytes() as tracker:
        run()
    return tracker.peak, time.perf_counter() - start


def check_offload_peaks(
    out, models, inputs, estimate: MemoryEstimate, device, precision: str, segments: int, warmup: int
) -> None:
    """Peak memory of each step under each offload mode next to the estimate; in mode ``stream`` also the weight
    bytes the step asked the host to free for its blocks (``room_bytes``) and its seconds.

    On CUDA the value is the device's peak less the tensors outside the bundle (such as the float32 originals).
    On a CPU the compute and offload devices are one, so modes none / stage / sequential move nothing
    (``moves_weights`` false: one computation, measured once per step) while ``stream`` runs its hooks and moves
    every block "in" and "out" (a no-op there); the value is the weights the mode keeps on the compute device
    (counted: all parts, the step's parts, or the streamed room) plus the measured activations
    (``activation_bytes``)."""
    steps = {
        "identity": lambda: identity_step(models, inputs),
        "keyframes": lambda: keyframe_step(models, inputs),
        "segments": lambda: segment_step(models, inputs, segments),
        "decode": lambda: decode_step(models, inputs),
    }
    unmoved: dict[str, tuple[int | None, float]] = {}  # step -> its measurement where nothing moves
    for mode in OFFLOAD_MODES:
        for module in models.parts().values():
            module.to(device if mode == "none" else "cpu")
        rooms: list[int] = []
        models.residency = residency = Residency(device, torch.device("cpu"), mode, make_room=rooms.append)
        for step, run in steps.items():

            def inside(step=step, run=run) -> None:
                with models.step(step):
                    run()

            outside = (
                torch.cuda.memory_allocated(device) - bundle_bytes_on(models, device) if device.type == "cuda" else 0
            )
            if residency.active or step not in unmoved:
                measured = peak_of(inside, device)
                if not residency.active:
                    unmoved[step] = measured
            peak, seconds = measured if residency.active else unmoved[step]
            fields = {}
            if device.type == "cpu":
                weights = {"none": models.size_bytes(), "stream": rooms[-1] if rooms else 0}.get(
                    mode, models.size_bytes(STEP_PARTS[step])
                )
                fields = {"activation_bytes": peak, "weight_bytes": weights}
                peak = peak + weights
            elif peak is not None:
                peak -= outside
            if mode == "stream":
                fields["room_bytes"] = rooms[-1] if rooms else None
            resident = {"none": estimate.all_weights(), "stream": estimate.stream_weights(step)}.get(
                mode, estimate.weights(step)
            )
            emit(
                out,
                "peak_bytes",
                peak,
                step=step,
                offload=mode,
                precision=precision,
                segments_per_call=segments,
                measure=MEASURES.get(device.type),
                moves_weights=residency.active,
                estimate_bytes=resident + estimate.activations(step, segments),
                **fields,
            )
            if mode == "stream" and step in ("keyframes", "segments"):  # streaming's cost: every weight moves per call
                seconds = timed(inside, device, 1, warmup)
                emit(out, "step_s", seconds, step=step, offload=mode, precision=precision, segments_per_call=segments)
    models.residency = None
    for module in models.parts().values():
        module.to(device)


def calibrate_activations(out, models: KeyFaceModels, inputs: Inputs, estimate: MemoryEstimate, device) -> None:
    """Measured activation factor of each network (peak activation bytes / largest feature map bytes)."""
    checks = {
        "keyframes": (lambda: keyframe_step(models, inputs), UNET_ACTIVATION_FACTOR),
        "segments": (lambda: segment_step(models, inputs, 1), UNET_ACTIVATION_FACTOR),
        "decode": (lambda: decode_step(models, inputs), DECODER_ACTIVATION_FACTOR),
        "identity": (lambda: identity_step(models, inputs), ENCODER_ACTIVATION_FACTOR),
    }
    for step, (run, factor) in checks.items():
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        measured = peak_of(run, device)[0] - before
        modelled = estimate.activations(step, 1)
        emit(
            out,
            "activation_factor",
            factor * measured / modelled,
            step=step,
            device=device.type,
            constant=factor,
            measured_bytes=measured,
            estimate_bytes=modelled,
        )


def compute_per_video_second(step_seconds: dict, segments: int, decode_frames: int, autoguided: bool = True) -> float:
    """Seconds of compute per second of video at the official step counts (10 -> 11 Euler steps per call)."""
    from keyface.schedule import plan_schedule

    frames = 60 * VIDEO_FPS
    schedule = plan_schedule(frames)
    steps = len(ays_sigmas()) - 1
    calls = sum(math.ceil(len(chunk.segments) / segments) for chunk in schedule.chunks)
    total = (
        len(schedule.batches) * steps * step_seconds["keyframes"]
        + calls * steps * step_seconds["segments"]
        + math.ceil(schedule.n_output_frames / decode_frames) * step_seconds["decode"]
    )
    return total / (frames / VIDEO_FPS)


def segments_sweep(out, models, inputs, estimate, precision: str, counts, args, budget) -> dict[int, float]:
    """Seconds per interpolation step for each of ``counts`` segments per call and its activation peak; a count
    whose expected time (from the last one measured) would pass the deadline is skipped with a line."""
    device = _device_of(models.interpolation)
    per_call: dict[int, float] = {}
    for segments in counts:
        runs = args.warmup + args.repeats + 1  # + the run that measures the peak
        expected = runs * segments * min((t / n for n, t in per_call.items()), default=0.0)
        if not budget.fits(expected):
            reason = f"time budget: about {expected:.0f} s expected" if budget.left() else "time budget spent"
            emit(out, "skipped", f"segments_per_call {segments}", precision=precision, reason=reason)
            continue
        run = functools.partial(segment_step, models, inputs, segments)
        per_call[segments] = timed(run, device, args.repeats, args.warmup)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        peak = peak_of(run, device)[0]
        emit(out, "step_s", per_call[segments], step="segments", precision=precision, segments_per_call=segments)
        emit(
            out,
            "segments_per_call",
            per_call[segments] / segments,
            unit="s per segment per step",
            precision=precision,
            segments_per_call=segments,
            activation_bytes=None if peak is None else peak - before,
            measure=MEASURES.get(device.type),
            estimate_activation_bytes=estimate.activations("segments", segments),
        )
    return per_call


def check_precision(out, models: KeyFaceModels, inputs: Inputs, reference, precision: str, args, budget) -> None:
    """Everything measured per precision: the difference to fp32, step times, the smallest segments per call,
    the offload peaks, then the rest of the sweep (as the time budget allows) and the compute per video second."""
    device = _device_of(models.interpolation)
    difference = (keyframe_step(models, inputs).float().cpu() - reference).abs().max().item()
    emit(out, "max_abs_diff", difference, precision=precision, against="fp32", step="keyframes")
    estimate = MemoryEstimate.for_models(models, args.decode_frames)
    seconds = {
        "keyframes": timed(functools.partial(keyframe_step, models, inputs), device, args.repeats, args.warmup),
        "decode": timed(functools.partial(decode_step, models, inputs), device, args.repeats, args.warmup),
    }
    emit(out, "step_s", seconds["keyframes"], step="keyframes", precision=precision)
    emit(out, "step_s", seconds["decode"], step="decode", precision=precision, frames=args.decode_frames)
    smallest, *rest = sorted(args.sweep)
    per_call = segments_sweep(out, models, inputs, estimate, precision, [smallest], args, budget)
    if budget.left():
        check_offload_peaks(out, models, inputs, estimate, device, precision, smallest, args.warmup)
    else:
        emit(out, "skipped", "offload peaks", precision=precision, reason="time budget spent")
    per_call.update(segments_sweep(out, models, inputs, estimate, precision, rest, args, budget))
    for segments, step_seconds in per_call.items():
        emit(
            out,
            "compute_s_per_video_s",
            compute_per_video_second({**seconds, "segments": step_seconds}, segments, args.decode_frames),
            precision=precision,
            segments_per_call=segments,
        )


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="frame size in pixels (default 512, the official)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=("fp16", "bf16", "fp32"),
        help="network precisions to measure (default fp16 bf16 on CUDA; fp32 bf16 on a CPU, see CPU_SKIPPED)",
    )
    parser.add_argument(
        "--model",
        choices=("full", "reduced", "tiny"),
        default=None,
        help="network sizes: full (official; the default on CUDA), reduced (official structure, smaller widths; the "
        "default on a CPU) or tiny (the demo's)",
    )
    parser.add_argument("--sweep", nargs="+", type=int, default=None, help="segments per call to try")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per step (the fastest is kept)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 on CUDA, 0 on a CPU)")
    parser.add_argument("--decode-frames", type=int, default=FRAMES_PER_CLIP, help="frames per VAE decode call")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds; what is left is skipped")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = args.model or ("full" if device.type == "cuda" else "reduced")
    args.sweep = args.sweep or ([1, 2, 4, 8, 16] if device.type == "cuda" else [1, 2])
    args.repeats = args.repeats or (3 if device.type == "cuda" else 1)
    if args.warmup is None:  # CUDA: kernel selection and the allocator's first growth; a CPU has neither to amortise
        args.warmup = 1 if device.type == "cuda" else 0
    skipped = {} if args.precisions or device.type == "cuda" else CPU_SKIPPED
    args.precisions = args.precisions or (["fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    budget = Budget(args.time_budget)
    started = time.perf_counter()

    configs = stage_configs(args.size, model)
    masters = build_models(configs, device)
    emit(
        out,
        "setup",
        round(time.perf_counter() - started, 3),
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        size=args.size,
        model=model,
        torch=torch.__version__,
        parameters={name: sum(p.numel() for p in m.parameters()) for name, m in masters.parts().items()},
    )
    inputs = Inputs(masters, max(args.sweep), args.decode_frames)
    calibrate_activations(out, masters, inputs, MemoryEstimate.for_models(masters, args.decode_frames), device)
    reference = keyframe_step(masters, inputs).float().cpu()

    for precision, reason in skipped.items():
        emit(out, "skipped", precision, reason=reason)
    for precision in args.precisions:
        if budget.left():
            check_precision(out, in_precision(masters, DTYPES[precision]), inputs, reference, precision, args, budget)
        else:
            emit(out, "skipped", precision, reason="time budget spent")
    emit(out, "total_s", round(time.perf_counter() - started, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
