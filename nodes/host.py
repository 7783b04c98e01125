"""The one place that talks to ComfyUI: folders, progress and Cancel, devices and memory, output paths, upscaling.

Inside ComfyUI each function uses ComfyUI's own modules (``folder_paths``, ``comfy.utils``,
``comfy.model_management``, ``comfy_extras.nodes_upscale_model``), imported on first use. Without ComfyUI (tests,
scripts) they fall back to plain behaviour: folders from :func:`configure` or the environment variables
``KEYFACE_MODELS_DIR`` / ``KEYFACE_INPUT_DIR`` / ``KEYFACE_OUTPUT_DIR`` (default ``models/keyface``, ``input`` and
``output`` under the working folder), a silent progress bar, no Cancel, no offloading.

Model management: inside ComfyUI every KeyFace part (each network, the VAE pieces, each audio encoder) is a
``comfy.model_patcher.ModelPatcher`` (:func:`model_patcher`) and each pipeline step asks
``model_management.load_models_gpu`` for the parts it uses (:func:`load_models`), so ComfyUI frees its own
models for them, offloads ours when it needs the room and honours ``--lowvram`` / ``--novram`` / "free memory".
The parts are plain torch modules, not built from ``comfy.ops`` layers, so ComfyUI cannot stream them layer by
layer: each is loaded whole (``force_full_load``), one step's parts at a time when memory is short. Under
``--lowvram`` / ``--novram`` (:func:`streams_layers`) KeyFace streams them itself, block by block, after asking
ComfyUI to free the room for one step's blocks (:func:`free_memory`).

Model folders registered with ComfyUI (so ``extra_model_paths.yaml`` entries work too)::

    keyface:        models/keyface/         stage checkpoints, vae/ (SVD VAE, diffusers layout)
    keyface_audio:  models/keyface/audio/   WavLM, BEATs, wav2vec2 (audio encoders)
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from keyface.errors import InputError

MODELS_FOLDER = "keyface"
AUDIO_MODELS_FOLDER = "keyface_audio"
# Extensions listed for the stage checkpoints (keyface.loading.ENGINE_SUFFIXES) and the audio encoders.
MODEL_EXTENSIONS = {".safetensors", ".pt", ".ckpt"}
# Input files offered by KeyFace Load Audio: what PyAV decodes (audio, or a video's audio track).
MEDIA_EXTENSIONS = {
    ".wav",
    ".mp3",
    ".flac",
    ".m4a",
    ".aac",
    ".ogg",
    ".opus",
    ".wma",
    ".aiff",
    ".aif",
    ".mp4",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".m4v",
}
DEFAULT_PREVIEW_SIZE = 512  # ComfyUI's --preview-size default
_ENV = {"models": "KEYFACE_MODELS_DIR", "input": "KEYFACE_INPUT_DIR", "output": "KEYFACE_OUTPUT_DIR"}
_DEFAULT_FOLDERS = {"models": Path("models") / "keyface", "input": Path("input"), "output": Path("output")}
_configured: dict[str, Path] = {}


@functools.cache
def _comfy(module: str):
    """ComfyUI's module ``module``, or None outside ComfyUI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return _comfy("folder_paths") is not None


def configure(**folders: str | os.PathLike | None) -> None:
    """Set the fallback folders used outside ComfyUI: ``models=``, ``input=``, ``output=`` (None: unset)."""
    for kind, path in folders.items():
        if kind not in _ENV:
            raise InputError(f"configure: unknown folder kind {kind!r}; use {sorted(_ENV)}")
        if path is None:
            _configured.pop(kind, None)
        else:
            _configured[kind] = Path(path).expanduser().absolute()


def _fallback(kind: str) -> Path:
    if kind in _configured:
        return _configured[kind]
    configured = os.environ.get(_ENV[kind])
    return Path(configured).expanduser().absolute() if configured else _DEFAULT_FOLDERS[kind].absolute()


# ----------------------------------------------------------------------------------------------------- folders


def register_model_folders() -> None:
    """Register ``keyface`` and ``keyface_audio`` with ComfyUI's ``folder_paths.add_model_folder_path``, after any
    paths from extra_model_paths.yaml (which ComfyUI reads before loading custom nodes). The pack lists its own
    files (stage checkpoints, encoder folders), so the folders need no extension filter."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return
    default = Path(folder_paths.models_dir) / MODELS_FOLDER
    for name, path in ((MODELS_FOLDER, default), (AUDIO_MODELS_FOLDER, default / "audio")):
        folder_paths.add_model_folder_path(name, str(path))


def model_roots() -> list[Path]:
    """The KeyFace models folders, in search order."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return [_fallback("models")]
    return [Path(p) for p in folder_paths.get_folder_paths(MODELS_FOLDER)]


