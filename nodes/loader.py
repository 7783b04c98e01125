"""KeyFace Model Loader: the weight files chosen from ComfyUI's model folders -> ``KEYFACE_MODEL``.

Folder layout (see :mod:`keyface.loading`; ComfyUI folder names in :mod:`.host`)::

    models/keyface/keyframe.safetensors | .pt | .ckpt        stage 1
    models/keyface/interpolation.safetensors | .pt | .ckpt   stage 2
    models/keyface/interpolation_bad.safetensors | ...       stage 2 autoguidance network (optional)
    models/keyface/vae/                                      SVD VAE (diffusers folder), turns images into latents
    models/keyface/audio/                                    WavLM-Base+.pt, BEATs_...pt, wav2vec2-base-960h/

Nothing is downloaded: a missing file is reported with the folders searched and where to get it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from comfy_api.v0_0_2 import io

from keyface.errors import InputError, KeyFaceError, MissingWeightsError

from . import host
from .common import CATEGORY, check_widgets, node_function
from .handles import MODEL, ModelBundle, managed_feature_extractor

logger = logging.getLogger(__name__)

NO_AUTOGUIDANCE = "none"
DEVICES = ("auto", "cpu", "cuda")
# Sub-folders of the models folder that hold the VAE and the audio encoders, not stage checkpoints.
RESERVED_FOLDERS = ("audio", "vae")
DEFAULT_VAE = "vae"
AUDIO_ROLES = ("wavlm", "beats", "wav2vec2")
# Loaded models kept across executions (one set: the networks are large), keyed by file identities + dtype.
_loaded: dict[tuple, object] = {}
# The last bundle handed out (reused while models, devices and audio encoders stay the same).
_bundle: list[tuple[ModelBundle, tuple]] = []


# ------------------------------------------------------------------------------------------------ file lists


def _relative(root: Path, path: Path) -> str:
    return PurePosixPath(path.relative_to(root)).as_posix()


def stage_files() -> list[str]:
    """Stage checkpoints anywhere under the models folders (``audio/`` and ``vae/`` excepted)."""
    from keyface.loading import ENGINE_SUFFIXES

    found = set()
    for root in host.model_roots():
        for folder, subfolders, files in os.walk(root, followlinks=True):
            if Path(folder) == root:
                subfolders[:] = [name for name in subfolders if name not in RESERVED_FOLDERS]
            found.update(_relative(root, Path(folder) / name) for name in files if name.endswith(ENGINE_SUFFIXES))
    return sorted(found)


def default_stage_file(role: str, files: list[str]) -> str:
    """The release name of ``role``'s checkpoint, the first extension present (safetensors preferred)."""
    from keyface.loading import ENGINE_SUFFIXES, STAGE_FILE_STEMS

    names = [STAGE_FILE_STEMS[role] + suffix for suffix in ENGINE_SUFFIXES]
    return next((name for name in names if name in files), names[0])


def vae_choices() -> list[str]:
    """Folders under the models folders that hold a diffusers VAE (``vae`` in the release layout)."""
    from keyface.checkpoints import VAE_WEIGHT_NAMES

    found = {DEFAULT_VAE}
    for root in host.model_roots():
        for folder, _, files in os.walk(root, followlinks=True):
            if any(name in files for name in VAE_WEIGHT_NAMES) and Path(folder) != root:
                found.add(_relative(root, Path(folder)))
    return sorted(found)


def _audio_defaults() -> dict[str, str]:
    from keyface.audio.weights import BEATS_FILE, WAV2VEC2_FOLDER, WAVLM_FILE

    return {"wavlm": WAVLM_FILE, "beats": BEATS_FILE, "wav2vec2": WAV2VEC2_FOLDER}


def audio_choices(role: str) -> list[str]:
    """Files and folders in the audio-encoder folders whose name mentions ``role``, plus the release name."""
    found = {_audio_defaults()[role]}
    for root in host.audio_model_roots():
        if root.is_dir():
            found.update(
                entry.name
                for entry in root.iterdir()
                if role in entry.name.lower() and (entry.is_dir() or entry.suffix in host.MODEL_EXTENSIONS)
            )
    return sorted(found)


# ------------------------------------------------------------------------------------------------ resolving


def _source(kind: str) -> str:
    from keyface.audio.weights import BEATS_ORIGIN, WAV2VEC2_ORIGIN, WAVLM_ORIGIN
    from keyface.checkpoints import KEYFACE_WEIGHTS_SOURCE, VAE_WEIGHTS_SOURCE

    return {
        "stage": f"Download it from {KEYFACE_WEIGHTS_SOURCE} (`python -m keyface convert` turns a .pt into the "
        "recommended .safetensors)",
        "vae": f"Download the folder from {VAE_WEIGHTS_SOURCE}",
        "wavlm": WAVLM_ORIGIN,
        "beats": BEATS_ORIGIN,
        "wav2vec2": WAV2VEC2_ORIGIN,
    }[kind]


