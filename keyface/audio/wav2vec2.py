"""wav2vec2 (interpolation audio, docs/audio.md#wav2vec2): ``transformers.Wav2Vec2Model`` from a local Hugging Face
folder.

The original uses ``Wav2Vec2ForCTC.from_pretrained('facebook/wav2vec2-base-960h').wav2vec2`` and its
``last_hidden_state``; the CTC head is never used, so the base model is loaded from the same folder. The
input is normalised over the whole clip (unbiased variance, eps 1e-7), then zero-padded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import file_identity
from .speech_encoder import WAV2VEC2_NORMALISATION, TransformersSpeechEncoder
from .weights import WAV2VEC2_ORIGIN, require_path

_WHAT = "wav2vec2 model folder"


def load_wav2vec2(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load wav2vec2 from a Hugging Face folder (``config.json`` + weights) -> encoder in eval mode."""
    from transformers import Wav2Vec2Model

    path = require_path(path, _WHAT, WAV2VEC2_ORIGIN)
    if not path.is_dir():
        raise CheckpointError(f"{_WHAT}: {path} is a file; pass the folder holding config.json and the weights")
    model = load_transformers_folder(Wav2Vec2Model, "wav2vec2", path, _WHAT, WAV2VEC2_ORIGIN)
    return TransformersSpeechEncoder("wav2vec2", model, file_identity(path), WAV2VEC2_NORMALISATION).to(device, dtype)


def build_wav2vec2(config: dict, identity: str = "random") -> TransformersSpeechEncoder:
    """A wav2vec2 encoder with random weights from a ``config.json`` dict (benchmarks and tests)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**config))
    return TransformersSpeechEncoder("wav2vec2", model, identity, WAV2VEC2_NORMALISATION)


def load_transformers_folder(model_class, model_type: str, path: Path, what: str, origin: str) -> torch.nn.Module:
    """``model_class.from_pretrained(path)`` offline, refusing a folder of another model or with missing weights."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{what}: {path} has no config.json. {origin}.")
    try:
        found_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as error:
        raise CheckpointError(f"{what}: {config_file} is not valid JSON ({error})") from error
    if found_type != model_type:
        raise CheckpointError(f"{what}: {path} holds a {found_type!r} model, expected {model_type!r}. {origin}.")
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars_disabled = transformers_logging.is_progress_bar_enabled() is False
    transformers_logging.set_verbosity_error()  # the CTC head left out of the base model is not worth a warning
    transformers_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{what}: {path} could not be loaded ({error}). {origin}.") from error
    finally:
        transformers_logging.set_verbosity(verbosity)
        if not bars_disabled:
            transformers_logging.enable_progress_bar()
    missing = sorted(key for key in info.get("missing_keys", ()) if "masked_spec_embed" not in key)
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise CheckpointError(
            f"{what}: {path} lacks weights {missing[:8]} or has wrong shapes {mismatched[:4]}. {origin}."
        )
    return model.float().eval()
