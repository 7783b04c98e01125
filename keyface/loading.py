"""The KeyFace model folder: which files are needed, where they are looked for, and loading them.

Layout (the official release's ``pretrained_models/checkpoints`` folder works as is)::

    <models folder>/keyframe.safetensors         (or .pt / .ckpt)   stage 1
    <models folder>/interpolation.safetensors    (or .pt / .ckpt)   stage 2
    <models folder>/interpolation_bad.safetensors (or .pt / .ckpt)  stage 2 autoguidance ("bad") network
    <models folder>/vae/                          SVD VAE, diffusers layout (config.json + weights), for images
    <models folder>/audio/                        WavLM-Base+.pt, BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt,
                                                  wav2vec2-base-960h/   (or these three next to keyframe.pt)

A missing file raises :class:`~keyface.errors.MissingWeightsError` naming the file, the folder searched and
where the file comes from. Nothing is downloaded unless the user runs ``python -m keyface download``
(:mod:`keyface.download`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .checkpoints import KEYFACE_WEIGHTS_SOURCE, VAE_WEIGHTS_SOURCE
from .errors import InputError, MissingWeightsError
from .files import ModelFiles, file_identity

ENGINE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
STAGE_FILE_STEMS = {"keyframe": "keyframe", "interpolation": "interpolation", "autoguidance": "interpolation_bad"}
VAE_FOLDER = "vae"
AUDIO_FOLDER = "audio"
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def download_hint(folder: Path) -> str:
    """The command that fetches the missing files of ``folder`` (never run without the user)."""
    return f"python -m keyface download --models {folder}"


def find_stage_file(folder: Path, role: str) -> Path:
    """``<folder>/<stem>.safetensors|.pt|.ckpt`` for ``role`` in keyframe / interpolation / autoguidance."""
    stem = STAGE_FILE_STEMS[role]
    for suffix in ENGINE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    names = " or ".join(stem + suffix for suffix in ENGINE_SUFFIXES)
    raise MissingWeightsError(
        f"the {role} model is missing: looked for {names} in {folder}. Download {stem}.pt from "
        f"{KEYFACE_WEIGHTS_SOURCE} into that folder (`python -m keyface convert` turns it into the recommended "
        f".safetensors), or let `{download_hint(folder)}` fetch every missing file"
    )


def find_model_files(folder: str | os.PathLike, *, autoguidance: bool = True) -> ModelFiles:
    """The weight files in a models folder (see the module docstring for the layout)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingWeightsError(
            f"models folder {folder} does not exist; create it and put the KeyFace weights from "
            f"{KEYFACE_WEIGHTS_SOURCE} in it (see README: 'Weights'), or let `{download_hint(folder)}` fetch them"
        )
    vae = folder / VAE_FOLDER
    if not vae.is_dir():
        raise MissingWeightsError(
            f"the SVD VAE is missing: looked for the folder {vae} (config.json + diffusion_pytorch_model.safetensors); "
            f"download it from {VAE_WEIGHTS_SOURCE}, or let `{download_hint(folder)}` fetch it"
        )
    audio = folder / AUDIO_FOLDER if (folder / AUDIO_FOLDER).is_dir() else folder
    return ModelFiles(
        keyframe=find_stage_file(folder, "keyframe"),
        interpolation=find_stage_file(folder, "interpolation"),
        autoguidance=find_stage_file(folder, "autoguidance") if autoguidance else None,
        vae=vae,
        audio=audio,
    )


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; or the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in DEVICES[1:]:
        raise InputError(f"device must be one of {', '.join(DEVICES)} (optionally cuda:N), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} was asked for but CUDA is not available here; use device 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Network precision: ``"auto"`` -> bf16 on CUDA GPUs with native bf16 (Ampere and later), fp16 on other
    GPUs, fp32 on CPU (emulated bf16 on older GPUs is far slower than fp16).

    The sampler arithmetic and the VAE always run in fp32 whatever this says.
    """
    if precision == "auto":
        if device.type == "cuda":
            with torch.cuda.device(device):
                native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if precision not in _DTYPES:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    warn_slow_precision(_DTYPES[precision], device)
    return _DTYPES[precision]


def warn_slow_precision(dtype: torch.dtype, device: torch.device) -> None:
    """Warn (one line) when half-precision networks would run on the CPU, which has no fast kernels for them."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        name = next(key for key, value in _DTYPES.items() if value == dtype)
        warnings.warn(
            f"precision {name} on the CPU is about 60x slower than fp32: choose precision auto or fp32 "
            "(half precision only pays off on a GPU)",
            stacklevel=3,
        )


def load_models(files: ModelFiles, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load both stages, the autoguidance network and the VAE parts onto ``device``.

    The networks are cast to ``dtype``; the VAE encoder and decoders stay float32 (docs/models.md#vae;
    docs/sampler.md#precision).
    """
    from .checkpoints import (
        load_autoguidance_network,
        load_frame_decoder,
        load_identity_encoder,
        load_interpolation_model,
        load_keyframe_model,
    )
    from .models.bundle import KeyFaceModels

    return KeyFaceModels(
        keyframe=load_keyframe_model(files.keyframe, device=device, dtype=dtype),
        interpolation=load_interpolation_model(files.interpolation, device=device, dtype=dtype),
        autoguidance=(
            None
            if files.autoguidance is None
            else load_autoguidance_network(files.autoguidance, device=device, dtype=dtype)
        ),
        decoder=load_frame_decoder(files.interpolation, device=device),
        keyframe_decoder=load_frame_decoder(files.keyframe, device=device),
        identity_encoder=load_identity_encoder(files.vae, device=device),
        files={
            role: file_identity(path)
            for role, path in (
                ("keyframe", files.keyframe),
                ("interpolation", files.interpolation),
                ("autoguidance", files.autoguidance),
            )
            if path is not None
        },
        sources=files,
    )
