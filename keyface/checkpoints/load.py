"""Weight files -> KeyFace inference modules (stages, autoguidance network, VAE encoder and frame decoder).

Weights are cast to the requested dtype on load (the fixture files are float16: upcast to float32); the VAE
parts stay float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import DecoderConfig, EncoderConfig, StageConfig, StageKind
from ..errors import CheckpointError, MissingWeightsError, brief
from .formats import KEYFACE_WEIGHTS_SOURCE, VAE_WEIGHTS_SOURCE, existing_file, read_checkpoint, read_safetensors
from .infer import decoder_fields, resolve_stage_config
from .keymap import DECODER_PREFIX, UNUSED_PREFIXES, VAE_ENCODER_PREFIXES, decoder_key, stage_target

logger = logging.getLogger(__name__)

# diffusers VAE folder (identity encoder).
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_tensors_into(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    unexpected: list[str],
    *,
    expected: str = f"expected a KeyFace checkpoint from {KEYFACE_WEIGHTS_SOURCE}",
    optional: tuple[str, ...] = (),
) -> None:
    """Copy ``state`` into ``module`` (tensors assigned as they are); every key must match, except missing keys
    ending in one of ``optional``. ``unexpected``: keys of the file the caller could not place. Any mismatch is
    one CheckpointError line naming ``path`` and ending with ``expected`` (which file was wanted, and from where).
    """
    names = set(module.state_dict())
    missing = sorted(key for key in names - set(state) if not key.endswith(optional))
    unexpected = sorted({*unexpected, *(set(state) - names)})
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path} does not fit the {type(module).__name__}: {' and '.join(problems)}; {expected}")
    try:
        module.load_state_dict(state, strict=False, assign=True)  # keys checked above; shapes still are
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the {type(module).__name__}: {brief(exc)}") from None


def _load_stage(path, module_class, kind: StageKind, config, device, dtype):
    checkpoint = read_checkpoint(path)
    if checkpoint.kind != kind:
        raise CheckpointError(
            f"{checkpoint.path} holds the {checkpoint.kind} stage, but the {kind} stage was asked for; give the "
            f"{kind} checkpoint ({'keyframe.pt' if kind == 'keyframe' else 'interpolation.pt / interpolation_bad.pt'})"
        )
    stage_config = resolve_stage_config(checkpoint, config)
    with torch.device("meta"):
        module = module_class(stage_config)
    wanted = set(module.state_dict())
    state, unexpected, unknown = {}, [], []
    for key, tensor in checkpoint.tensors.items():
        try:
            target = stage_target(key, stage_config.unet.layers_per_block)
        except KeyError:
            unexpected.append(key)
            continue
        if target is None:
            if not key.startswith((*UNUSED_PREFIXES, DECODER_PREFIX, "conditioner.")):
                unknown.append(key)
        elif target in wanted:
            state[target] = _cast(tensor, dtype)
        elif not target.startswith("audio_projection."):  # the autoguidance network uses the main conditioner
            unexpected.append(key)
    load_tensors_into(module, state, checkpoint.path, unexpected)
    if unknown:
        logger.warning("%s: ignored %d tensors outside the KeyFace networks (e.g. %s)", path, len(unknown), unknown[0])
    return module.to(device).eval().requires_grad_(False)


def load_keyframe_model(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The keyframe stage (UNet + audio projection) from ``keyframe.pt`` / ``.safetensors``, ready for inference."""
    from ..models.stages import KeyframeModel

    return _load_stage(path, KeyframeModel, "keyframe", config, device, dtype)


