"""The evaluation networks' weight files: where they are looked for, how they are read, what is missing.

Every file lives in one folder, ``models/keyface/eval/`` by default (ComfyUI: ``ComfyUI/models/keyface/eval``),
and is never downloaded at run time. Files are read with the library's safe readers only
(:func:`keyface.checkpoints.formats.torch_load`, ``weights_only=True``, or
:func:`~keyface.checkpoints.formats.read_safetensors`); a ``.safetensors`` copy next to the original name
(same stem) is preferred when both exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, MissingWeightsError

if TYPE_CHECKING:
    import torch

DEFAULT_EVAL_FOLDER = Path("models/keyface/eval")


@dataclass(frozen=True)
class EvalWeights:
    """One evaluation network's file: its name in the folder, what it is, where users get it."""

    file: str
    what: str
    origin: str

    def path_in(self, folder: str | os.PathLike) -> Path:
        """The file to read in ``folder``: ``<stem>.safetensors`` when present, else ``file`` itself."""
        folder = Path(folder).expanduser()
        converted = folder / (Path(self.file).stem + ".safetensors")
        return converted if converted.is_file() else folder / self.file

    def missing_message(self, folder: str | os.PathLike) -> str:
        return f"{self.what} weights not found: looked for {Path(folder).expanduser() / self.file}; {self.origin}"


ARCFACE_WEIGHTS = EvalWeights(
    file="arcface_r50.pth",
    what="ArcFace identity network (iresnet50)",
    origin=(
        "it is the backbone.pth of insightface's arcface_torch model zoo (ms1mv3_arcface_r50_fp16), saved as "
        "arcface_r50.pth"
    ),
)
SYNCNET_WEIGHTS = EvalWeights(
    file="syncnet_v2.model",
    what="SyncNet (syncnet_v2)",
    origin="it comes from the SyncNet authors' release (VGG, joonson/syncnet_python, data/syncnet_v2.model)",
)


def load_state_dict(weights: EvalWeights, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` in ``folder``; MissingWeightsError / CheckpointError as one line."""
    from ..checkpoints.formats import read_safetensors, tensors_of, torch_load

    path = weights.path_in(folder)
    if not path.exists():
        raise MissingWeightsError(weights.missing_message(folder))
    if not path.is_file():
        raise CheckpointError(f"{weights.what}: {path} is not a file; {weights.origin}")
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path, what=weights.what, source=weights.origin)
        return tensors
    return tensors_of(torch_load(path, what=weights.what, source=weights.origin), path)


def config_of(read_config, state: dict[str, torch.Tensor], weights: EvalWeights, folder: str | os.PathLike):
    """``read_config(state)`` (a network size read from key names and shapes), or one CheckpointError line
    when the file holds another network."""
    try:
        return read_config(state)
    except (KeyError, ValueError, IndexError):
        raise CheckpointError(
            f"{weights.what}: {weights.path_in(folder)} holds another network (its keys are not the expected "
            f"layout); {weights.origin}"
        ) from None


def load_network(weights: EvalWeights, folder: str | os.PathLike, read_config, build, prepare=None):
    r"""The network of ``weights`` in ``folder``: its tensors (``prepare``\ d), its size read from them
    (``read_config``), ``build(config)`` filled with them (float32). Every problem is one line."""
    state = load_state_dict(weights, folder)
    if prepare is not None:
        state = prepare(state)
    config = config_of(read_config, state, weights, folder)
    network = build(config)
    load_into(network, state, weights, folder)
    return network


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], weights: EvalWeights, folder) -> None:
    """``state`` into ``module`` as float32 through the library's one strict loader
    (:func:`keyface.checkpoints.load.load_tensors_into`)."""
    from ..checkpoints.load import load_tensors_into

    # Files saved by PyTorch < 0.4 (syncnet_v2.model) have no BatchNorm step counters; eval mode ignores them.
    load_tensors_into(
        module,
        {key: value.float() for key, value in state.items()},
        weights.path_in(folder),
        [],
        expected=f"expected the {weights.what}; {weights.origin}",
        optional=("num_batches_tracked",),
    )
