"""Weight files <-> KeyFace modules, split by responsibility (imports flow top to bottom):

* :mod:`.keymap` — the original engine key names <-> our module names, and the inverse used for writing;
* :mod:`.formats` — reading ``.pt`` / ``.ckpt`` / ``.bin`` / ``.safetensors`` safely (the library's one
  ``torch.load`` wrapper and one safetensors reader);
* :mod:`.infer` — a stage's StageConfig from tensor shapes and the config sources beside a file;
* :mod:`.load` — module loaders (stages, autoguidance network, VAE encoder / frame decoder);
* :mod:`.convert` — writing stage checkpoints and the opt-in ``python -m keyface convert``.

This package re-exports the names the rest of the library and the tests use.
"""

from .convert import convert_any, convert_checkpoint, save_stage_checkpoint
from .formats import (
    CHECKPOINT_SUFFIXES,
    CONFIG_METADATA_KEY,
    CONVERT_COMMAND,
    KEYFACE_WEIGHTS_SOURCE,
    VAE_WEIGHTS_SOURCE,
    Checkpoint,
    read_checkpoint,
    read_safetensors,
    torch_load,
)
from .infer import infer_stage_config, read_stage_config, resolve_stage_config
from .keymap import (
    AUDIO_PROJECTION_KEY,
    DECODER_PREFIX,
    DEEPSPEED_PREFIX,
    LEARNED_MASK_KEY,
    UNET_PREFIX,
    decoder_key,
    official_key_names,
    official_state_dict,
    unet_key,
)
from .load import (
    VAE_WEIGHT_NAMES,
    load_autoguidance_network,
    load_frame_decoder,
    load_identity_encoder,
    load_interpolation_model,
    load_keyframe_model,
)

__all__ = [
    "AUDIO_PROJECTION_KEY",
    "CHECKPOINT_SUFFIXES",
    "CONFIG_METADATA_KEY",
    "CONVERT_COMMAND",
    "DECODER_PREFIX",
    "DEEPSPEED_PREFIX",
    "KEYFACE_WEIGHTS_SOURCE",
    "LEARNED_MASK_KEY",
    "UNET_PREFIX",
    "VAE_WEIGHTS_SOURCE",
    "VAE_WEIGHT_NAMES",
    "Checkpoint",
    "convert_any",
    "convert_checkpoint",
    "decoder_key",
    "infer_stage_config",
    "load_autoguidance_network",
    "load_frame_decoder",
    "load_identity_encoder",
    "load_interpolation_model",
    "load_keyframe_model",
    "official_key_names",
    "official_state_dict",
    "read_checkpoint",
    "read_safetensors",
    "read_stage_config",
    "resolve_stage_config",
    "save_stage_checkpoint",
    "torch_load",
    "unet_key",
]