def _model_kind(input_name: str) -> str:
    return input_name if input_name in AUDIO_ROLES else ("vae" if input_name == "vae" else "stage")


def _present_alternatives(input_name: str, name: str) -> list[str]:
    """Files beside the missing ``name`` with its stem, e.g. keyframe.pt for a missing keyframe.safetensors."""
    relative = PurePosixPath(str(name).replace("\\", "/"))
    roots = host.audio_model_roots() if _model_kind(input_name) in AUDIO_ROLES else host.model_roots()
    return sorted({p.name for root in roots for p in (root / relative).parent.glob(f"{relative.stem}.*")})


def resolve_model_file(input_name: str, name: str) -> Path:
    """The file or folder a model combo names, searched in the folders of its kind (never outside them)."""
    kind = _model_kind(input_name)
    relative = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name).strip() or relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{input_name}: {name!r} is not a file name inside the KeyFace models folder")
    roots = host.audio_model_roots() if kind in AUDIO_ROLES else host.model_roots()
    for root in roots:
        if (root / relative).exists():
            return root / relative
    searched = ", ".join(str(root) for root in roots)
    siblings = _present_alternatives(input_name, name)
    if siblings:  # e.g. a shared workflow names keyframe.safetensors, the official download is keyframe.pt
        raise MissingWeightsError(
            f"{input_name}: {name} was not found (searched {searched}), but {', '.join(siblings)} is there: "
            f"choose it in the {input_name} list"
        )
    from keyface.loading import download_hint

    raise MissingWeightsError(
        f"{input_name}: {name} was not found (searched {searched}). {_source(kind)}; put it into {roots[0]}. "
        f"Or run `{download_hint(host.model_roots()[0])}` in the KeyFace pack's folder: it fetches every missing file."
    )


def missing_model_files(names: dict[str, str]) -> KeyFaceError | None:
    """The error for the model combos (input name -> chosen name) whose files are missing, or None.

    One missing file gets its full message (where it was looked for, where it comes from); several get one
    short message listing them with the download command, so a fresh install does not print seven paragraphs.
    """
    problems: list[tuple[str, KeyFaceError]] = []
    for input_name, name in names.items():
        if input_name == "autoguidance" and name == NO_AUTOGUIDANCE:
            continue
        try:
            resolve_model_file(input_name, name)
        except MissingWeightsError as error:
            present = _present_alternatives(input_name, name)
            label = name + (f" ({', '.join(present)} is there: choose it in {input_name})" if present else "")
            problems.append((label, error))
        except InputError as error:
            problems.append((str(error), error))
    if len(problems) <= 1:
        return problems[0][1] if problems else None
    from keyface.download import KEYFACE_REPO, VAE_REPO
    from keyface.loading import download_hint

    root = host.model_roots()[0]
    return MissingWeightsError(
        f"{len(problems)} model files are missing from {root}: {', '.join(label for label, _ in problems)}. "
        f"Run `{download_hint(root)}` in the KeyFace pack's folder to fetch them (stages: {KEYFACE_REPO}, "
        f"VAE: {VAE_REPO}, audio encoders: README 'Weights')"
    )


class KeyFaceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.loading import ENGINE_SUFFIXES, PRECISIONS, STAGE_FILE_STEMS

        files = stage_files()
        defaults = {role: default_stage_file(role, files) for role in STAGE_FILE_STEMS}
        # The release names (.safetensors, as the example workflows store them) are listed even when missing, so
        # shared workflows pass ComfyUI's list check and the loader says which file is missing and where to get it.
        release_names = {stem + ENGINE_SUFFIXES[0] for stem in STAGE_FILE_STEMS.values()}
        choices = sorted({*files, *defaults.values(), *release_names})

        def stage(role: str, tooltip: str) -> io.Combo.Input:
            return io.Combo.Input(role, options=choices, default=defaults[role], tooltip=tooltip)

        audio = [
            io.Combo.Input(role, options=audio_choices(role), default=_audio_defaults()[role], tooltip=tooltip)
            for role, tooltip in (
                ("wavlm", "WavLM Base+ speech encoder (keyframe-stage audio features), from models/keyface/audio."),
                ("beats", "BEATs audio encoder (both stages), from models/keyface/audio."),
                ("wav2vec2", "wav2vec2-base-960h folder (stage 2 audio features), from models/keyface/audio."),
            )
        ]
        return io.Schema(
            node_id="KeyFaceModelLoader",
            display_name="KeyFace Model Loader",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads the KeyFace networks (keyframe stage, interpolation stage, optional autoguidance network), "
                "the SVD VAE and the three audio encoders from ComfyUI's models/keyface folder. Loaded models are "
                "kept between runs; changing only the device moves them instead of reading the files again."
            ),
            inputs=[
                stage("keyframe", "Stage 1 checkpoint (keyframe.pt or its .safetensors conversion)."),
                stage(
                    "interpolation",
                    "Stage 2 checkpoint (interpolation.pt / .safetensors); its VAE decoder makes the output frames.",
                ),
                io.Combo.Input(
                    "autoguidance",
                    options=[NO_AUTOGUIDANCE, *choices],
                    default=defaults["autoguidance"],
                    tooltip="Stage 2 autoguidance ('bad') network, interpolation_bad.pt. 'none' runs the "
                    "interpolation without autoguidance (faster, less sharp).",
                ),
                io.Combo.Input(
                    "vae",
                    options=vae_choices(),
                    default=DEFAULT_VAE,
                    tooltip="Folder of the SVD VAE (diffusers layout: "
                    "config.json + diffusion_pytorch_model.safetensors); it turns the portrait and edited "
                    "keyframes into latents.",
                ),
                *audio,
                io.Combo.Input(
                    "device",
                    options=list(DEVICES),
                    default="auto",
                    tooltip="Where the networks run. auto: ComfyUI's "
                    "device (the GPU unless ComfyUI was started with --cpu).",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="Network precision. auto: what ComfyUI chooses for the device and its "
                    "flags (--force-fp16, --bf16-unet, --fp32-unet, ...): bf16 on GPUs that support it, else "
                    "fp16; fp32 on the CPU. The VAE always runs in fp32.",
                ),
            ],
            outputs=[
                MODEL.Output(
                    display_name="model",
                    tooltip="The loaded KeyFace models: connect to Load Audio and Keyframe Sampler.",
                )
            ],
        )

    @classmethod
    @node_function()
    def execute(
        cls, keyframe, interpolation, autoguidance, vae, wavlm, beats, wav2vec2, device="auto", precision="auto"
    ):
        check_widgets(cls, {"device": device, "precision": precision})
        names = {
            "keyframe": keyframe,
            "interpolation": interpolation,
            "autoguidance": autoguidance,
            "vae": vae,
            "wavlm": wavlm,
            "beats": beats,
            "wav2vec2": wav2vec2,
        }
        if problem := missing_model_files(names):
            raise problem
        paths = {
            "keyframe": resolve_model_file("keyframe", keyframe),
            "interpolation": resolve_model_file("interpolation", interpolation),
            "autoguidance": (
                None if autoguidance == NO_AUTOGUIDANCE else resolve_model_file("autoguidance", autoguidance)
            ),
            "vae": resolve_model_file("vae", vae),
        }
        audio = {
            role: resolve_model_file(role, name)
            for role, name in (("wavlm", wavlm), ("beats", beats), ("wav2vec2", wav2vec2))
        }
        torch_device = host.torch_device(device)
        dtype = host.network_dtype(precision, torch_device)  # resolved: the cache key never holds "auto"
        resting = host.offload_device(torch_device)
        models = _load_networks(paths, audio["wavlm"].parent, resting, dtype)
        return io.NodeOutput(_bundle_for(models, audio, torch_device, resting, dtype))


def _bundle_for(models, audio: dict, device, resting, dtype) -> ModelBundle:
    """The bundle of ``models`` on these devices with these audio encoders: the previous one when nothing
    changed (ComfyUI then still knows its ModelPatchers as loaded), else a new one, the previous released."""
    sources = (audio, host.manages_models())
    previous, previous_sources = _bundle[0] if _bundle else (None, None)
    same = previous is not None and previous.models is models and previous_sources == sources
    if same and (previous.device, previous.offload_device, previous.dtype) == (device, resting, dtype):
        return previous
    if previous is not None:
        previous.release()
    if host.manages_models():
        extractor = managed_feature_extractor(audio, device, resting)
    else:
        from keyface.audio.features import AudioFeatureExtractor

        extractor = AudioFeatureExtractor(**audio, device=device)
    bundle = ModelBundle(models, extractor, device, resting, dtype)
    bundle.move_to(resting)  # cached models may wait on another device
    _bundle[:] = [(bundle, sources)]
    return bundle


def _load_networks(paths: dict, audio_folder: Path, device, dtype):
    """The KeyFaceModels of ``paths``: from the cache when the same files and dtype were loaded before (on
    whatever device they were left), else read from disk onto ``device`` (replacing the cached set)."""
    from keyface.files import file_identity
    from keyface.loading import ModelFiles, load_models

    key = (tuple((role, None if path is None else file_identity(path)) for role, path in paths.items()), str(dtype))
    models = _loaded.get(key)
    if models is None:
        if device.type != "cpu":
            host.free_memory(sum(p.stat().st_size for p in paths.values() if p is not None and p.is_file()), device)
        logger.info("KeyFace: loading %s on %s (%s)", ", ".join(p.name for p in paths.values() if p), device, dtype)
        models = load_models(ModelFiles(audio=audio_folder, **paths), device, dtype)
        _loaded.clear()  # only now: a file that fails to load leaves the good cached set in place
        _loaded[key] = models
    return models
