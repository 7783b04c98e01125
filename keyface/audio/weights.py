"""Reading the audio encoders' weight files.

WavLM and BEATs come as the original unilm files: ``torch.save({'cfg': dict, 'model': state_dict})`` (.pt),
read with ``torch.load(weights_only=True)`` only. They may also be stored as safetensors holding the same
state dict (unilm key names). A safetensors file carries no pickle, so its ``cfg`` is looked up, in order:

1. the file's metadata entry ``"cfg"`` (JSON text) - what ``python -m keyface convert`` writes;
2. a JSON file beside it: ``NAME.json`` for ``NAME.safetensors`` (also ``BASE.json`` for ``BASE.model.safetensors``);
3. the original ``.pt`` beside it (``NAME.pt`` or ``BASE.pt``), whose ``cfg`` entry is read.

wav2vec2 (and WavLM in the Hugging Face layout) are folders with ``config.json`` and weights, loaded
locally by transformers (see ``keyface.audio.wavlm`` and ``keyface.audio.wav2vec2``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoints.formats import read_safetensors, torch_load
from ..errors import CheckpointError, MissingWeightsError
from ..files import atomic_write

WAVLM_FILE = "WavLM-Base+.pt"
BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
WAV2VEC2_FOLDER = "wav2vec2-base-960h"
WAVLM_HF_FOLDER = "wavlm-base-plus"  # the Hugging Face microsoft/wavlm-base-plus layout

WAVLM_ORIGIN = (
    "WavLM Base+ comes from the Microsoft unilm WavLM release (file WavLM-Base+.pt); the KeyFace release "
    "expects it in its checkpoints folder next to keyframe.pt. The Hugging Face folder microsoft/wavlm-base-plus "
    "(config.json + weights) works too"
)
BEATS_ORIGIN = (
    "BEATs comes from the Microsoft unilm BEATs release (file BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt); "
    "the KeyFace release expects it in its checkpoints folder next to keyframe.pt"
)
WAV2VEC2_ORIGIN = (
    "wav2vec2 is the Hugging Face model facebook/wav2vec2-base-960h: download that repository as a folder "
    "(config.json + model.safetensors or pytorch_model.bin) and pass the folder"
)

_CFG_METADATA_KEY = "cfg"
# Where a damaged unilm file (WavLM or BEATs .pt) is downloaded again.
_UNILM_SOURCE = "the Microsoft unilm release"


@dataclass(frozen=True)
class UnilmCheckpoint:
    """An original unilm encoder checkpoint: its config dict and its state dict (unilm key names)."""

    cfg: dict
    state_dict: dict[str, torch.Tensor]
    path: Path


def require_path(path: str | os.PathLike, what: str, origin: str) -> Path:
    """Return ``path`` as a Path, or raise :class:`MissingWeightsError` naming it and where it comes from."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"{what} not found: looked for {path}. {origin}.")
    return path


def read_unilm_checkpoint(path: str | os.PathLike, what: str, origin: str) -> UnilmCheckpoint:
    """Read a unilm ``{'cfg', 'model'}`` .pt file or a safetensors copy of its state dict (module doc)."""
    path = require_path(path, what, origin)
    if path.is_dir():
        raise CheckpointError(f"{what}: {path} is a folder; pass the checkpoint file itself (.pt or .safetensors)")
    if path.suffix == ".safetensors":
        state_dict, _ = read_safetensors(path, what=what, source=_UNILM_SOURCE)
        return UnilmCheckpoint(_find_cfg_for_safetensors(path, what, origin), state_dict, path)
    checkpoint = torch_load(path, what=what, source=_UNILM_SOURCE)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("cfg"), dict) or "model" not in checkpoint:
        raise CheckpointError(
            f"{what}: {path} is not an original unilm checkpoint (expected a dict with 'cfg' and 'model'). {origin}."
        )
    return UnilmCheckpoint(dict(checkpoint["cfg"]), _tensor_dict(checkpoint["model"], path, what), path)


def save_unilm_checkpoint(target: str | os.PathLike, cfg: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a unilm-named state dict through :func:`keyface.files.atomic_write`; returns the path written.

    ``.safetensors``: the tensors with ``cfg`` (JSON) in the metadata, read without the original .pt.
    ``.pt``: the released layout itself, ``{'cfg': cfg, 'model': state dict}``, which ``weights_only`` loading reads.
    """
    target = Path(target)
    # cloned: tied tensors (BEATs' shared position-bias table) share storage, which safetensors refuses
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state_dict.items()}
    with atomic_write(target, "audio encoder output") as temp:
        if target.suffix == ".safetensors":
            save_file(tensors, str(temp), metadata={_CFG_METADATA_KEY: json.dumps(cfg)})
        else:
            torch.save({"cfg": dict(cfg), "model": tensors}, temp)
    return target


def _find_cfg_for_safetensors(path: Path, what: str, origin: str) -> dict:
    _, metadata = read_safetensors(path, (), what=what, source=_UNILM_SOURCE)
    if _CFG_METADATA_KEY in metadata:
        return _parse_cfg_json(metadata[_CFG_METADATA_KEY], f"{path} (metadata '{_CFG_METADATA_KEY}')", what)
    stems = [path.name[: -len(".safetensors")]]
    if stems[0].endswith(".model"):
        stems.append(stems[0][: -len(".model")])
    for stem in stems:
        sidecar = path.with_name(stem + ".json")
        if sidecar.is_file():
            return _parse_cfg_json(sidecar.read_text(), str(sidecar), what)
    for stem in stems:
        original = path.with_name(stem + ".pt")
        if original.is_file():
            checkpoint = torch_load(original, what=what, source=_UNILM_SOURCE)
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("cfg"), dict):
                return dict(checkpoint["cfg"])
    raise CheckpointError(
        f"{what}: {path} holds weights but no config. Store the original cfg dict as JSON in the file's metadata "
        f"key '{_CFG_METADATA_KEY}' (python -m keyface convert does this), or beside it as "
        f"{path.with_name(stems[-1] + '.json')}, or put the original {stems[-1]}.pt beside it"
    )


def _parse_cfg_json(text: str, where: str, what: str) -> dict:
    try:
        cfg = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{what}: the config in {where} is not valid JSON ({error})") from error
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{what}: the config in {where} must be a JSON object")
    return cfg


def _tensor_dict(state_dict, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{what}: {path}: 'model' must be a state dict of tensors")
    return dict(state_dict)
