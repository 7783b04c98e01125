"""KeyFace networks on diffusers building blocks.

* :class:`KeyFaceUNet` (``unet``): the SVD spatio-temporal UNet with per-frame label embedding.
* :class:`KeyframeModel`, :class:`InterpolationModel`, :class:`InterpolationNetwork` (``stages``): the two
  stages with their audio projection, learned mask and v-scaling denoiser.
* conditioning containers and helpers (``conditioning``).
* :class:`IdentityEncoder`, :class:`FrameDecoder` (``vae``): the SVD VAE pieces.

Names are imported lazily so that ``import keyface.models`` does not load diffusers until a class is used.
"""

from importlib import import_module

_EXPORTS = {
    "KeyFaceUNet": "unet",
    "AudioProjection": "conditioning",
    "InterpolationConditioning": "conditioning",
    "KeyframeConditioning": "conditioning",
    "InterpolationModel": "stages",
    "InterpolationNetwork": "stages",
    "KeyframeModel": "stages",
    "VScalings": "stages",
    "FrameDecoder": "vae",
    "IdentityEncoder": "vae",
    "preprocess_image": "vae",
    "to_pixels": "vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
