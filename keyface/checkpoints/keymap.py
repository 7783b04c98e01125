"""The original engine key names <-> our module names (docs/checkpoints.md): the one place that knows them.

Reading maps original sgm names to our modules (:func:`unet_key`, :func:`decoder_key`, :func:`stage_target`).
Writing goes the other way with the same mapping: :func:`official_key_names` inverts it by pushing candidate
original names through it and checking the result is a bijection, so the two directions cannot drift apart.
"""

from __future__ import annotations

import re

import torch

from ..config import DecoderConfig, StageConfig, UNetConfig

# Original engine key namespaces (docs/checkpoints.md#key-layout).
DEEPSPEED_PREFIX = "_forward_module."
UNET_PREFIX = "model.diffusion_model."
LEARNED_MASK_KEY = "model.learned_mask"
DECODER_PREFIX = "first_stage_model.decoder."
AUDIO_PROJECTION_KEY = re.compile(r"conditioner\.embedders\.(\d+)\.linear\.(weight|bias)")
# Keys an original file may hold that no inference module uses (docs/checkpoints.md#unused-keys): the interpolation
# conditioner's unused VAE encoder, the engine's deleted first-stage encoder, EMA copies.
UNUSED_PREFIXES = ("conditioner.embedders.0.encoder.", "first_stage_model.encoder.", "model_ema.")
# diffusers VAE folder (identity encoder).
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


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
    """Original ``VideoUNet`` key (without ``model.diffusion_model.``) -> :class:`KeyFaceUNet` key
    (docs/checkpoints.md#unet-keys).

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

    docs/checkpoints.md#vae-decoder-keys: ``up.i`` is ``up_blocks.(num_levels - 1 - i)``; attention 1x1 convs become
    Linear layers (the loader squeezes their weights). Raises ``KeyError`` for a key with no counterpart.
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

# The audio projection's conditioner slot in each stage's original engine (docs/checkpoints.md#key-layout).
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
    """Original engine key (docs/checkpoints.md#key-layout) of every tensor of a stage module and, optionally, a VAE
    frame decoder.

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
        lambda key: stage_target(key, config.unet.layers_per_block),
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


def stage_target(key: str, layers_per_block: int) -> str | None:
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
