"""Reading weight files safely: THE one ``torch.load`` wrapper and THE one safetensors reader of the library.

Accepted engine checkpoints (keyframe, interpolation, interpolation_bad):

* ``.pt`` — DeepSpeed/Lightning model states ``{'module': {'_forward_module.' + key: tensor}, ...}``; other
  top-level entries are ignored;
* ``.ckpt`` — ``{'state_dict': {...}}``; ``.bin`` — a flat state dict;
* ``.safetensors`` — flat, original key names (what ``convert`` and ``save_stage_checkpoint`` write too, with
  the stage config in the metadata).

Pickle files are read with ``torch.load(..., weights_only=True)`` only. A file the safe loader refuses
(``pickle.UnpicklingError``: it holds Python objects besides tensors) must be converted once with
``python -m keyface convert IN OUT.safetensors``, the only caller that may fall back to a full unpickle
(:func:`torch_load` with ``allow_pickle=True``), after a warning, because the user asked for it.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import StageKind
from ..errors import CheckpointError, MissingWeightsError
from .keymap import DEEPSPEED_PREFIX, LEARNED_MASK_KEY, UNET_PREFIX

KEYFACE_WEIGHTS_SOURCE = "the Hugging Face repo toninio19/keyface"
VAE_WEIGHTS_SOURCE = "the Hugging Face repo stabilityai/stable-video-diffusion-img2vid (subfolder 'vae')"
CONVERT_COMMAND = "python -m keyface convert IN OUT.safetensors"
CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".bin", ".safetensors")
# Safetensors metadata entry holding the StageConfig JSON (written by convert_checkpoint).
CONFIG_METADATA_KEY = "keyface_config"


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


def existing_file(path: str | Path, source: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"weight file {path} not found; download it from {source}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; expected a weight file from {source}")
    return path


def _damaged(path: Path, kind: str, exc: BaseException, what: str | None, source: str) -> CheckpointError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{_named(path, what)} cannot be read as a {kind} file ({reason}); it is truncated, damaged or not a "
        f"checkpoint - download it again from {source}"
    )


def _named(path: Path, what: str | None) -> str:
    return f"{what}: {path}" if what else str(path)


def _starts_as_pickle(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(1) == pickle.PROTO  # torch's legacy (non-zip) format: a pickle of protocol 2


def torch_load(
    path: Path, *, allow_pickle: bool = False, what: str | None = None, source: str = KEYFACE_WEIGHTS_SOURCE
) -> Any:
    """THE ``torch.load`` of the library: ``weights_only=True``, every failure a one-line CheckpointError.

    The weights-only unpickler raises ``pickle.UnpicklingError`` for a file holding objects it refuses (decided
    by the exception type, not its text, which changes between torch versions); anything else is a damaged
    file. ``allow_pickle`` (the convert command only) then unpickles in full, after a one-line warning.
    ``what`` names the file in messages (e.g. ``"WavLM"``), ``source`` is where to download it again.
    """
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not mmap and not _starts_as_pickle(path):  # neither torch's zip nor a pickle: text, garbage
            raise _damaged(path, "PyTorch checkpoint", exc, what, source) from None
        if not allow_pickle:
            raise CheckpointError(
                f"{_named(path, what)} holds objects the safe loader refuses (torch.load with weights_only=True); "
                f"if you trust it, run python -m keyface convert {path} {path.with_suffix('.safetensors')} "
                "once and use the .safetensors file"
            ) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... for damaged files
        raise _damaged(path, "PyTorch checkpoint", exc, what, source) from None
    print(
        f"WARNING: {path} holds objects the safe loader refuses; unpickling it in full because you asked for a "
        "conversion (unpickling can run code: convert only files from a source you trust)",
        file=sys.stderr,
        flush=True,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise _damaged(path, "PyTorch checkpoint", exc, what, source) from None


def tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
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


def read_safetensors(
    path: Path,
    prefixes: tuple[str, ...] | None = None,
    *,
    what: str | None = None,
    source: str = KEYFACE_WEIGHTS_SOURCE,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """THE safetensors reader of the library: ``(tensors, metadata)`` of a file, only the keys starting with
    one of ``prefixes`` when given; a damaged file is a one-line CheckpointError (``what``/``source`` as for
    :func:`torch_load`)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {
                key: handle.get_tensor(key) for key in handle.keys() if prefixes is None or key.startswith(prefixes)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, "safetensors", exc, what, source) from None
    return tensors, metadata


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Read a weight file (``.pt``, ``.ckpt``, ``.bin``, ``.safetensors``) without building any module.

    ``allow_pickle`` is for :func:`convert_checkpoint` only (see the module docstring).
    """
    path = existing_file(path, KEYFACE_WEIGHTS_SOURCE)
    suffix = path.suffix.lower()
    stored_config = None
    if suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        stored_config = metadata.get(CONFIG_METADATA_KEY)
    elif suffix in CHECKPOINT_SUFFIXES:
        tensors = tensors_of(torch_load(path, allow_pickle=allow_pickle), path)
    else:
        raise CheckpointError(
            f"{path} has the unsupported file type {suffix or '(none)'!r}; expected a KeyFace checkpoint "
            f"({', '.join(CHECKPOINT_SUFFIXES)}) from {KEYFACE_WEIGHTS_SOURCE}"
        )
    return Checkpoint(path, original_names(tensors), stored_config)


def original_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine keys without the DeepSpeed/Lightning ``_forward_module.`` prefix."""
    return {key.replace(DEEPSPEED_PREFIX, ""): tensor for key, tensor in tensors.items()}