def audio_model_roots() -> list[Path]:
    """Where audio encoders are looked for: the ``keyface_audio`` folders, then ``audio/`` inside and next to
    each KeyFace models folder (the official release keeps the encoders beside keyframe.pt)."""
    folder_paths = _comfy("folder_paths")
    roots = [Path(p) for p in folder_paths.get_folder_paths(AUDIO_MODELS_FOLDER)] if folder_paths else []
    for root in model_roots():
        roots += [root / "audio", root]
    return list(dict.fromkeys(roots))


def input_dir() -> Path:
    folder_paths = _comfy("folder_paths")
    return Path(folder_paths.get_input_directory()) if folder_paths else _fallback("input")


def output_dir() -> Path:
    folder_paths = _comfy("folder_paths")
    return Path(folder_paths.get_output_directory()) if folder_paths else _fallback("output")


def user_dir() -> Path | None:
    """ComfyUI's user folder (``--user-directory``; kept across restarts, unlike its temp folder), or None
    outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    return Path(folder_paths.get_user_directory()) if folder_paths else None


def temp_dir() -> Path | None:
    """ComfyUI's temp folder (``--temp-directory``; emptied at start-up: previews), or None outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    return Path(folder_paths.get_temp_directory()) if folder_paths else None


def input_media_files() -> list[str]:
    """Audio and video files in the input folder (top level), sorted."""
    folder = input_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)


def input_path(name: str) -> Path:
    """The file an input-folder widget value names (ComfyUI's ``name [output]`` annotations are understood)."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_annotated_filepath(name))
    return input_dir() / name


# ------------------------------------------------------------------------------------------------------ output

_PREFIX_VARIABLE = re.compile(r"%width%|%height%")  # what the fallback substitutes (ComfyUI does more)


def check_filename_prefix(prefix: str) -> None:
    """Refuse a filename prefix that would leave the output folder (absolute, ``..``) or is empty."""
    text = str(prefix).strip().replace("\\", "/")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if not parts or text.endswith("/"):
        raise InputError(f"filename_prefix: {prefix!r} names no file; give e.g. 'video/KeyFace'")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or ".." in parts:
        raise InputError(
            f"filename_prefix: {prefix!r} points outside ComfyUI's output folder; give a relative name such as "
            "'video/KeyFace' (sub-folders are created inside the output folder)"
        )


def save_path(prefix: str, width: int, height: int, extension: str) -> tuple[Path, str]:
    """A new, numbered output file for ``prefix``: ``(path, subfolder)``, always inside the output folder."""
    check_filename_prefix(prefix)
    root = output_dir()
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(root), width, height)
        except Exception as error:  # ComfyUI raises a plain Exception for paths outside the output folder
            raise InputError(f"filename_prefix: {prefix!r} cannot be used: {error}") from error
        folder = Path(folder)
    else:
        values = {"%width%": str(width), "%height%": str(height)}
        relative = PurePosixPath(_PREFIX_VARIABLE.sub(lambda m: values[m.group(0)], prefix.replace("\\", "/")))
        subfolder = "" if str(relative.parent) == "." else str(relative.parent)
        name = relative.name
        folder = root / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        taken = [re.match(rf"{re.escape(name)}_(\d+)_", p.name) for p in folder.iterdir()]
        counter = max((int(m.group(1)) for m in taken if m), default=0) + 1
    path = folder / f"{name}_{counter:05}_{extension}"
    # symbolic links inside the output folder must not lead out of it either
    resolved, base = path.parent.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise InputError(f"filename_prefix: {prefix!r} resolves to {resolved}, outside the output folder {base}")
    return path, subfolder


def metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata."""
    cli_args = _comfy("comfy.cli_args")
    return cli_args is None or not cli_args.args.disable_metadata


# ------------------------------------------------------------------------------------------ progress and cancel


class _SilentProgressBar:
    """Stand-in for ``comfy.utils.ProgressBar`` outside ComfyUI."""

    def __init__(self, total: int):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)


