"""Device memory of each pipeline step: an estimate from the sizes alone, and the choices it drives.

The peak of a step is its parts' weights plus the activations of one network call::

    weights      parameter bytes of the step's parts (STEP_PARTS): the UNets at the network dtype, the VAE in fp32
    keyframes    one call = 14 frames x 3 guidance branches through the keyframe UNet
    segments     one call = segments_per_call x 14 frames through the interpolation UNet, then the same through
                 the autoguidance UNet (one after the other: their activations do not add up)
    decode       one call = a block of frames through the VAE decoder (fp32), each frame alone
    identity     one image through the VAE encoder (fp32)

Activations follow ``factor x largest feature map`` (frames x first-level width x latent height x width x bytes
per element, pixels for the VAE). The factors are measured, not derived: :func:`activation_peak_bytes` records
the live tensor bytes of one forward on the CPU (every operator's outputs, freed when their storage is), and
``python bench/device_check.py --device cpu`` prints the measured factor of each network next to these constants
(official-structure networks at reduced width; on CUDA it reports ``torch.cuda.max_memory_allocated``). The
factors are rounded up, so the estimate errs on the safe side. Weights come from the loaded models
(:func:`part_parameters`) or, without any weights, from the configurations: the networks are built on the
``meta`` device, which allocates nothing.

Used to choose ``segments_per_call`` (:meth:`MemoryEstimate.segments_per_call`) and the offload mode
(:meth:`MemoryEstimate.offload_mode`) from the free device memory, and printed by ``python -m keyface plan``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch

from .config import EncoderConfig, StageConfig
from .constants import FRAMES_PER_CLIP
from .errors import InputError
from .models.bundle import MODEL_PARTS, OFFLOAD_MODES, STEP_PARTS

# Peak activation bytes / largest feature map bytes of one call, measured on the CPU in float32 with
# `bench/device_check.py --device cpu --size 64` (official structure, reduced widths): keyframe step 32.2,
# interpolation step 27.2, VAE decode 8.0, VAE encode 5.1; rounded up.
UNET_ACTIVATION_FACTOR = 34.0
DECODER_ACTIVATION_FACTOR = 9.0
ENCODER_ACTIVATION_FACTOR = 6.0
KEYFRAME_GUIDANCE_BRANCHES = 3  # uncond, identity, full: one batched call (keyface.sampling.KeyframeGuidance)
# Free memory kept back: allocator fragmentation, the CUDA context's own use, small buffers not modelled.
MEMORY_MARGIN = 0.15
# Output frames per VAE decoder call at most; a block's decoder batch holds up to two more segment frames (an
# output frame where two segments overlap is the mean of both).
DECODE_BLOCK_FRAMES = 13
DECODE_EXTRA_INPUTS = 2
# Interpolation segments per call are never more than a chunk holds (2 keyframe batches of 13 segments).
MAX_SEGMENTS_PER_CALL = 26
# The steps of one video, in order (the audio encoders run before them, outside KeyFaceModels).
STEPS = ("identity", "keyframes", "segments", "decode", "preview")


# Element counts of the official parts, as config_parameters builds them on the meta device (tests/test_plan.py
# checks them), so that planning the official sizes imports no diffusers. The interpolation networks' learned
# masks (latent_channels x latent_size^2) are counted at the official 64 x 64 and follow the latent size.
OFFICIAL_PARAMETERS = {
    "keyframe": 1_527_180_010,
    "interpolation": 1_526_543_914,
    "autoguidance": 1_524_970_026,
    "decoder": 63_579_183,
    "keyframe_decoder": 63_579_183,
    "identity_encoder": 34_163_664,
}
_MASKED_PARTS = ("interpolation", "autoguidance")
# Streamed (offload "stream"): elements of each official part's largest block and of the weights that stay on the
# device during its step (keyface.models.streaming.stream_layout at STREAM_BLOCK_ELEMENTS, built on meta; the
# learned mask is the interpolation networks' rest and follows the latent size). The VAE parts are one block each.
OFFICIAL_STREAM_ELEMENTS = {
    "keyframe": (60_642_561, 0),
    "interpolation": (60_642_561, 16_384),
    "autoguidance": (60_642_561, 16_384),
    "decoder": (63_579_183, 0),
    "keyframe_decoder": (63_579_183, 0),
    "identity_encoder": (34_163_664, 0),
}


def part_parameters(models) -> dict[str, int]:
    """Parameter + buffer element counts of each loaded part of a :class:`~keyface.models.bundle.KeyFaceModels`."""
    return {name: _elements(module) for name, module in models.parts().items()}


def config_parameters(
    keyframe: StageConfig, interpolation: StageConfig, encoder: EncoderConfig | None = None, autoguidance: bool = True
) -> dict[str, int]:
    """The same counts without any weights: every part built from its configuration on the ``meta`` device
    (official configurations at any latent size: :data:`OFFICIAL_PARAMETERS`)."""
    official = (StageConfig.official("keyframe"), StageConfig.official("interpolation"))
    sized = tuple(replace(config, latent_size=official[0].latent_size) for config in (keyframe, interpolation))
    if sized == official and encoder in (None, EncoderConfig()) and keyframe.latent_size == interpolation.latent_size:
        mask_change = interpolation.latent_channels * (interpolation.latent_size**2 - official[1].latent_size ** 2)
        counts = {
            name: count + (mask_change if name in _MASKED_PARTS else 0) for name, count in OFFICIAL_PARAMETERS.items()
        }
        if not autoguidance:
            del counts["autoguidance"]
        return counts
    return meta_parameters(keyframe, interpolation, encoder, autoguidance)


def meta_parameters(
    keyframe: StageConfig, interpolation: StageConfig, encoder: EncoderConfig | None = None, autoguidance: bool = True
) -> dict[str, int]:
    """:func:`config_parameters` by building every part on the ``meta`` device (imports diffusers)."""
    from .models.stages import InterpolationModel, InterpolationNetwork, KeyframeModel
    from .models.vae import FrameDecoder, IdentityEncoder

    builders = {
        "keyframe": lambda: KeyframeModel(keyframe),
        "interpolation": lambda: InterpolationModel(interpolation),
        "autoguidance": (lambda: InterpolationNetwork(interpolation)) if autoguidance else None,
        "decoder": lambda: FrameDecoder(interpolation.decoder),
        "keyframe_decoder": lambda: FrameDecoder(keyframe.decoder),
        "identity_encoder": lambda: IdentityEncoder(encoder or EncoderConfig()),
    }
    with torch.device("meta"):
        return {name: _elements(build()) for name, build in builders.items() if build is not None}


def part_stream_elements(models) -> dict[str, tuple[int, int]]:
    """``(largest block, rest)`` element counts of each loaded part when streamed (offload ``stream``)."""
    from .models.streaming import stream_layout

    layouts = {name: stream_layout([module]) for name, module in models.parts().items()}
    return {name: (layout.largest_block_elements, layout.rest_elements) for name, layout in layouts.items()}


def config_stream_elements(parameters: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The same without weights, for the parts counted in ``parameters``: the official layout for an official
    part (within 1 %: the learned mask follows the latent size and is the rest), else the whole part as one block
    (an upper bound: another configuration's layout is not known without building it)."""
    counts = {}
    for name, count in parameters.items():
        official = OFFICIAL_PARAMETERS[name]
        largest, rest = OFFICIAL_STREAM_ELEMENTS[name]
        counts[name] = (largest, rest + count - official) if abs(count - official) < official / 100 else (count, 0)
    return counts


