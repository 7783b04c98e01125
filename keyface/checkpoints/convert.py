"""Writing stage checkpoints and the opt-in ``python -m keyface convert`` command.

Written files are flat ``.safetensors`` with the original key names and the StageConfig in the metadata,
written through :func:`keyface.files.atomic_write` (temporary file + rename).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import StageConfig
from ..errors import CheckpointError, InputError
from ..files import atomic_write
from .formats import (
    CONFIG_METADATA_KEY,
    KEYFACE_WEIGHTS_SOURCE,
    Checkpoint,
    existing_file,
    original_names,
    read_checkpoint,
    tensors_of,
    torch_load,
)
from .infer import assumed_head_width_note, config_source, resolve_stage_config
from .keymap import UNET_PREFIX, official_state_dict


def _write_stage_file(tensors: dict[str, torch.Tensor], dst: Path, config: StageConfig) -> None:
    """Flat safetensors with ``config`` in the metadata, written atomically (``keyface.files.atomic_write``)."""
    seen: set[int] = set()
    contiguous = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        contiguous[key] = (
            tensor.clone() if storage in seen else tensor.contiguous()
        )  # safetensors refuses shared memory
        seen.add(storage)
    with atomic_write(dst, "checkpoint output", (".safetensors",)) as temp:
        save_file(contiguous, str(temp), metadata={"format": "pt", CONFIG_METADATA_KEY: config.to_json()})


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
    from ..audio.weights import save_unilm_checkpoint

    src = Path(source).expanduser()
    if src.is_dir():
        raise InputError(
            f"{src} is a folder; the Hugging Face folders (wav2vec2-base-960h/, vae/) are used as they are, only "
            "single .pt / .ckpt / .bin checkpoint files are converted"
        )
    src = existing_file(src, KEYFACE_WEIGHTS_SOURCE)
    dst = _safetensors_target(target, "conversion output")
    if src.resolve() == dst.resolve():
        raise InputError(f"conversion output {dst} is the input file itself; choose another name")
    loaded = torch_load(src, allow_pickle=True) if src.suffix.lower() != ".safetensors" else None
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
        checkpoint = Checkpoint(src, original_names(tensors_of(loaded, src)))
    if not any(key.startswith(UNET_PREFIX) for key in checkpoint.tensors):
        raise CheckpointError(
            f"{src} is neither a KeyFace stage checkpoint ('{UNET_PREFIX}*' tensors: keyframe.pt, interpolation.pt, "
            f"interpolation_bad.pt from {KEYFACE_WEIGHTS_SOURCE}) nor an original unilm WavLM / BEATs checkpoint "
            "({'cfg', 'model'}); nothing to convert"
        )
    assumed = config_source(checkpoint) is None
    config = resolve_stage_config(checkpoint)
    _write_stage_file(checkpoint.tensors, dst, config)
    summary = (
        f"wrote {dst}: {config.kind} stage, {len(checkpoint.tensors)} tensors (original names, config in the metadata)"
    )
    return f"{summary}. NOTE: {assumed_head_width_note(src)}" if assumed else summary
