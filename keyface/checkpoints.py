"""Weight files -> KeyFace modules. The one place that knows the original key names (spec §1.6, §4, §7).

Accepted engine checkpoints (keyframe, interpolation, interpolation_bad):

* ``.pt`` — DeepSpeed/Lightning model states ``{'module': {'_forward_module.' + key: tensor}, ...}``; other
  top-level entries are ignored;
* ``.ckpt`` — ``{'state_dict': {...}}``; ``.bin`` — a flat state dict;
* ``.safetensors`` — flat, original key names (what :func:`convert_checkpoint` and :func:`save_stage_checkpoint`
  write too, with the stage config in the metadata).

Pickle files are read with ``torch.load(..., weights_only=True)`` only. A file that the safe loader refuses
must be converted once with ``python -m keyface convert <in.pt> <out.safetensors>`` (:func:`convert_any`, which
also converts the unilm WavLM / BEATs files), the only place that may fall back to a full unpickle, with a
warning, because the user asked for it.

Writing goes the other way with the same mapping: :func:`official_key_names` inverts it by pushing candidate
original names through it and checking the result is a bijection, so the two directions cannot drift apart.

Weights are cast to the requested dtype on load (the fixture files are float16: upcast to float32). The
configuration comes from the tensor shapes; the attention head width, which shapes cannot tell, comes from
(first found) the ``config`` argument, the config stored in a converted file, ``<stem>.json`` next to the file,
a fixture-style or our ``config.json`` in the same or the parent folder, else the official 64 channels per head.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import (
    FIXTURE_CONFIG_FORMAT_PREFIX,
    STAGE_CONFIG_FORMAT,
    DecoderConfig,
    EncoderConfig,
    StageConfig,
    StageKind,
    UNetConfig,
)
from .errors import CheckpointError, InputError, MissingWeightsError

logger = logging.getLogger(__name__)

KEYFACE_WEIGHTS_SOURCE = "the Hugging Face repo toninio19/keyface"
VAE_WEIGHTS_SOURCE = "the Hugging Face repo stabilityai/stable-video-diffusion-img2vid (subfolder 'vae')"
CONVERT_COMMAND = "python -m keyface convert <in.pt> <out.safetensors>"
CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".bin", ".safetensors")
# Safetensors metadata entry holding the StageConfig JSON (written by convert_checkpoint).
CONFIG_METADATA_KEY = "keyface_config"

# Original engine key namespaces (spec §7).
DEEPSPEED_PREFIX = "_forward_module."
UNET_PREFIX = "model.diffusion_model."
LEARNED_MASK_KEY = "model.learned_mask"
DECODER_PREFIX = "first_stage_model.decoder."
AUDIO_PROJECTION_KEY = re.compile(r"conditioner\.embedders\.(\d+)\.linear\.(weight|bias)")
# Keys an original file may hold that no inference module uses (spec §7): the interpolation conditioner's
# unused VAE encoder, the engine's deleted first-stage encoder, EMA copies.
UNUSED_PREFIXES = ("conditioner.embedders.0.encoder.", "first_stage_model.encoder.", "model_ema.")
# diffusers VAE folder (identity encoder).
VAE_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


# --------------------------------------------------------------------------------------------------------------
# Key mapping: original sgm names -> our module names
# --------------------------------------------------------------------------------------------------------------

_RESBLOCK_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
_BLOCK_KEY = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d+)\.(.+)")


def _unet_resblock_key(rest: str) -> str:
    """Inside a ``VideoResBlock``: spatial ResBlock layers, ``time_stack`` (temporal half), ``time_mixer``."""
    if rest.startswith("time_mixer."):
        return rest
    half = "spatial_res_block"
    if rest.startswith("time_stack."):
        half, rest = "temporal_res_block", rest[len("time_stack.") :]
    for old, new in _RESBLOCK_LAYERS.items():
        if rest.startswith(old + "."):
            return f"{half}.{new}.{rest[len(old) + 1 :]}"
    raise KeyError(rest)


def _unet_attention_key(rest: str) -> str:
    """Inside a ``SpatialVideoTransformer``: only the temporal blocks and frame-position MLP are renamed."""
    if rest.startswith("time_stack."):
        return "temporal_transformer_blocks." + rest[len("time_stack.") :]
    for index, name in (("0", "linear_1"), ("2", "linear_2")):
        if rest.startswith(f"time_pos_embed.{index}."):
            return f"time_pos_embed.{name}." + rest[len(f"time_pos_embed.{index}.") :]
    return rest


def unet_key(key: str, layers_per_block: int) -> str:
    """Original ``VideoUNet`` key (without ``model.diffusion_model.``) -> :class:`KeyFaceUNet` key (spec §1.6).

    Works for any number of levels and res blocks per level. Raises ``KeyError`` for a key with no counterpart.
    """
    for old, new in _TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old) :]
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        raise KeyError(key)
    group, index, slot, rest, mid_index, mid_rest = match.groups()
    if mid_index is not None:
        mid = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[mid_index]
        map_inner = _unet_attention_key if mid_index == "1" else _unet_resblock_key
        return f"mid_block.{mid}.{map_inner(mid_rest)}"
    index, slot, per_level = int(index), int(slot), layers_per_block + 1
    if group == "input_blocks":
        level, layer = divmod(index - 1, per_level)
        if layer == layers_per_block:  # the level's downsampling conv
            if slot != 0 or not rest.startswith("op."):
                raise KeyError(key)
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.') :]}"
        prefix = f"down_blocks.{level}"
    else:
        level, layer = divmod(index, per_level)
        if slot in (1, 2) and layer == layers_per_block and rest.startswith("conv."):  # upsampler after res/attn
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[len('conv.') :]}"
        prefix = f"up_blocks.{level}"
    if slot == 0:
        return f"{prefix}.resnets.{layer}.{_unet_resblock_key(rest)}"
    if slot == 1:
        return f"{prefix}.attentions.{layer}.{_unet_attention_key(rest)}"
    raise KeyError(key)


_DECODER_TOP_LEVEL = {
    "conv_in.": "conv_in.",
    "norm_out.": "conv_norm_out.",
    "conv_out.time_mix_conv.": "time_conv_out.",
    "conv_out.": "conv_out.",
}
_DECODER_RESBLOCK_LAYERS = {
    "time_stack.in_layers.0": "temporal_res_block.norm1",
    "time_stack.in_layers.2": "temporal_res_block.conv1",
    "time_stack.out_layers.0": "temporal_res_block.norm2",
    "time_stack.out_layers.3": "temporal_res_block.conv2",
    "mix_factor": "time_mixer.mix_factor",
    "nin_shortcut": "spatial_res_block.conv_shortcut",
    "norm1": "spatial_res_block.norm1",
    "conv1": "spatial_res_block.conv1",
    "norm2": "spatial_res_block.norm2",
    "conv2": "spatial_res_block.conv2",
}
_DECODER_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DECODER_BLOCK_KEY = re.compile(
    r"mid\.block_(\d)\.(.+)|mid\.attn_1\.(\w+)\.(\w+)|up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)"
)


def _decoder_resblock_key(rest: str) -> str:
    for old, new in _DECODER_RESBLOCK_LAYERS.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def decoder_key(key: str, num_levels: int) -> str:
    """Original ``VideoDecoder`` key (without ``first_stage_model.decoder.``) -> diffusers ``TemporalDecoder`` key.

    Spec §4: ``up.i`` is ``up_blocks.(num_levels - 1 - i)``; attention 1x1 convs become Linear layers (the
    loader squeezes their weights). Raises ``KeyError`` for a key with no counterpart.
    """
    for old, new in _DECODER_TOP_LEVEL.items():
        if key.startswith(old) and "." not in key[len(old) :]:
            return new + key[len(old) :]
    match = _DECODER_BLOCK_KEY.fullmatch(key)
    if match is None:
        raise KeyError(key)
    mid_block, mid_rest, attn_layer, attn_param, level, _, block, up_rest = match.groups()
    if mid_block is not None:
        return f"mid_block.resnets.{int(mid_block) - 1}.{_decoder_resblock_key(mid_rest)}"
    if attn_layer is not None:
        return f"mid_block.attentions.0.{_DECODER_ATTENTION[attn_layer]}.{attn_param}"
    up = f"up_blocks.{num_levels - 1 - int(level)}"
    if block is None:
        if not up_rest.startswith("conv."):
            raise KeyError(key)
        return f"{up}.upsamplers.0.{up_rest}"
    return f"{up}.resnets.{block}.{_decoder_resblock_key(up_rest)}"


# --------------------------------------------------------------------------------------------------------------
# Key mapping back: our module names -> original names (for writing checkpoints)
# --------------------------------------------------------------------------------------------------------------

# The audio projection's conditioner slot in each stage's original engine (spec §7).
AUDIO_PROJECTION_EMBEDDER = {"keyframe": 3, "interpolation": 1}
# Leaf appended to an original module prefix to push it through the forward map.
_PROBE_LEAF = "weight"


def _unet_original_prefixes(config: UNetConfig) -> list[str]:
    """Original ``VideoUNet`` module prefixes (block + first inner layer) of a UNet of these sizes.

    Only names a network of this layout has are generated: an upsampler is slot 2 after an attention, else 1.
    """
    levels, res_blocks = len(config.block_out_channels), config.layers_per_block
    per_level = res_blocks + 1
    resblock = ["time_mixer."] + [f"{half}{layer}." for half in ("", "time_stack.") for layer in _RESBLOCK_LAYERS]
    attention = ["", "time_stack.", "time_pos_embed.0.", "time_pos_embed.2."]
    blocks: list[tuple[str, list[str]]] = [(prefix, [""]) for prefix in _TOP_LEVEL]
    for index in range(1, levels * per_level):
        level, layer = divmod(index - 1, per_level)
        if layer == res_blocks:
            blocks.append((f"input_blocks.{index}.0.", ["op."]))
            continue
        blocks.append((f"input_blocks.{index}.0.", resblock))
        if config.attention_per_level[level]:
            blocks.append((f"input_blocks.{index}.1.", attention))
    blocks += [("middle_block.0.", resblock), ("middle_block.1.", attention), ("middle_block.2.", resblock)]
    for index in range(levels * per_level):
        level, layer = divmod(index, per_level)
        attended = config.attention_per_level[levels - 1 - level]
        blocks.append((f"output_blocks.{index}.0.", resblock))
        if attended:
            blocks.append((f"output_blocks.{index}.1.", attention))
        if layer == res_blocks and level < levels - 1:
            blocks.append((f"output_blocks.{index}.{1 + attended}.", ["conv."]))
    return [block + inner for block, inners in blocks for inner in inners]


def _decoder_original_prefixes(config: DecoderConfig) -> list[str]:
    """Original ``VideoDecoder`` module prefixes (and leaf names) of a decoder of these sizes."""
    resblock = [layer if layer == "mix_factor" else layer + "." for layer in _DECODER_RESBLOCK_LAYERS]
    blocks: list[tuple[str, list[str]]] = [(prefix, [""]) for prefix in _DECODER_TOP_LEVEL]
    blocks += [(f"mid.block_{index}.", resblock) for index in (1, 2)]
    blocks += [(f"mid.attn_1.{layer}.", [""]) for layer in _DECODER_ATTENTION]
    for level in range(len(config.block_out_channels)):
        blocks += [(f"up.{level}.block.{block}.", resblock) for block in range(config.layers_per_block + 1)]
        blocks.append((f"up.{level}.upsample.", ["conv."]))
    return [DECODER_PREFIX + block + inner for block, inners in blocks for inner in inners]


def _inverse_names(keys: list[str], original_prefixes: list[str], forward, what: str) -> dict[str, str]:
    """The original name of each of ``keys`` (our module names), found with the forward map ``forward`` itself.

    Each original prefix (ending in ``.``; other entries are whole names) is pushed through ``forward`` to learn
    its counterpart; a key takes the original of its longest counterpart prefix. The result is checked: the
    forward map takes every original back to its key, and no two keys share an original. A failure is a bug in
    the mapping (never a user error), raised as RuntimeError.
    """
    counterparts: dict[str, str] = {}
    for original in original_prefixes:
        is_prefix = original.endswith(".")
        try:
            mapped = forward(original + _PROBE_LEAF if is_prefix else original)
        except KeyError:
            continue
        if mapped is None or (is_prefix and not mapped.endswith("." + _PROBE_LEAF)):
            continue
        ours = mapped[: -len(_PROBE_LEAF)] if is_prefix else mapped
        if counterparts.setdefault(ours, original) != original:
            raise RuntimeError(f"{what}: {counterparts[ours]} and {original} both map to {ours}")
    names = {}
    for key in keys:
        parts = key.split(".")
        candidates = [key] + [".".join(parts[:n]) + "." for n in range(len(parts) - 1, 0, -1)]
        prefix = next((c for c in candidates if c in counterparts and (c == key or c.endswith("."))), None)
        original = None if prefix is None else counterparts[prefix] + key[len(prefix) :]
        try:
            ok = original is not None and forward(original) == key
        except KeyError:
            ok = False
        if not ok:
            raise RuntimeError(f"{what}: no original name maps to {key} (best guess {original})")
        names[key] = original
    if len(set(names.values())) != len(names):
        raise RuntimeError(f"{what}: several of our tensors map to the same original name")
    return names


def official_key_names(model, decoder=None) -> dict[str, str]:
    """Original engine key (spec §7) of every tensor of a stage module and, optionally, a VAE frame decoder.

    Args:
        model: a :class:`~keyface.models.stages.KeyframeModel`, ``InterpolationModel`` or ``InterpolationNetwork``.
        decoder: a :class:`~keyface.models.vae.FrameDecoder` (its keys start with ``decoder.``) or ``None``.
    Returns:
        ``{our state-dict key: original key}``; the inverse of the loaders' mapping, checked against it.
    """
    config: StageConfig = model.config
    embedder = AUDIO_PROJECTION_EMBEDDER[config.kind]
    stage_prefixes = [UNET_PREFIX + prefix for prefix in _unet_original_prefixes(config.unet)]
    stage_prefixes += [LEARNED_MASK_KEY, f"conditioner.embedders.{embedder}.linear."]
    names = _inverse_names(
        list(model.state_dict()),
        stage_prefixes,
        lambda key: _stage_target(key, config.unet.layers_per_block),
        type(model).__name__,
    )
    if decoder is not None:
        levels = len(decoder.config.block_out_channels)

        def forward(key: str) -> str:
            if not key.startswith(DECODER_PREFIX):
                raise KeyError(key)
            return "decoder." + decoder_key(key[len(DECODER_PREFIX) :], levels)

        names.update(
            _inverse_names(
                list(decoder.state_dict()), _decoder_original_prefixes(decoder.config), forward, "FrameDecoder"
            )
        )
    return names


def official_state_dict(model, decoder=None) -> dict[str, torch.Tensor]:
    """The tensors of a stage module (+ VAE frame decoder) under their original engine names (on their device).

    What the loaders read back: ``model.diffusion_model.*``, ``model.learned_mask``,
    ``conditioner.embedders.{3|1}.linear.*``, ``first_stage_model.decoder.*``. The decoder's attention
    projections, Linear layers in diffusers, become the original's 1x1 convolutions again (the original decoder
    has no Linear layer).
    """
    tensors = dict(model.state_dict())
    if decoder is not None:
        tensors.update(decoder.state_dict())
    state = {}
    for ours, original in official_key_names(model, decoder).items():
        tensor = tensors[ours].detach()
        if original.startswith(DECODER_PREFIX) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[original] = tensor
    return state


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """The tensors of a weight file under their original names (``_forward_module.`` removed)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    stored_config: str | None = None

    @property
    def kind(self) -> StageKind:
        """Which stage the file holds: ``interpolation`` when it has a learned mask, else ``keyframe``."""
        if not any(key.startswith(UNET_PREFIX) for key in self.tensors):
            raise CheckpointError(
                f"{self.path} holds no KeyFace stage network (no '{UNET_PREFIX}*' tensors); expected keyframe.pt, "
                f"interpolation.pt or interpolation_bad.pt from {KEYFACE_WEIGHTS_SOURCE}"
            )
        return "interpolation" if LEARNED_MASK_KEY in self.tensors else "keyframe"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(tensor.shape) for key, tensor in self.tensors.items()}