def _elements(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated device bytes of each step for one model set, network dtype and resolution.

    ``parameters``: element counts per part (:func:`part_parameters` / :func:`config_parameters`); ``dtype_bytes``:
    bytes per element of the UNets (4 fp32, 2 bf16/fp16); the VAE parts always count 4 (they run in fp32).
    ``decode_frames``: frames per VAE decoder call (the pipeline's decode block). ``stream_elements``: each part's
    ``(largest block, rest)`` elements when streamed (:func:`part_stream_elements`; ``None``:
    :func:`config_stream_elements`).
    """

    keyframe: StageConfig
    interpolation: StageConfig
    parameters: dict[str, int]
    dtype_bytes: int = 4
    decode_frames: int = FRAMES_PER_CLIP
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    stream_elements: dict[str, tuple[int, int]] | None = None  # (largest block, rest) per part; None: official

    @classmethod
    def for_models(cls, models, decode_frames: int = FRAMES_PER_CLIP) -> MemoryEstimate:
        """The estimate of loaded :class:`~keyface.models.bundle.KeyFaceModels` (sizes and dtype as loaded)."""
        encoder = models.identity_encoder.config if models.identity_encoder is not None else EncoderConfig()
        return cls(
            models.keyframe.config,
            models.interpolation.config,
            part_parameters(models),
            models.keyframe.unet.conv_in.weight.element_size(),
            decode_frames,
            encoder,
            part_stream_elements(models),
        )

    def _part_bytes(self, name: str) -> int:
        per_element = self.dtype_bytes if name in ("keyframe", "interpolation", "autoguidance") else 4
        return self.parameters.get(name, 0) * per_element

    def weights(self, step: str) -> int:
        """Bytes of the parts step ``step`` keeps on the device."""
        return sum(self._part_bytes(name) for name in STEP_PARTS[step])

    def stream_weights(self, step: str) -> int:
        """Bytes of weights on the device at most while step ``step`` streams its parts block by block (offload
        ``stream``): every part's rest and its largest block twice (the running one and the prefetched next), once
        where the step is a single block (a VAE part)."""
        blocks = self.stream_elements or config_stream_elements(self.parameters)
        names = [name for name in STEP_PARTS[step] if name in blocks]
        largest = rest = 0
        for name in names:
            per_element = self._part_bytes(name) // max(self.parameters[name], 1)
            largest = max(largest, blocks[name][0] * per_element)
            rest += blocks[name][1] * per_element
        single = len(names) == 1 and sum(blocks[names[0]]) >= self.parameters[names[0]]
        return rest + (1 if single else 2) * largest

    def all_weights(self) -> int:
        return sum(self._part_bytes(name) for name in MODEL_PARTS)

    def activations(self, step: str, segments_per_call: int = 1) -> int:
        """Peak activation bytes of one network call of ``step``."""
        if step in ("keyframes", "segments"):
            config = self.keyframe if step == "keyframes" else self.interpolation
            clips = KEYFRAME_GUIDANCE_BRANCHES if step == "keyframes" else segments_per_call
            frames = clips * config.unet.num_frames
            latent = config.latent_size**2
            largest = frames * config.unet.block_out_channels[0] * latent * self.dtype_bytes
            # The sampler's own float32 state: noisy latent, denoised estimate, conditioning channels.
            sampler = 4 * frames * config.unet.in_channels * latent * 4
            return round(UNET_ACTIVATION_FACTOR * largest) + sampler
        pixels = self.interpolation.image_size**2
        if step == "identity":
            return round(ENCODER_ACTIVATION_FACTOR * self.encoder.block_out_channels[0] * pixels * 4)
        frames = self.decode_frames if step == "decode" else 1
        decoder = (self.interpolation if step == "decode" else self.keyframe).decoder
        return round(DECODER_ACTIVATION_FACTOR * frames * decoder.block_out_channels[0] * pixels * 4)

    def step_peak(self, step: str, segments_per_call: int = 1) -> int:
        """Weights + activations of ``step`` alone on the device."""
        return self.weights(step) + self.activations(step, segments_per_call)

    def peak(self, mode: str, segments_per_call: int = 1) -> int:
        """Peak device bytes of a whole video under offload ``mode`` (see :mod:`keyface.models.bundle`).

        ``none``: every part + the largest activations; ``stage`` and ``sequential``: the largest step (they
        differ in what stays between steps, not in the peak); ``stream``: the largest step with only its blocks
        in flight resident (:meth:`stream_weights`).
        """
        if mode not in OFFLOAD_MODES:
            raise InputError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        if mode == "none":
            return self.all_weights() + max(self.activations(step, segments_per_call) for step in STEPS)
        if mode == "stream":
            return max(self.stream_weights(step) + self.activations(step, segments_per_call) for step in STEPS)
        return max(self.step_peak(step, segments_per_call) for step in STEPS)

    def segments_per_call(self, budget_bytes: int, mode: str = "stage", limit: int = MAX_SEGMENTS_PER_CALL) -> int:
        """The most interpolation segments per call (1 .. ``limit``) whose peak under ``mode`` fits in
        ``budget_bytes`` less the safety margin; 1 when even one segment does not fit."""
        usable = budget_bytes * (1 - MEMORY_MARGIN)
        best = 1
        for count in range(1, max(limit, 1) + 1):
            if self._segments_peak(mode, count) > usable:
                break
            best = count
        return best

    def decode_block(self, budget_bytes: int, mode: str = "stage", limit: int = DECODE_BLOCK_FRAMES) -> int:
        """The most output frames per decoder call (1 .. ``limit``) whose decode step fits in ``budget_bytes`` less
        the safety margin under ``mode``; 1 when even one does not fit. Frames are decoded alone either way, so
        the block size changes memory and speed, not the pictures."""
        usable = budget_bytes * (1 - MEMORY_MARGIN)
        resident = self._resident(mode, "decode")
        best = 1
        for block in range(1, max(limit, 1) + 1):
            if resident + self.with_decode_block(block).activations("decode") > usable:
                break
            best = block
        return best

    def with_decode_block(self, block: int) -> MemoryEstimate:
        """This estimate for decoder calls of ``block`` output frames."""
        return replace(self, decode_frames=block + DECODE_EXTRA_INPUTS)

    def _resident(self, mode: str, step: str) -> int:
        if mode == "none":
            return self.all_weights()
        return self.stream_weights(step) if mode == "stream" else self.weights(step)

    def _segments_peak(self, mode: str, count: int) -> int:
        resident = self._resident(mode, "segments")
        return resident + self.activations("segments", count)

    def offload_mode(self, budget_bytes: int | None) -> str:
        """``none`` when every part fits with the margin, ``stage`` when the largest step does, else ``stream``
        (block by block; ``sequential`` has the peak of ``stage``, so it never fits where ``stage`` does not).
        ``None`` (a CPU: no device memory to save) gives ``none``."""
        if budget_bytes is None:
            return "none"
        usable = budget_bytes * (1 - MEMORY_MARGIN)
        smallest = self.with_decode_block(1)  # the decode block shrinks to fit (decode_block), so it never decides
        if smallest.peak("none") <= usable:
            return "none"
        return "stage" if smallest.peak("stage") <= usable else "stream"


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA device (what the allocator can still get); ``None`` for the CPU and other devices,
    whose memory is the machine's."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def device_budget(models) -> int | None:
    """Bytes the loaded ``models`` may use on their compute device: its free memory plus what they hold there
    now; None on a CPU (no device memory to fit)."""
    residency = models.residency
    device = residency.device if residency is not None else next(models.interpolation.parameters()).device
    free = free_device_memory(device)
    if free is None:
        return None
    held = sum(
        t.numel() * t.element_size()
        for module in models.parts().values()
        for t in (*module.parameters(), *module.buffers())
        if t.device.type == device.type
    )
    return free + held


def auto_segments_per_call(models, budget_bytes: int | None = None, *, fallback: int) -> int:
    """``segments_per_call`` "auto" for loaded ``models``: the most that fit in ``budget_bytes`` (default:
    :func:`device_budget`) under the models' offload mode; ``fallback`` where there is no device memory to fit."""
    budget_bytes = device_budget(models) if budget_bytes is None else budget_bytes
    if budget_bytes is None:
        return fallback
    mode = "none" if models.residency is None else models.residency.mode
    estimate = MemoryEstimate.for_models(models).with_decode_block(DECODE_BLOCK_FRAMES)
    return estimate.segments_per_call(budget_bytes, mode)


def auto_decode_block(models, budget_bytes: int | None = None) -> int:
    """Output frames per decoder call for loaded ``models``: :data:`DECODE_BLOCK_FRAMES` on a CPU, else the most
    whose decode step fits in ``budget_bytes`` (default: :func:`device_budget`)."""
    budget_bytes = device_budget(models) if budget_bytes is None else budget_bytes
    if budget_bytes is None:
        return DECODE_BLOCK_FRAMES
    mode = "none" if models.residency is None else models.residency.mode
    return MemoryEstimate.for_models(models).decode_block(budget_bytes, mode)


class activation_peak_bytes:
    """Peak bytes of CPU tensors created inside the block and alive at the same time (``.peak`` after it).

    Every operator's outputs are counted once per storage and released when the storage is freed, so tensors
    that existed before the block (weights, inputs) are not counted. Temporary buffers inside one operator
    are not seen. Slow (a Python hook per operator): for calibration on small networks only.
    """

    def __init__(self):
        self.peak = 0
        self._live = 0
        self._mode = None

    def __enter__(self) -> activation_peak_bytes:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for value in torch.utils._pytree.tree_leaves(out):
                    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                        tracker._count(value)
                return out

        self._seen: dict[int, list[int]] = {}  # data pointer -> [bytes, live views]
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key in self._seen:
            self._seen[key][1] += 1  # another view of a counted storage: it stays alive as long as any view
        else:
            self._seen[key] = [size, 1]
            self._live += size
            self.peak = max(self.peak, self._live)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._seen.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self._live -= entry[0]
            del self._seen[key]

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