def load_interpolation_model(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The interpolation stage (UNet + learned mask + audio projection) from ``interpolation.pt``."""
    from ..models.stages import InterpolationModel

    return _load_stage(path, InterpolationModel, "interpolation", config, device, dtype)


def load_autoguidance_network(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The autoguidance "bad" network (UNet + learned mask) from ``interpolation_bad.pt``; its conditioner and
    VAE tensors are ignored (it receives the main model's conditioning, docs/checkpoints.md#autoguidance-network)."""
    from ..models.stages import InterpolationNetwork

    return _load_stage(path, InterpolationNetwork, "interpolation", config, device, dtype)


def load_frame_decoder(path: str | Path, device: str | torch.device = "cpu"):
    """The float32 VAE frame decoder stored in an engine checkpoint (``first_stage_model.decoder.*``).

    The output video is decoded with the interpolation checkpoint's decoder (docs/models.md#vae, fixture README).
    """
    from ..models.vae import FrameDecoder

    checkpoint = read_checkpoint(path)
    decoder_shapes = {
        key[len(DECODER_PREFIX) :]: shape
        for key, shape in checkpoint.shapes().items()
        if key.startswith(DECODER_PREFIX)
    }
    if not decoder_shapes:
        raise CheckpointError(
            f"{checkpoint.path} holds no VAE decoder ('{DECODER_PREFIX}*'); give a KeyFace engine checkpoint "
            f"(interpolation.pt) from {KEYFACE_WEIGHTS_SOURCE}"
        )
    fields = decoder_fields(decoder_shapes, checkpoint.path)
    config = DecoderConfig(**{key.split(".", 1)[1]: value for key, value in fields.items()})
    with torch.device("meta"):
        module = FrameDecoder(config)
    wanted = module.state_dict()
    state, unexpected = {}, []
    for key, tensor in checkpoint.tensors.items():
        if not key.startswith(DECODER_PREFIX):
            continue
        try:
            target = "decoder." + decoder_key(key[len(DECODER_PREFIX) :], len(config.block_out_channels))
        except KeyError:
            unexpected.append(key)
            continue
        if target not in wanted:
            unexpected.append(key)
            continue
        state[target] = _cast(tensor, torch.float32).reshape(wanted[target].shape)  # 1x1 conv -> Linear
    load_tensors_into(module, state, checkpoint.path, unexpected)
    return module.to(device).eval().requires_grad_(False)


def _vae_weight_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for name in VAE_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise MissingWeightsError(
            f"no VAE weights in {path} (looked for {' or '.join(VAE_WEIGHT_NAMES)}); download the folder from "
            f"{VAE_WEIGHTS_SOURCE}"
        )
    path = existing_file(path, VAE_WEIGHTS_SOURCE)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{path}: expected the SVD VAE as a diffusers folder or a .safetensors file from {VAE_WEIGHTS_SOURCE}"
        )
    return path


def load_identity_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """The float32 SVD VAE image encoder from a diffusers ``vae`` folder (``config.json`` +
    ``diffusion_pytorch_model[.fp16].safetensors``) or a single diffusers-layout ``.safetensors`` file."""
    from ..models.vae import IdentityEncoder

    file = _vae_weight_file(path)
    tensors, _ = read_safetensors(file, VAE_ENCODER_PREFIXES, source=VAE_WEIGHTS_SOURCE)
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    try:
        levels = len({key.split(".")[2] for key in shapes if key.startswith("encoder.down_blocks.")})
        widths = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels))
        config = EncoderConfig(
            block_out_channels=widths,
            layers_per_block=len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")}),
            latent_channels=shapes["quant_conv.weight"][0] // 2,
            in_channels=shapes["encoder.conv_in.weight"][1],
        )
    except (KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{file} is not an SVD VAE in diffusers layout (missing {exc}); expected the 'vae' folder of "
            f"{VAE_WEIGHTS_SOURCE}"
        ) from None
    with torch.device("meta"):
        module = IdentityEncoder(config)
    wanted = set(module.state_dict())
    state = {key: _cast(tensor, torch.float32) for key, tensor in tensors.items() if key in wanted}
    load_tensors_into(module, state, file, [key for key in tensors if key not in wanted])
    return module.to(device).eval().requires_grad_(False)