def _existing_file(path: str | Path, source: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"weight file {path} not found; download it from {source}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; expected a weight file from {source}")
    return path


def _damaged(path: Path, kind: str, exc: BaseException) -> CheckpointError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{path} cannot be read as a {kind} file ({reason}); it is truncated, damaged or not a checkpoint - "
        f"download it again from {KEYFACE_WEIGHTS_SOURCE}"
    )


def _torch_load(path: Path, *, allow_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; ``allow_pickle`` (convert command only) may fall back to a
    full unpickle after a warning."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Unsupported" not in str(exc):
            raise _damaged(path, "PyTorch checkpoint", exc) from None
        if not allow_pickle:
            raise CheckpointError(
                f"{path} stores Python objects besides tensors, so the safe loader (torch.load with "
                f"weights_only=True) refuses it. Convert it once with `{CONVERT_COMMAND}` (this unpickles the "
                "file, which can run code: do it only for a file from a source you trust) and load the "
                ".safetensors file instead"
            ) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... for damaged files
        raise _damaged(path, "PyTorch checkpoint", exc) from None
    print(
        f"WARNING: {path} is not loadable with weights_only=True; unpickling it in full because you asked for a "
        "conversion. Unpickling can execute arbitrary code: only convert files from a source you trust.",
        file=sys.stderr,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise _damaged(path, "PyTorch checkpoint", exc) from None


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded ``.pt`` / ``.ckpt`` / ``.bin`` object."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("module"), Mapping):
            obj = obj["module"]
        elif isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
    items = obj.items() if isinstance(obj, Mapping) else ()
    tensors = {key: value for key, value in items if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensors in a 'module' / 'state_dict' dict or at top level; expected a KeyFace "
            f"checkpoint from {KEYFACE_WEIGHTS_SOURCE}"
        )
    return tensors


def _read_safetensors(path: Path, prefixes: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {
                key: handle.get_tensor(key) for key in handle.keys() if prefixes is None or key.startswith(prefixes)
            }
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, "safetensors", exc) from None
    return tensors, metadata


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Read a weight file (``.pt``, ``.ckpt``, ``.bin``, ``.safetensors``) without building any module.

    ``allow_pickle`` is for :func:`convert_checkpoint` only (see the module docstring).
    """
    path = _existing_file(path, KEYFACE_WEIGHTS_SOURCE)
    suffix = path.suffix.lower()
    stored_config = None
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        stored_config = metadata.get(CONFIG_METADATA_KEY)
    elif suffix in CHECKPOINT_SUFFIXES:
        tensors = _tensors_of(_torch_load(path, allow_pickle=allow_pickle), path)
    else:
        raise CheckpointError(
            f"{path} has the unsupported file type {suffix or '(none)'!r}; expected a KeyFace checkpoint "
            f"({', '.join(CHECKPOINT_SUFFIXES)}) from {KEYFACE_WEIGHTS_SOURCE}"
        )
    return Checkpoint(path, _original_names(tensors), stored_config)


def _original_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine keys without the DeepSpeed/Lightning ``_forward_module.`` prefix."""
    return {key.replace(DEEPSPEED_PREFIX, ""): tensor for key, tensor in tensors.items()}


# --------------------------------------------------------------------------------------------------------------
# Configuration from shapes
# --------------------------------------------------------------------------------------------------------------


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _unet_fields(unet: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    try:
        width0, in_channels = unet["input_blocks.0.0.weight"][:2]
        inputs = sorted({int(key.split(".")[1]) for key in unet if key.startswith("input_blocks.")} - {0})
        downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]
        levels = len(downsamplers) + 1
        per_level = (len(inputs) + 1) // levels
        if len(inputs) != levels * per_level - 1 or downsamplers != [per_level * k for k in range(1, levels)]:
            raise KeyError("input_blocks layout")
        first_blocks = [1 + level * per_level for level in range(levels)]
        depth = len({key.split(".")[3] for key in unet if key.startswith("middle_block.1.transformer_blocks.")})
        context_dim = unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        if unet["time_embed.0.weight"] != (4 * width0, width0):
            raise KeyError("time_embed.0.weight (expected 4 x the first block width)")
        emotion_dim, odd = divmod(unet["label_emb.0.0.weight"][1] - context_dim, 2)
        if odd or emotion_dim < 0:
            raise KeyError("label_emb.0.0.weight (label width must be 2 x emotion width + token width)")
        return {
            "unet.in_channels": in_channels,
            "unet.out_channels": unet["out.2.weight"][0],
            "unet.block_out_channels": tuple(unet[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first_blocks),
            "unet.attention_per_level": tuple(f"input_blocks.{i}.1.norm.weight" in unet for i in first_blocks),
            "unet.layers_per_block": per_level - 1,
            "unet.transformer_layers_per_block": depth,
            "unet.context_dim": context_dim,
            "unet.emotion_embedding_dim": emotion_dim,
        }
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unrecognised KeyFace UNet layout (problem with {exc}); expected the SVD-style VideoUNet "
            f"of a KeyFace checkpoint from {KEYFACE_WEIGHTS_SOURCE}"
        ) from None


def _decoder_fields(decoder: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    try:
        levels = len({key.split(".")[1] for key in decoder if key.startswith("up.")})
        blocks = {key.split(".")[3] for key in decoder if key.startswith("up.0.block.")}
        return {
            "decoder.block_out_channels": tuple(decoder[f"up.{i}.block.0.conv2.weight"][0] for i in range(levels)),
            "decoder.layers_per_block": len(blocks) - 1,
            "decoder.latent_channels": decoder["conv_in.weight"][1],
            "decoder.out_channels": decoder["conv_out.weight"][0],
        }
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: unrecognised VAE decoder layout (missing {exc})") from None


def _inferred_fields(shapes: Mapping[str, tuple[int, ...]], kind: StageKind, path: Path) -> dict[str, Any]:
    """Every StageConfig field (dotted names) that the tensor shapes determine."""
    unet = {key[len(UNET_PREFIX) :]: shape for key, shape in shapes.items() if key.startswith(UNET_PREFIX)}
    fields = _unet_fields(unet, path)
    fields["kind"] = kind
    fields["latent_channels"] = fields["unet.out_channels"]
    if LEARNED_MASK_KEY in shapes:
        channels, size = shapes[LEARNED_MASK_KEY][:2]
        fields.update({"latent_channels": channels, "latent_size": size})
    projections = [key for key in shapes if (m := AUDIO_PROJECTION_KEY.fullmatch(key)) and m.group(2) == "weight"]
    if len(projections) > 1:
        raise CheckpointError(f"{path} holds several audio projections ({', '.join(projections)}); expected one")
    if projections:
        tokens, features = shapes[projections[0]]
        if tokens != fields["unet.context_dim"]:
            raise CheckpointError(
                f"{path}: the audio projection outputs {tokens} channels but the UNet's context is "
                f"{fields['unet.context_dim']} wide"
            )
        fields["audio_feature_dim"] = features
    decoder = {key[len(DECODER_PREFIX) :]: shape for key, shape in shapes.items() if key.startswith(DECODER_PREFIX)}
    if decoder:
        fields.update(_decoder_fields(decoder, path))
    return fields


def _config_with(base: StageConfig, fields: Mapping[str, Any], path: Path) -> StageConfig:
    flat = _flatten(base.to_dict())
    flat.update(fields)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        return StageConfig.from_dict(nested)
    except InputError as exc:
        if "num_head_channels" not in str(exc):
            raise CheckpointError(f"{path}: the weights do not form a KeyFace stage network ({exc})") from None
        raise CheckpointError(
            f"{path}: the attention head width cannot be read from the weights, and the assumed one does not fit "
            f"({exc}). "
            f"Put a config JSON next to the file ({path.with_suffix('.json')}, as written by StageConfig.to_json, "
            "or a fixture set's config.json) or pass config=..."
        ) from None


def infer_stage_config(
    shapes: Mapping[str, tuple[int, ...]], path: str | Path = "checkpoint", fallback: StageConfig | None = None
) -> StageConfig:
    """The StageConfig of an engine checkpoint from its tensor shapes (original key names).

    Fields the shapes cannot tell (head width, frames per clip, the keyframe stage's latent size, and the audio /
    decoder sizes of a file without them) come from ``fallback``, by default the official config of the stage.
    """
    path = Path(path)
    kind: StageKind = "interpolation" if LEARNED_MASK_KEY in shapes else "keyframe"
    return _config_with(fallback or StageConfig.official(kind), _inferred_fields(shapes, kind, path), path)


def _neighbour_config(path: Path, kind: StageKind) -> tuple[StageConfig, str] | None:
    """A config JSON next to the checkpoint: ``<stem>.json``, else a recognised ``config.json`` here or above."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return StageConfig.from_file(sidecar, kind), str(sidecar)
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.json"
        if not candidate.is_file():
            continue
        try:
            fmt = str(json.loads(candidate.read_text()).get("format", ""))
        except (OSError, ValueError, AttributeError):
            continue  # somebody else's config.json
        if fmt == STAGE_CONFIG_FORMAT or fmt.startswith(FIXTURE_CONFIG_FORMAT_PREFIX):
            return StageConfig.from_file(candidate, kind), str(candidate)
    return None


def resolve_stage_config(checkpoint: Checkpoint, config: StageConfig | None = None) -> StageConfig:
    """The configuration to build for ``checkpoint``: from the first source found (see the module docstring),
    checked against the tensor shapes; raises CheckpointError on any size mismatch."""
    kind, path = checkpoint.kind, checkpoint.path
    source = None
    if config is not None:
        source = (config, "the config argument")
    elif checkpoint.stored_config:
        source = (StageConfig.from_json(checkpoint.stored_config, f"{path} metadata"), "the config stored in the file")
    else:
        source = _neighbour_config(path, kind)
    if source is None:
        return infer_stage_config(checkpoint.shapes(), path)
    expected, origin = source
    if expected.kind != kind:
        raise CheckpointError(f"{path} holds the {kind} stage but {origin} describes the {expected.kind} stage")
    wanted = _flatten(expected.to_dict())
    differences = [
        f"{key}: file {value} vs config {wanted[key]}"
        for key, value in _inferred_fields(checkpoint.shapes(), kind, path).items()
        if wanted[key] != value
    ]
    if differences:
        raise CheckpointError(
            f"{path} does not match {origin} (size mismatch - {'; '.join(differences)}); use the config that "
            "belongs to these weights, or none to read the sizes from the file"
        )
    return expected


def read_stage_config(path: str | Path, config: StageConfig | None = None) -> StageConfig:
    """The StageConfig of a checkpoint file (shapes + head width source, see the module docstring)."""
    return resolve_stage_config(read_checkpoint(path), config)


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _stage_target(key: str, layers_per_block: int) -> str | None:
    """Our module key for an original engine key, ``None`` for keys outside the stage networks; raises
    ``KeyError`` for an unknown key inside them."""
    if key.startswith(UNET_PREFIX):
        return "unet." + unet_key(key[len(UNET_PREFIX) :], layers_per_block)
    if key == LEARNED_MASK_KEY:
        return "learned_mask"
    if match := AUDIO_PROJECTION_KEY.fullmatch(key):
        return f"audio_projection.linear.{match.group(2)}"
    if key.startswith("model."):
        raise KeyError(key)
    return None


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, unexpected: list[str]):
    missing = sorted(set(module.state_dict()) - set(state))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(sorted(unexpected)[:3])})")
        raise CheckpointError(
            f"{path} does not fit the {type(module).__name__}: {' and '.join(problems)}; expected a KeyFace "
            f"checkpoint from {KEYFACE_WEIGHTS_SOURCE}"
        )
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the {type(module).__name__}: {exc}") from None


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
            target = _stage_target(key, stage_config.unet.layers_per_block)
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
    _load_into(module, state, checkpoint.path, unexpected)
    if unknown:
        logger.warning("%s: ignored %d tensors outside the KeyFace networks (e.g. %s)", path, len(unknown), unknown[0])
    return module.to(device).eval().requires_grad_(False)


def load_keyframe_model(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The keyframe stage (UNet + audio projection) from ``keyframe.pt`` / ``.safetensors``, ready for inference."""
    from .models.stages import KeyframeModel

    return _load_stage(path, KeyframeModel, "keyframe", config, device, dtype)


def load_interpolation_model(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The interpolation stage (UNet + learned mask + audio projection) from ``interpolation.pt``."""
    from .models.stages import InterpolationModel

    return _load_stage(path, InterpolationModel, "interpolation", config, device, dtype)


def load_autoguidance_network(
    path: str | Path, config: StageConfig | None = None, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The autoguidance "bad" network (UNet + learned mask) from ``interpolation_bad.pt``; its conditioner and
    VAE tensors are ignored (it receives the main model's conditioning, spec §5.5)."""
    from .models.stages import InterpolationNetwork

    return _load_stage(path, InterpolationNetwork, "interpolation", config, device, dtype)


def load_frame_decoder(path: str | Path, device: str | torch.device = "cpu"):
    """The float32 VAE frame decoder stored in an engine checkpoint (``first_stage_model.decoder.*``).

    The output video is decoded with the interpolation checkpoint's decoder (spec §4, fixture README).
    """
    from .models.vae import FrameDecoder

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
    fields = _decoder_fields(decoder_shapes, checkpoint.path)
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
    _load_into(module, state, checkpoint.path, unexpected)
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
    path = _existing_file(path, VAE_WEIGHTS_SOURCE)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{path}: expected the SVD VAE as a diffusers folder or a .safetensors file from {VAE_WEIGHTS_SOURCE}"
        )
    return path


def load_identity_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """The float32 SVD VAE image encoder from a diffusers ``vae`` folder (``config.json`` +
    ``diffusion_pytorch_model[.fp16].safetensors``) or a single diffusers-layout ``.safetensors`` file."""
    from .models.vae import IdentityEncoder

    file = _vae_weight_file(path)
    tensors, _ = _read_safetensors(file, VAE_ENCODER_PREFIXES)
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
    _load_into(module, state, file, [key for key in tensors if key not in wanted])
    return module.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Conversion (the opt-in command)
# --------------------------------------------------------------------------------------------------------------


def _write_stage_file(tensors: dict[str, torch.Tensor], dst: Path, config: StageConfig) -> None:
    """Flat safetensors with ``config`` in the metadata, written to ``<dst>.partial`` and renamed into place."""
    seen: set[int] = set()
    contiguous = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        contiguous[key] = (
            tensor.clone() if storage in seen else tensor.contiguous()
        )  # safetensors refuses shared memory
        seen.add(storage)
    partial = dst.with_name(dst.name + ".partial")
    try:
        save_file(contiguous, str(partial), metadata={"format": "pt", CONFIG_METADATA_KEY: config.to_json()})
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)


def _safetensors_target(dst: str | Path, what: str) -> Path:
    dst = Path(dst).expanduser()
    if dst.suffix.lower() != ".safetensors":
        raise InputError(f"{what} {dst} must end in .safetensors")
    if dst.is_dir():
        raise InputError(f"{what} {dst} is a folder; give a file name ending in .safetensors")
    if not dst.parent.is_dir():
        raise InputError(f"{what} {dst}: folder {dst.parent} does not exist; create it first")
    return dst


def save_stage_checkpoint(path: str | Path, model, decoder=None) -> Path:
    """Write a stage module (+ its VAE frame decoder) as a checkpoint the loaders read without any config file.

    Flat ``.safetensors`` with the original key names (:func:`official_state_dict`) and the model's StageConfig
    in the metadata, written atomically (temporary file + rename). Returns the path written.
    """
    dst = _safetensors_target(path, "checkpoint output")
    if decoder is not None and decoder.config != model.config.decoder:
        raise InputError(
            f"checkpoint output {dst}: the decoder's config {decoder.config} differs from the stage config's "
            f"{model.config.decoder}"
        )
    tensors = {key: tensor.cpu() for key, tensor in official_state_dict(model, decoder).items()}
    _write_stage_file(tensors, dst, model.config)
    return dst


def convert_checkpoint(src: str | Path, dst: str | Path) -> StageConfig:
    """Rewrite a KeyFace engine checkpoint as flat ``.safetensors`` (original key names, dtypes kept) with its
    StageConfig in the metadata. Backs ``python -m keyface convert``.

    This is the only code path that may unpickle a file that ``weights_only=True`` refuses: it prints a warning
    (unpickling can run code) and proceeds, because running the command is the user's explicit opt-in. The
    output is written to a temporary file next to ``dst`` and renamed into place when complete.
    """
    dst = _safetensors_target(dst, "conversion output")
    checkpoint = read_checkpoint(src, allow_pickle=True)
    config = resolve_stage_config(checkpoint)
    _write_stage_file(checkpoint.tensors, dst, config)
    return config


def _is_unilm_checkpoint(obj: Any) -> bool:
    """An original unilm encoder file: ``{'cfg': dict, 'model': state dict}``."""
    return isinstance(obj, Mapping) and isinstance(obj.get("cfg"), Mapping) and isinstance(obj.get("model"), Mapping)


def convert_any(source: str | Path, target: str | Path) -> str:
    """``python -m keyface convert``: rewrite a KeyFace stage checkpoint or an original unilm WavLM / BEATs
    checkpoint as ``.safetensors``; returns a one-line summary of what was written.

    Stage checkpoints are written as by :func:`convert_checkpoint` (original key names, StageConfig in the
    metadata); unilm ``{'cfg', 'model'}`` files through :func:`keyface.audio.weights.save_unilm_checkpoint` (unilm key
    names, ``cfg`` in the metadata). A pickle that ``weights_only=True`` refuses is unpickled after a warning
    (the command is the user's opt-in; only convert files from a source you trust).
    """
    from .audio.weights import save_unilm_checkpoint

    src = Path(source).expanduser()
    if src.is_dir():
        raise InputError(
            f"{src} is a folder; the Hugging Face folders (wav2vec2-base-960h/, vae/) are used as they are, only "
            "single .pt / .ckpt / .bin checkpoint files are converted"
        )
    src = _existing_file(src, KEYFACE_WEIGHTS_SOURCE)
    dst = _safetensors_target(target, "conversion output")
    if src.resolve() == dst.resolve():
        raise InputError(f"conversion output {dst} is the input file itself; choose another name")
    loaded = _torch_load(src, allow_pickle=True) if src.suffix.lower() != ".safetensors" else None
    if _is_unilm_checkpoint(loaded):
        cfg = dict(loaded["cfg"])
        encoder = "BEATs" if "input_patch_size" in cfg else "WavLM" if "extractor_mode" in cfg else None
        if encoder is None:
            raise CheckpointError(
                f"{src} is a unilm {{'cfg', 'model'}} checkpoint but neither WavLM nor BEATs (its cfg has no "
                "'extractor_mode' or 'input_patch_size'); KeyFace uses WavLM Base+ and BEATs iter3+ only"
            )
        tensors = {key: value for key, value in loaded["model"].items() if isinstance(value, torch.Tensor)}
        if len(tensors) != len(loaded["model"]):
            raise CheckpointError(f"{src}: its 'model' entry holds values that are not tensors; not a unilm checkpoint")
        save_unilm_checkpoint(dst, cfg, tensors)
        return f"wrote {dst}: {encoder} audio encoder, {len(tensors)} tensors (unilm names, cfg in the metadata)"
    if loaded is None:
        checkpoint = read_checkpoint(src)
    else:
        checkpoint = Checkpoint(src, _original_names(_tensors_of(loaded, src)))
    if not any(key.startswith(UNET_PREFIX) for key in checkpoint.tensors):
        raise CheckpointError(
            f"{src} is neither a KeyFace stage checkpoint ('{UNET_PREFIX}*' tensors: keyframe.pt, interpolation.pt, "
            f"interpolation_bad.pt from {KEYFACE_WEIGHTS_SOURCE}) nor an original unilm WavLM / BEATs checkpoint "
            "({'cfg', 'model'}); nothing to convert"
        )
    config = resolve_stage_config(checkpoint)
    _write_stage_file(checkpoint.tensors, dst, config)
    return (
        f"wrote {dst}: {config.kind} stage, {len(checkpoint.tensors)} tensors (original names, config in the metadata)"
    )
