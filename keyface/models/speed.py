"""Optional speed-ups of the loaded networks (CLI ``--compile`` / ``--channels-last``): off by default, since
both change float rounding (the parity fixtures hold for the default path only).

* ``compile``: ``torch.compile`` on the forward of each UNet and VAE piece. Lazy: a module is compiled the
  first time it runs (and again for each new input shape, e.g. another ``segments_per_call``).
* ``channels_last``: the 2-D convolution weights of the same modules in channels-last memory format, which lets
  cuDNN pick its NHWC kernels (faster with fp16/bf16 on tensor-core GPUs); activations follow the weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .bundle import KeyFaceModels

logger = logging.getLogger(__name__)


def speed_modules(models: KeyFaceModels) -> dict[str, nn.Module]:
    """The modules the options apply to: each stage's UNet and each VAE piece, by a name saying which."""
    found = {
        f"{name}.unet": stage.unet
        for name, stage in models.parts(("keyframe", "interpolation", "autoguidance")).items()
    }
    for name, part in models.parts(("decoder", "keyframe_decoder")).items():
        found[f"{name}.decoder"] = part.decoder
    if models.identity_encoder is not None:
        found["identity_encoder.encoder"] = models.identity_encoder.encoder
    return found


def compile_available() -> bool:
    """Whether ``torch.compile`` can run here (TorchDynamo supports this Python and platform)."""
    dynamo = getattr(torch, "_dynamo", None)
    return hasattr(torch, "compile") and dynamo is not None and dynamo.is_dynamo_supported()


def apply_speed_options(models: KeyFaceModels, *, compile: bool = False, channels_last: bool = False) -> None:
    """Apply the chosen speed options to ``models`` in place (see the module docstring); where ``torch.compile``
    is unavailable, ``compile`` only logs one warning."""
    modules = speed_modules(models)
    if channels_last:
        for module in modules.values():
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    layer.to(memory_format=torch.channels_last)
    if compile:
        if not compile_available():
            logger.warning("torch.compile is not available with this Python / PyTorch; running without --compile")
            return
        for module in modules.values():
            module.compile()
