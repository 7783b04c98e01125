"""WavLM (keyframe audio, docs/audio.md#wavlm) on ``transformers.WavLMModel``.

Loads the original unilm checkpoint (``WavLM-Base+.pt``: ``{'cfg', 'model'}``, or a safetensors copy, see
:mod:`keyface.audio.weights`) by mapping its config and key names to transformers, or a Hugging Face folder
(``microsoft/wavlm-base-plus`` layout) with ``from_pretrained(folder)``, locally only. Every size comes from the
checkpoint's own config.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, brief
from ..files import file_identity
from .speech_encoder import WAVLM_LAYER_NORM, TransformersSpeechEncoder
from .weights import WAVLM_ORIGIN, read_unilm_checkpoint, require_path

_WHAT = "WavLM checkpoint"

# unilm cfg keys that define the network (all must be present in the checkpoint's cfg).
_REQUIRED_CFG = (
    "extractor_mode",
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "activation_fn",
    "layer_norm_first",
    "conv_feature_layers",
    "conv_bias",
    "conv_pos",
    "conv_pos_groups",
    "relative_position_embedding",
    "num_buckets",
    "max_distance",
    "gru_rel_pos",
    "normalize",
)
_EXTRACTOR_NORM = {"default": "group", "layer_norm": "layer"}  # unilm extractor_mode -> transformers feat_extract_norm
_ACTIVATIONS = ("gelu", "relu")
_UNUSED_KEYS = ("mask_emb", "label_embs_concat")  # pre-training only

# unilm key pattern -> transformers key (applied in order, first match wins).
_KEY_MAP = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)",
        r"encoder.layers.\1.attention.gru_rel_pos_linear.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight",
        r"encoder.layers.\1.attention.rel_attn_embed.weight",
    ),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]


def wavlm_config_from_unilm(cfg: dict, where: str = "cfg"):
    """The ``transformers.WavLMConfig`` equivalent to a unilm WavLM ``cfg`` dict (sizes read from ``cfg``)."""
    from transformers import WavLMConfig

    missing = [key for key in _REQUIRED_CFG if key not in cfg]
    if missing:
        raise CheckpointError(f"{_WHAT}: {where} lacks the config entries {missing}; is it a WavLM checkpoint?")
    unsupported = []
    if cfg["extractor_mode"] not in _EXTRACTOR_NORM:
        unsupported.append(f"extractor_mode={cfg['extractor_mode']!r}")
    if cfg["activation_fn"] not in _ACTIVATIONS:
        unsupported.append(f"activation_fn={cfg['activation_fn']!r}")
    if not (cfg["relative_position_embedding"] and cfg["gru_rel_pos"]):
        unsupported.append("relative_position_embedding/gru_rel_pos off (transformers WavLM always has them)")
    if unsupported:
        raise CheckpointError(f"{_WHAT}: {where}: unsupported WavLM variant: {', '.join(unsupported)}")
    conv_layers = parse_conv_layers(cfg["conv_feature_layers"], where)
    return WavLMConfig(
        hidden_size=int(cfg["encoder_embed_dim"]),
        num_hidden_layers=int(cfg["encoder_layers"]),
        num_attention_heads=int(cfg["encoder_attention_heads"]),
        intermediate_size=int(cfg["encoder_ffn_embed_dim"]),
        hidden_act=cfg["activation_fn"],
        feat_extract_activation="gelu",  # unilm ConvFeatureExtractionModel uses nn.GELU in every conv layer
        feat_extract_norm=_EXTRACTOR_NORM[cfg["extractor_mode"]],
        conv_dim=[dim for dim, _, _ in conv_layers],
        conv_kernel=[kernel for _, kernel, _ in conv_layers],
        conv_stride=[stride for _, _, stride in conv_layers],
        conv_bias=bool(cfg["conv_bias"]),
        num_conv_pos_embeddings=int(cfg["conv_pos"]),
        num_conv_pos_embedding_groups=int(cfg["conv_pos_groups"]),
        num_buckets=int(cfg["num_buckets"]),
        max_bucket_distance=int(cfg["max_distance"]),
        do_stable_layer_norm=bool(cfg["layer_norm_first"]),
        layer_norm_eps=1e-5,  # fairseq / unilm LayerNorm default
        apply_spec_augment=False,
        mask_time_prob=0.0,
    )


def parse_conv_layers(text: str, where: str = "cfg") -> list[tuple[int, int, int]]:
    """Read unilm's ``conv_feature_layers`` string, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"``, without ``eval``."""

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unexpected {type(node).__name__}")

    try:
        layers = value(ast.parse(text, mode="eval"))
        if not isinstance(layers, list) or not all(
            isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) for v in layer) for layer in layers
        ):
            raise ValueError("expected a list of (dim, kernel, stride) tuples")
    except (SyntaxError, ValueError, TypeError) as error:
        raise CheckpointError(f"{_WHAT}: {where}: cannot read conv_feature_layers {text!r} ({error})") from error
    return layers


