"""A stage checkpoint's StageConfig: from its tensor shapes, plus the head width from the first source found.

The attention head width, which shapes cannot tell, comes from (first found) the ``config`` argument, the
config stored in a converted file, ``<stem>.json`` next to the file, a fixture-style or our ``config.json`` in
the same or the parent folder, else the official 64 channels per head (with a warning: a non-official width
would load silently with the wrong number of heads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import FIXTURE_CONFIG_FORMAT_PREFIX, STAGE_CONFIG_FORMAT, StageConfig, StageKind
from ..errors import CheckpointError, InputError
from .formats import CONVERT_COMMAND, KEYFACE_WEIGHTS_SOURCE, Checkpoint, read_checkpoint
from .keymap import AUDIO_PROJECTION_KEY, DECODER_PREFIX, LEARNED_MASK_KEY, UNET_PREFIX

logger = logging.getLogger(__name__)


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


def decoder_fields(decoder: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
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
        fields.update(decoder_fields(decoder, path))
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


def config_source(checkpoint: Checkpoint, config: StageConfig | None = None) -> tuple[StageConfig, str] | None:
    """The first given configuration of ``checkpoint`` and where it came from (module docstring), or ``None``
    when only the tensor shapes are known (the head width is then assumed: :func:`assumed_head_width_note`)."""
    if config is not None:
        return config, "the config argument"
    if checkpoint.stored_config:
        stored = StageConfig.from_json(checkpoint.stored_config, f"{checkpoint.path} metadata")
        return stored, "the config stored in the file"
    return _neighbour_config(checkpoint.path, checkpoint.kind)


def assumed_head_width_note(path: Path) -> str:
    """Why a lone checkpoint's attention head width is the official one, and how to give the real one."""
    width = StageConfig.official().unet.num_head_channels
    return (
        f"{path}: the attention head width cannot be read from the weights and no config was found, so the "
        f"official {width} channels per head were assumed; if these weights use another width, put their "
        f"StageConfig JSON next to the file as {path.with_suffix('.json')} (or convert it with {CONVERT_COMMAND} "
        "with that JSON in place, which stores the config in the .safetensors)"
    )


def resolve_stage_config(checkpoint: Checkpoint, config: StageConfig | None = None) -> StageConfig:
    """The configuration to build for ``checkpoint``: from the first source found (see the module docstring),
    checked against the tensor shapes; raises CheckpointError on any size mismatch. Logs one warning when the
    head width had to be assumed."""
    kind, path = checkpoint.kind, checkpoint.path
    source = config_source(checkpoint, config)
    if source is None:
        inferred = infer_stage_config(checkpoint.shapes(), path)
        logger.warning("%s", assumed_head_width_note(path))
        return inferred
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
    """The StageConfig of a checkpoint file (shapes + head width source, see the module docstring); what
    ``StageConfig.from_checkpoint`` was."""
    return resolve_stage_config(read_checkpoint(path), config)