def progress_bar(total: int):
    """ComfyUI's progress bar of the running node (its hook raises on Cancel), or a silent stand-in."""
    utils = _comfy("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _SilentProgressBar(total)


def check_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel (no-op outside ComfyUI)."""
    management = _comfy("comfy.model_management")
    if management is not None:
        management.throw_exception_if_processing_interrupted()


def _running_node():
    """``(PromptServer.instance, executing context)`` of the node ComfyUI is running now, or None (outside
    ComfyUI, between nodes, or before the server has started)."""
    if not in_comfyui():
        return None
    server, execution = _comfy("server"), _comfy("comfy_execution.utils")
    if server is None or execution is None:
        return None
    context = execution.get_executing_context()
    instance = getattr(server.PromptServer, "instance", None)
    if context is None or instance is None:
        return None
    return instance, context


def show_node_text(text: str) -> None:
    """Show ``text`` under the running node in ComfyUI's UI (``PromptServer.send_progress_text``; replaces the
    node's previous text). No-op outside ComfyUI or when no node is running."""
    running = _running_node()
    if running is not None:
        instance, context = running
        instance.send_progress_text(text, context.node_id)


def show_node_output(output: dict) -> None:
    """Show ``output`` (a ``ui`` dict, e.g. ``{"images": [...], "animated": (True,)}``) on the running node now,
    while it still runs: the ``executed`` message ComfyUI's executor sends a node's ``ui`` with when it finishes
    (``PromptServer.send_sync``, to the client that queued the prompt). The node's own ``ui`` output replaces
    it at the end. No-op outside ComfyUI, when no node is running or no client is connected."""
    running = _running_node()
    if running is None or getattr(running[0], "client_id", None) is None:
        return
    instance, context = running
    message = {
        "node": context.node_id,
        "display_node": context.node_id,
        "output": output,
        "prompt_id": context.prompt_id,
    }
    instance.send_sync("executed", message, instance.client_id)


def preview_max_size() -> int:
    cli_args = _comfy("comfy.cli_args")
    return getattr(cli_args.args, "preview_size", DEFAULT_PREVIEW_SIZE) if cli_args else DEFAULT_PREVIEW_SIZE


# ------------------------------------------------------------------------------------------- devices and memory


def torch_device(choice: str):
    """``auto``: ComfyUI's device (honours --cpu, --directml, ...) or the best available; or ``cpu`` / ``cuda``."""
    from keyface.loading import resolve_device

    management = _comfy("comfy.model_management")
    if management is not None:
        comfy_device = management.get_torch_device()
        # ComfyUI's own device object (e.g. cuda:0), so that its memory bookkeeping sees one device, not two
        if choice == "auto" or choice == comfy_device.type:
            return comfy_device
    return resolve_device(choice)


def offload_device(device):
    """Where KeyFace's networks wait between nodes: ComfyUI's offload device (the CPU unless --highvram) for a
    GPU; the device itself on the CPU or outside ComfyUI."""
    management = _comfy("comfy.model_management")
    if management is None or device.type == "cpu":
        return device
    return management.unet_offload_device()


def manages_models() -> bool:
    """True inside ComfyUI: KeyFace's parts are placed by ``comfy.model_management``."""
    return _comfy("comfy.model_management") is not None and _comfy("comfy.model_patcher") is not None


def streams_layers() -> bool:
    """True inside ComfyUI under ``--lowvram`` / ``--novram``: KeyFace then streams its networks block by block
    itself (offload ``stream``, keyface.models.streaming) after :func:`free_memory`, instead of loading whole
    parts through ``load_models_gpu`` (ComfyUI's own partial loading needs ``comfy.ops`` layers)."""
    management = _comfy("comfy.model_management")
    if management is None:
        return False
    state = getattr(management, "vram_state", None)
    return state in (management.VRAMState.LOW_VRAM, management.VRAMState.NO_VRAM)


@functools.cache
def _part_holder():
    import torch

    class ManagedPart(torch.nn.Module):
        """What a ModelPatcher manages: one KeyFace part as ``part``. ComfyUI keeps its bookkeeping attributes
        (``device``, loaded memory, ...) on this holder, not on the part (transformers models have a read-only
        ``device``)."""

        def __init__(self, part: torch.nn.Module):
            super().__init__()
            self.part = part

    return ManagedPart


def model_patcher(module, device, offload_device):
    """A ``comfy.model_patcher.ModelPatcher`` through which ComfyUI moves ``module`` between ``device`` (its
    load device) and ``offload_device``; its size is the bytes of the module's parameters and buffers."""
    from keyface.models.bundle import module_bytes

    patcher = _comfy("comfy.model_patcher")
    return patcher.ModelPatcher(
        _part_holder()(module), load_device=device, offload_device=offload_device, size=module_bytes(module)
    )


def load_models(patchers) -> None:
    """Have ComfyUI put the modules of ``patchers`` (ModelPatchers) on their load device, whole, freeing other
    models first where memory is short; already loaded ones stay."""
    _comfy("comfy.model_management").load_models_gpu(list(patchers), force_full_load=True)


def release_models(patchers) -> None:
    """Unload ``patchers`` now (their modules go to their offload device) and drop them from ComfyUI's list of
    loaded models. ComfyUI has no public call for one model; this is what its free_memory does per model."""
    management = _comfy("comfy.model_management")
    patchers = list(patchers)
    if management is None or not patchers:
        return
    for loaded in list(management.current_loaded_models):
        if any(loaded.model is patcher for patcher in patchers):
            loaded.model_unload()
            management.current_loaded_models.remove(loaded)


def network_dtype(precision: str, device):
    """The networks' dtype for the ``precision`` widget on ``device``. ``auto`` inside ComfyUI follows its
    flags and the device (``model_management.unet_dtype``: --fp32-unet, --bf16-unet, --fp16-unet,
    --force-fp32, --force-fp16 and what the GPU supports); outside it :func:`keyface.loading.resolve_dtype`."""
    import logging

    import torch

    from keyface.loading import resolve_dtype, warn_slow_precision

    management = _comfy("comfy.model_management")
    if precision != "auto" or management is None:
        return resolve_dtype(precision, device)
    supported = [torch.bfloat16, torch.float16, torch.float32]  # what KeyFace runs, in the order auto prefers
    cli_args = _comfy("comfy.cli_args")
    if cli_args is not None and getattr(cli_args.args, "force_fp16", False):
        supported.insert(0, supported.pop(1))  # unet_dtype tries them in order; --force-fp16 means fp16 first
    dtype = management.unet_dtype(device=device, supported_dtypes=supported)
    if dtype not in supported:  # fp8 / fp64 flags: KeyFace's networks have no such mode
        fallback = resolve_dtype("auto", device)
        logging.getLogger(__name__).warning(
            "KeyFace: ComfyUI asks for %s networks, which KeyFace cannot run; using %s", dtype, fallback
        )
        return fallback
    warn_slow_precision(dtype, device)  # ComfyUI answers half on a CPU only for an explicit --bf16/--fp16 flag
    return dtype


def free_memory(required_bytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until ``required_bytes`` (plus its inference reserve) are free."""
    management = _comfy("comfy.model_management")
    if management is not None and device.type != "cpu":
        management.free_memory(required_bytes + management.minimum_inference_memory(), device)


def empty_cache() -> None:
    management = _comfy("comfy.model_management")
    if management is not None:
        management.soft_empty_cache()


# ------------------------------------------------------------------------------------------------- upscaling


def upscale_image(upscale_model, image):
    """Run an ``UPSCALE_MODEL`` on an ``IMAGE`` (batch, height, width, 3) through ComfyUI's own
    ImageUpscaleWithModel node (tiling, device handling, out-of-memory retries). Outside ComfyUI the model is
    called directly on (batch, 3, height, width) and the result clamped to [0, 1]."""
    upscale_nodes = _comfy("comfy_extras.nodes_upscale_model")
    if upscale_nodes is not None:
        node = upscale_nodes.ImageUpscaleWithModel
        # ComfyUI 0.3.65+: a V3 node, classmethod execute -> io.NodeOutput; 0.3.64: a classic node, upscale -> tuple
        run = node.execute if hasattr(node, "execute") else node().upscale
        return run(upscale_model=upscale_model, image=image)[0]
    return upscale_model(image.movedim(-1, -3)).movedim(-3, -1).clamp(0.0, 1.0)


def submitted_prompt(prompt: dict) -> dict:
    """The API prompt as submitted: a copy without what the executor adds to each node while running it
    (``is_changed``, the fingerprint it computed; queued again, it would make the next run reuse the cache)."""
    return {node_id: {k: v for k, v in node.items() if k != "is_changed"} for node_id, node in prompt.items()}


def queue_prompt_again(prompt: dict, extra_pnginfo: dict | None, output_node_id: str) -> None:
    """Put ``prompt`` on ComfyUI's queue again (after what is queued), executing ``output_node_id``'s branch.

    The item is what ``POST /prompt`` queues for an already validated prompt: ``(number, prompt_id, prompt,
    extra_data, outputs_to_execute)``; the UI's client gets its progress."""
    import uuid

    server = _comfy("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        raise InputError("the next batch can only be queued inside ComfyUI's server")
    number = instance.number
    instance.number += 1
    extra_data = {"extra_pnginfo": extra_pnginfo or {}}
    if getattr(instance, "client_id", None):
        extra_data["client_id"] = instance.client_id
    instance.prompt_queue.put((number, str(uuid.uuid4()), submitted_prompt(prompt), extra_data, [output_node_id]))