def wavlm_state_dict_from_unilm(
    state_dict: dict[str, torch.Tensor], where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a unilm WavLM state dict to ``transformers.WavLMModel`` keys (pre-training-only tensors dropped)."""
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        if key in _UNUSED_KEYS:
            continue
        for pattern, replacement in _KEY_MAP:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{_WHAT}: {where} has tensors that are not WavLM weights: {unknown[:8]}")
    return renamed


def _inverted_rule(pattern: str, replacement: str) -> tuple[str, str]:
    """A ``_KEY_MAP`` rule turned around: transformers key pattern -> unilm replacement.

    The replacement's literal text becomes the pattern (escaped) and its ``\\N`` references the groups they copy;
    the original pattern, unescaped, becomes the replacement with each group renumbered.
    """
    groups = re.findall(r"\([^)]*\)", pattern)
    pieces = re.split(r"\\(\d)", replacement)  # literal, group number, literal, ...
    order = [int(number) for number in pieces[1::2]]
    inverse_pattern = "".join(
        re.escape(piece) if index % 2 == 0 else groups[int(piece) - 1] for index, piece in enumerate(pieces)
    )
    literal_pieces = re.split(r"\([^)]*\)", pattern)
    inverse_replacement = literal_pieces[0].replace("\\", "")
    for group, literal in enumerate(literal_pieces[1:], start=1):
        inverse_replacement += f"\\{order.index(group) + 1}" + literal.replace("\\", "")
    return inverse_pattern, inverse_replacement


def wavlm_state_dict_to_unilm(state_dict: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`wavlm_state_dict_from_unilm` for a network of this unilm ``cfg``: ``transformers.WavLMModel``
    keys -> the released checkpoint's names. The first conv layer's norm is a GroupNorm (``.0.2.``) only in the
    ``default`` extractor mode (Base+), a LayerNorm (``.0.2.1.``) like the others in ``layer_norm`` mode."""
    rules = [_inverted_rule(pattern, replacement) for pattern, replacement in _KEY_MAP]
    if cfg.get("extractor_mode") != "default":
        rules = [rule for rule, (pattern, _) in zip(rules, _KEY_MAP) if ".0\\.2\\." not in pattern]
    renamed = {}
    for key, tensor in state_dict.items():
        key = key.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        key = key.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise RuntimeError(f"no unilm WavLM name maps to {key}")
    return renamed


def build_wavlm(cfg: dict, identity: str = "random") -> TransformersSpeechEncoder:
    """A WavLM encoder with random weights from a unilm ``cfg`` dict (benchmarks and tests)."""
    from transformers import WavLMModel

    return TransformersSpeechEncoder("wavlm", WavLMModel(wavlm_config_from_unilm(cfg)), identity, _normalisation(cfg))


def load_wavlm(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load WavLM from a unilm ``.pt`` / ``.safetensors`` file or a Hugging Face folder -> encoder in eval mode."""
    path = require_path(path, _WHAT, WAVLM_ORIGIN)
    if path.is_dir():
        model = _load_hf_folder(path)
        normalise = _hf_do_normalize(path)
        encoder = TransformersSpeechEncoder(
            "wavlm", model, file_identity(path), WAVLM_LAYER_NORM if normalise else None
        )
        return encoder.to(device, dtype)
    checkpoint = read_unilm_checkpoint(path, _WHAT, WAVLM_ORIGIN)
    config = wavlm_config_from_unilm(checkpoint.cfg, str(path))
    state_dict = wavlm_state_dict_from_unilm(checkpoint.state_dict, str(path))
    from transformers import WavLMModel

    with torch.device("meta"):
        model = WavLMModel(config)
    if (
        "encoder.pos_conv_embed.conv.weight_g" in model.state_dict()
    ):  # transformers without weight-norm parametrizations
        state_dict = {_legacy_weight_norm_key(key): value for key, value in state_dict.items()}
    try:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{_WHAT}: {path} does not match its own cfg ({brief(error)})") from error
    encoder = TransformersSpeechEncoder("wavlm", model, file_identity(path), _normalisation(checkpoint.cfg))
    return encoder.to(device, dtype)


def _legacy_weight_norm_key(key: str) -> str:
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"
    )


def _normalisation(cfg: dict):
    return WAVLM_LAYER_NORM if cfg.get("normalize") else None


def _load_hf_folder(path: Path):
    from transformers import WavLMModel

    from .wav2vec2 import load_transformers_folder

    return load_transformers_folder(WavLMModel, "wavlm", path, _WHAT, WAVLM_ORIGIN)


def _hf_do_normalize(path: Path) -> bool:
    """``do_normalize`` of the folder's ``preprocessor_config.json`` (absent: no normalisation)."""
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return False
    try:
        return bool(json.loads(preprocessor.read_text()).get("do_normalize", False))
    except ValueError as error:
        raise CheckpointError(f"{_WHAT}: {preprocessor} is not valid JSON ({error})") from error
