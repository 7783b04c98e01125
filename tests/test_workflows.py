"""The example workflows: every UI-format file is a valid ComfyUI graph (known node types, links joining matching
types, widget values in range, laid out as the frontend stores them), its API-format twin describes the same
graph, and every API-format workflow runs as shipped, with no edits, in-process on tiny random weights: its
input files are the pack's sample inputs, put into a temporary ComfyUI input folder the way the pack does when
ComfyUI loads it, and read back from there like LoadImage and KeyFace Load Audio do. Each run writes an mp4 with
one frame per audio frame and removes its job folder afterwards.

Core ComfyUI nodes the examples use are described below (ComfyUI 0.3.64) and run as small stand-ins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import wave

import numpy as np
import pytest
import torch
from comfy_api.v0_0_2 import io
from helpers import execute_node, require_face_detector, validate_inputs_of
from test_nodes import NODES, PACK_NAME, PACK_ROOT, host

from keyface.demo import TINY

WORKFLOWS = PACK_ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
NAMES = [path.stem for path in UI_FILES]
REQUIRED_EXAMPLES = {
    "keyface_portrait_speech",
    "keyface_emotion_curve",
    "keyface_long_form_upscaled",
    "keyface_edit_keyframes",
}
samples = sys.modules[f"{PACK_NAME}.nodes.samples"]
job_folders = sys.modules[f"{PACK_NAME}.nodes.job_folders"]
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
UI_ONLY_TYPES = {"MarkdownNote", "Note"}  # frontend notes: never sent to the server

# The core nodes the examples may use, as ComfyUI 0.3.64 declares them. `files`: a combo of files in a folder,
# any name with one of these extensions is accepted (the folder differs between machines).
CORE_NODES = {
    "LoadImage": {
        "inputs": {"image": ("COMBO", {"files": (".png", ".jpg", ".jpeg", ".webp"), "image_upload": True})},
        "outputs": ("IMAGE", "MASK"),
    },
    "PreviewImage": {"inputs": {"images": ("IMAGE", {})}, "outputs": ()},
    "ImageFromBatch": {
        "inputs": {
            "image": ("IMAGE", {}),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
            "length": ("INT", {"default": 1, "min": 1, "max": 4096}),
        },
        "outputs": ("IMAGE",),
    },
    "ImageBatch": {"inputs": {"image1": ("IMAGE", {}), "image2": ("IMAGE", {})}, "outputs": ("IMAGE",)},
    "ImageSharpen": {
        "inputs": {
            "image": ("IMAGE", {}),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0}),
        },
        "outputs": ("IMAGE",),
    },
    "UpscaleModelLoader": {
        "inputs": {"model_name": ("COMBO", {"files": (".safetensors", ".pth", ".pt", ".ckpt", ".bin")})},
        "outputs": ("UPSCALE_MODEL",),
    },
    "ImageUpscaleWithModel": {
        "inputs": {"upscale_model": ("UPSCALE_MODEL", {}), "image": ("IMAGE", {})},
        "outputs": ("IMAGE",),
    },
}
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_WIDGETS = {"AUDIO_UI"}  # widgets the frontend draws (the audio player), stored as null
UPLOAD_WIDGETS = {"image_upload": ("IMAGEUPLOAD", "image"), "audio_upload": ("AUDIOUPLOAD", None)}


def node_inputs(node_type: str) -> list[tuple[str, str, dict, bool]]:
    """``(name, kind, options, optional)`` of each input, in order; combos have kind ``COMBO`` and their choices
    in ``options["choices"]``."""
    if node_type in CORE_NODES:
        return [(name, kind, options, False) for name, (kind, options) in CORE_NODES[node_type]["inputs"].items()]
    spec = NODES[node_type].INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            options = dict(rest[0]) if rest else {}
            if kind == "COMBO":
                options["choices"] = options.pop("options")
            if options.get("audio_upload"):  # a file of the input folder, which differs between machines
                options["files"] = tuple(sorted(host.MEDIA_EXTENSIONS))
            inputs.append((name, kind, options, section == "optional"))
    return inputs


def node_outputs(node_type: str) -> tuple[str, ...]:
    return CORE_NODES[node_type]["outputs"] if node_type in CORE_NODES else NODES[node_type].RETURN_TYPES


def is_widget(kind: str) -> bool:
    return kind in WIDGET_KINDS or kind in FRONTEND_WIDGETS


def expected_layout(node_type: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, dict]]]:
    """What the frontend stores for a node: its input slots ``(name, type)`` (wires, then widgets, then the upload
    button) and its ``widgets_values`` entries ``(input name, role, options)``."""
    inputs = node_inputs(node_type)
    slots = [(name, kind) for name, kind, _, _ in inputs if not is_widget(kind)]
    values = []
    for name, kind, options, _ in inputs:
        if is_widget(kind):
            slots.append((name, kind))
            values.append((name, "frontend" if kind in FRONTEND_WIDGETS else "value", options))
            if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
                values.append((name, "seed control", {}))
    for name, _kind, options, _ in inputs:
        for flag, (upload_kind, _) in UPLOAD_WIDGETS.items():
            if options.get(flag):
                slots.append(("upload", upload_kind))
                values.append((name, flag, {}))
    return slots, values


def accepts(slot_type: str, link_type: str) -> bool:
    """An input slot of ``slot_type`` (``"IMAGE,VIDEO"`` for a multi-type input) takes a link of ``link_type``
    (or a saved slot of that type)."""
    return slot_type == "*" or set(link_type.split(",")) <= set(slot_type.split(","))


def check_value(where: str, kind: str, options: dict, value) -> None:
    if kind == "COMBO":
        if "files" in options:
            assert isinstance(value, str) and value.lower().endswith(options["files"]), f"{where}: {value!r}"
        else:
            assert value in options["choices"], f"{where}: {value!r} not in {options['choices']}"
        return
    if kind == "STRING":
        assert isinstance(value, str), where
        return
    if kind == "BOOLEAN":
        assert isinstance(value, bool), where
        return
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
    if kind == "INT":
        assert value == int(value), f"{where}: {value!r} is not whole"
    assert options.get("min", -np.inf) <= value <= options.get("max", np.inf), f"{where}: {value} out of range"


def widget_values(node: dict) -> dict:
    """Input name -> value of a UI node's ``widgets_values``."""
    _, layout = expected_layout(node["type"])
    return {
        name: value for (name, role, _), value in zip(layout, node["widgets_values"], strict=True) if role == "value"
    }


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


@pytest.fixture
def empty_models_folder(tmp_path):
    """Model combos as on a machine without weights: the documented release names are still offered."""
    host.configure(models=tmp_path / "models", input=tmp_path / "input", output=tmp_path / "output")
    yield
    host.configure(models=None, input=None, output=None)


# ------------------------------------------------------------------------------------------------ the files


def test_every_example_exists_in_both_formats():
    assert set(NAMES) >= REQUIRED_EXAMPLES
    assert sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_valid_graph(name, empty_models_folder):
    workflow = load_ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    assert workflow["version"] >= 0.4 and len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(links)
    for node in nodes.values():
        where = f"{name}: node {node['id']} ({node['type']})"
        if node["type"] in UI_ONLY_TYPES:
            assert not node["inputs"] and not node["outputs"], where
            continue
        assert node["type"] in NODES or node["type"] in CORE_NODES, f"{where}: unknown node type"
        slots, layout = expected_layout(node["type"])
        saved = [(entry["name"], entry["type"]) for entry in node["inputs"]]
        saved_names = [saved_name for saved_name, _ in saved]
        # a workflow saved before an optional socket was appended lacks it (the frontend adds it when loading);
        # one saved before an input widened to a multi-type holds the narrower type it had
        optional = {input_name for input_name, _, _, is_optional in node_inputs(node["type"]) if is_optional}
        assert [slot[0] for slot in slots if slot[0] in saved_names] == saved_names, where
        assert all(accepts(dict(slots)[saved_name], saved_type) for saved_name, saved_type in saved), where
        assert {slot[0] for slot in slots if slot[0] not in saved_names} <= optional, where
        assert len(node["widgets_values"]) == len(layout), where
        for (input_name, role, options), value in zip(layout, node["widgets_values"], strict=True):
            kind = dict(slots).get(input_name)
            if role == "value":
                check_value(f"{where}.{input_name}", kind, options, value)
            elif role == "seed control":
                assert value in SEED_CONTROLS, where
            else:
                assert value == (None if role == "frontend" else UPLOAD_WIDGETS[role][1]), where
        required = {
            name for name, kind, _, optional in node_inputs(node["type"]) if not optional and not is_widget(kind)
        }
        connected = {entry["name"] for entry in node["inputs"] if entry.get("link") is not None}
        assert required <= connected, f"{where}: unconnected {sorted(required - connected)}"
        for index, output in enumerate(node["outputs"]):
            assert output["type"] == node_outputs(node["type"])[index], where
            for link_id in output["links"] or ():
                assert links[link_id][1:3] == [node["id"], index], where
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        where = f"{name}: link {link_id}"
        output_type = node_outputs(nodes[source]["type"])[slot]
        entry = nodes[target]["inputs"][target_slot]
        assert entry["link"] == link_id, where
        assert kind == output_type and accepts(entry["type"], output_type), f"{where}: {output_type} -> {entry['type']}"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_is_the_same_graph(name, empty_models_folder):
    workflow, prompt = load_ui(name), load_api(name)
    nodes = {str(node["id"]): node for node in workflow["nodes"] if node["type"] not in UI_ONLY_TYPES}
    assert set(prompt) == set(nodes)
    for node_id, entry in prompt.items():
        node = nodes[node_id]
        assert entry["class_type"] == node["type"]
        linked = {}
        for _link_id, source, slot, target, target_slot, _ in workflow["links"]:
            if str(target) == node_id:
                linked[node["inputs"][target_slot]["name"]] = [str(source), slot]
        frontend = {name for name, kind, _, _ in node_inputs(node["type"]) if kind in FRONTEND_WIDGETS}
        expected = {
            **{name: value for name, value in widget_values(node).items() if name not in linked},
            **linked,
            **{name: "" for name in frontend},
        }
        assert entry["inputs"] == expected, node_id


# ------------------------------------------------------------------------------------------ execution


UPSCALE_MODELS = "upscale_models"  # ComfyUI's models/upscale_models


class UpscaleStandIn(torch.nn.Module):
    """UPSCALE_MODEL stand-in: 2x nearest-neighbour on (batch, 3, height, width)."""

    scale = 2

    def forward(self, pixels):
        return torch.nn.functional.interpolate(pixels, scale_factor=2, mode="nearest")


def _load_image(image):
    """ComfyUI's LoadImage: the input-folder file the widget names, RGB in [0, 1], and an empty mask."""
    from PIL import Image

    pixels = np.array(Image.open(host.input_path(image)).convert("RGB"), dtype=np.float32) / 255
    picture = torch.from_numpy(pixels)[None]
    return picture, torch.zeros(picture.shape[:3])


def _load_upscale_model(model_name):
    """ComfyUI's UpscaleModelLoader: the named file must be in models/upscale_models (its combo lists them)."""
    assert (host.model_roots()[0].parent / UPSCALE_MODELS / model_name).is_file(), f"{model_name} not found"
    return (UpscaleStandIn(),)


def _sharpen(image, sharpen_radius, sigma, alpha):
    blurred = torch.nn.functional.avg_pool2d(
        image.permute(0, 3, 1, 2), 2 * sharpen_radius + 1, stride=1, padding=sharpen_radius, count_include_pad=False
    ).permute(0, 2, 3, 1)
    return ((image + alpha * (image - blurred)).clamp(0, 1),)


def _from_batch(image, batch_index, length):
    first = min(image.shape[0] - 1, batch_index)
    return (image[first : first + min(image.shape[0] - first, length)].clone(),)


# Small stand-ins with the core nodes' behaviour, called with the same inputs.
CORE_STAND_INS = {
    "LoadImage": _load_image,
    "PreviewImage": lambda images: {"ui": {"images": [{"count": len(images)}]}},
    "ImageFromBatch": _from_batch,
    "ImageBatch": lambda image1, image2: (torch.cat([image1, image2]),),
    "ImageSharpen": _sharpen,
    "UpscaleModelLoader": _load_upscale_model,
    # ComfyUI's ImageUpscaleWithModel without its tiling: IMAGE (n, h, w, 3) -> (n, 2h, 2w, 3)
    "ImageUpscaleWithModel": lambda upscale_model, image: (upscale_model(image.movedim(-1, -3)).movedim(-3, -1),),
}


def validate(node_type: str, inputs: dict) -> None:
    """ComfyUI's checks before a prompt runs: a combo value must be one of the choices the node lists now (for a
    KeyFace node: unless its validate_inputs takes that input), then validate_inputs (linked inputs as None); the
    core LoadImage's own check: the file is in the input folder."""
    if node_type == "LoadImage":
        assert host.input_path(inputs["image"]).is_file(), f"LoadImage: {inputs['image']!r} not in the input folder"
    if node_type in CORE_NODES:
        return
    node_class = NODES[node_type]
    check = validate_inputs_of(node_class)
    checked = check.__code__.co_varnames[1 : check.__code__.co_argcount] if check is not None else ()
    for name, kind, options, _ in node_inputs(node_type):
        if kind == "COMBO" and name in inputs and name not in checked and not isinstance(inputs[name], list):
            assert inputs[name] in options["choices"], f"{node_type}.{name}: {inputs[name]!r} is not offered"
    if check is not None:
        arguments = {
            name: None if isinstance(inputs[name], list) else inputs[name] for name in checked if name in inputs
        }
        assert check(**arguments) is True, f"{node_type}: {check(**arguments)}"


def execute(prompt: dict, workflow: dict) -> dict:
    """Run an API-format prompt the way ComfyUI does: every node validated first (:func:`validate`), then in
    topological order, execute with linked outputs and widget values (+ hidden prompt / workflow, as ComfyUI calls a V3 node). Returns each
    node's outputs, or its ``ui`` dict for output nodes."""
    for entry in prompt.values():
        validate(entry["class_type"], entry["inputs"])
    done, results = set(), {}
    while len(done) < len(prompt):
        ready = [
            node_id
            for node_id, entry in prompt.items()
            if node_id not in done
            and all(value[0] in done for value in entry["inputs"].values() if isinstance(value, list))
        ]
        assert ready, "the graph has a cycle or a dangling link"
        for node_id in ready:
            entry = prompt[node_id]
            node_type = entry["class_type"]
            inputs = {
                name: results[value[0]][value[1]] if isinstance(value, list) else value
                for name, value in entry["inputs"].items()
            }
            if node_type in CORE_STAND_INS:
                output = CORE_STAND_INS[node_type](**inputs)
                results[node_id] = output["ui"] if isinstance(output, dict) else output
            else:
                hidden = {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: {"workflow": workflow}}
                output = execute_node(NODES[node_type], hidden, **inputs)
                results[node_id] = output.ui.as_dict() if output.ui is not None else output.result
            done.add(node_id)
    return results


@pytest.fixture(scope="module")
def comfy_folders(tmp_path_factory, demo_models):
    """A ComfyUI layout: the input folder holds what the pack puts there on import (the sample inputs), the
    models folder the demo weights and the long-form example's upscale model (a user adds that one file; the
    stand-in loader only checks it is there), and an empty output folder."""
    root = tmp_path_factory.mktemp("comfyui")
    folders = {name: root / name for name in ("input", "output", "models")}
    folders["output"].mkdir()
    assert samples.install_sample_inputs(folders["input"]) == [
        samples.SAMPLE_PORTRAIT,
        samples.SAMPLE_SPEECH,
        samples.SAMPLE_SPEECH_LONG,
    ]
    (folders["models"] / UPSCALE_MODELS).mkdir(parents=True)
    (folders["models"] / UPSCALE_MODELS / "RealESRGAN_x4plus.pth").write_bytes(b"stand-in")
    (folders["models"] / "keyface").symlink_to(demo_models, target_is_directory=True)
    return folders


def wav_frames(path) -> int:
    """Video frames (25 per second, the last one partly filled) of a wav file."""
    with wave.open(str(path)) as file:
        return -(-file.getnframes() * 25 // file.getframerate())


@contextlib.contextmanager
def comfyui(folders: dict):
    host.configure(models=folders["models"] / "keyface", input=folders["input"], output=folders["output"])
    try:
        yield
    finally:
        host.configure(models=None, input=None, output=None)


# The examples on the 17 s sample clip (about 450 frames) take over 10 minutes each on a busy 2-core CPU (the
# 3 s ones 1-2 minutes): they run with KEYFACE_SLOW_TESTS=1 (before a release, on a GPU machine); by default
# they are only validated as shipped (test_api_workflow_validates_as_shipped).
RUN_SLOW = os.environ.get("KEYFACE_SLOW_TESTS") == "1"


def shipped(name: str):
    """``name`` as a test parameter, marked slow when the example reads the long sample clip."""
    long_clip = any(entry["inputs"].get("audio") == samples.SAMPLE_SPEECH_LONG for entry in load_api(name).values())
    slow = pytest.mark.skipif(not RUN_SLOW, reason="SLOW: 17 s of sample audio; set KEYFACE_SLOW_TESTS=1 to run")
    return pytest.param(name, marks=[slow] if long_clip else [])


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_as_shipped(name, comfy_folders):
    """What ComfyUI checks before it queues a prompt passes for the files as shipped: the input files exist in
    the input folder, every combo value is offered, every VALIDATE_INPUTS accepts."""
    with comfyui(comfy_folders):
        for entry in load_api(name).values():
            validate(entry["class_type"], entry["inputs"])


@pytest.mark.parametrize("name", [shipped(name) for name in NAMES])
def test_api_workflow_runs_as_shipped(name, comfy_folders):
    """The shipped API file queued unchanged: the portrait is found by the face detector (auto crop), the audio
    and image are the sample inputs, the device is the loader's default ('auto': the CPU here)."""
    from keyface.media import probe_media

    require_face_detector()  # the examples crop with the face detector
    prompt = load_api(name)
    with comfyui(comfy_folders):
        results = execute(prompt, load_ui(name))
    assert prompt == load_api(name)  # nothing was edited on the way
    (audio_id,) = [i for i, entry in prompt.items() if entry["class_type"] == "KeyFaceLoadAudio"]
    frames = results[audio_id][3]
    assert frames == wav_frames(comfy_folders["input"] / prompt[audio_id]["inputs"]["audio"])
    combines = [node_id for node_id, entry in prompt.items() if entry["class_type"] == "KeyFaceVideoCombine"]
    assert combines
    for node_id in combines:
        (shown,) = results[node_id]["images"]
        info = probe_media(comfy_folders["output"] / shown["subfolder"] / shown["filename"])
        assert info.video.num_frames == frames and info.video.fps == 25
        assert info.audio is not None and info.audio.duration == pytest.approx(frames / 25, abs=0.05)
        assert json.loads(info.metadata["prompt"])[node_id]["class_type"] == "KeyFaceVideoCombine"
        assert json.loads(info.metadata["workflow"]) == load_ui(name)
        inputs = prompt[node_id]["inputs"]
        size = TINY.image_size
        if "crop" in inputs:  # pasted back into the full portrait
            assert (info.video.width, info.video.height) == _portrait_size(comfy_folders)
        elif "upscale_model" in inputs:
            assert (info.video.width, info.video.height) == (2 * size, 2 * size)
        else:
            assert (info.video.width, info.video.height) == (size, size)
        # the video is complete: its job folder is gone (the examples do not keep it)
        video = results[inputs["video"][0]][0]
        assert not video.keep_job_folder and not video.job.folder.path.exists()


def _portrait_size(folders: dict) -> tuple[int, int]:
    from PIL import Image

    with Image.open(folders["input"] / samples.SAMPLE_PORTRAIT) as image:
        return image.size


# ------------------------------------------------------------------------------------------ sample inputs


def test_sample_inputs_are_small_and_named_by_the_examples():
    file_inputs = {"LoadImage": "image", "KeyFaceLoadAudio": "audio"}
    named = {
        entry["inputs"][file_inputs[entry["class_type"]]]
        for name in NAMES
        for entry in load_api(name).values()
        if entry["class_type"] in file_inputs
    }
    shipped = {path.name for path in samples.SAMPLES_FOLDER.iterdir()}
    assert shipped == {samples.SAMPLE_PORTRAIT, samples.SAMPLE_SPEECH}
    assert named == shipped | {samples.SAMPLE_SPEECH_LONG}  # the long clip is made from the short one
    for path in samples.SAMPLES_FOLDER.iterdir():
        assert path.stat().st_size < 300 * 1024, path.name


def test_sample_portrait_is_found_by_the_face_detector():
    from keyface.face import crop_face, detect_faces

    require_face_detector()  # the examples crop with the face detector
    portrait = samples.SAMPLES_FOLDER / samples.SAMPLE_PORTRAIT
    (face,) = detect_faces(portrait)
    assert face.confidence > 0.95
    crop = crop_face(portrait)  # no warning: the crop is not enlarged
    assert crop.info.size >= 512 and crop.image.shape == (512, 512, 3)


def test_sample_speech_is_speech_like():
    """Syllables with pauses: the loudness of 40 ms windows varies, with silent gaps and voiced stretches."""
    with wave.open(str(samples.SAMPLES_FOLDER / samples.SAMPLE_SPEECH)) as file:
        assert file.getnchannels() == 1 and file.getsampwidth() == 2
        rate, sound = file.getframerate(), np.frombuffer(file.readframes(file.getnframes()), "<i2") / 32768
    assert rate == 16000 and 2 <= len(sound) / rate <= 8
    window = rate // 25
    loudness = np.sqrt((sound[: len(sound) // window * window].reshape(-1, window) ** 2).mean(axis=1))
    assert (loudness < 0.01).mean() > 0.1 and (loudness > 0.05).mean() > 0.3
    windows = sound[: len(sound) // window * window].reshape(-1, window)[loudness > 0.05]
    lags = np.arange(rate // 400, rate // 80)  # pitch periods of 80-400 Hz
    pitch = [rate / lags[np.argmax([w[:-lag] @ w[lag:] for lag in lags])] for w in windows]
    assert 100 < np.median(pitch) < 170  # a voice's pitch (autocorrelation peak of the voiced windows)


def test_install_sample_inputs_adds_only_missing_files(tmp_path):
    own = tmp_path / samples.SAMPLE_PORTRAIT
    own.write_bytes(b"the artist's own portrait")
    assert samples.install_sample_inputs(tmp_path) == [samples.SAMPLE_SPEECH, samples.SAMPLE_SPEECH_LONG]
    assert own.read_bytes() == b"the artist's own portrait"
    shipped = samples.SAMPLES_FOLDER / samples.SAMPLE_SPEECH
    assert (tmp_path / samples.SAMPLE_SPEECH).read_bytes() == shipped.read_bytes()
    with wave.open(str(tmp_path / samples.SAMPLE_SPEECH_LONG)) as long, wave.open(str(shipped)) as short:
        repeats, pause = samples.LONG_SPEECH_REPEATS, round(samples.LONG_SPEECH_PAUSE * short.getframerate())
        assert long.getparams()[:3] == short.getparams()[:3]
        assert long.getnframes() == repeats * short.getnframes() + (repeats - 1) * pause
    assert samples.install_sample_inputs(tmp_path) == []  # all present: nothing written


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a folder this user cannot write")
def test_install_sample_inputs_into_a_read_only_folder_logs_one_line(tmp_path, caplog):
    tmp_path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            assert samples.install_sample_inputs(tmp_path) == []
    finally:
        tmp_path.chmod(0o755)
    assert len(caplog.records) == 1 and str(tmp_path) in caplog.records[0].getMessage()
    assert not list(tmp_path.iterdir())


def test_install_sample_inputs_when_the_input_folder_is_not_writable(tmp_path, caplog, monkeypatch):
    """Wherever the folder cannot be written (also as root, where permissions do not stop a write), the pack
    still imports: one log line, no exception."""

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(samples.shutil, "copyfile", refuse)
    with caplog.at_level(logging.WARNING):
        assert samples.install_sample_inputs(tmp_path) == []
    assert len(caplog.records) == 1 and "sample inputs were not put into" in caplog.records[0].getMessage()
    assert not (tmp_path / samples.SAMPLE_PORTRAIT).exists()


# KeyFace Model Loader inputs that are settings; every other combo of it names a file (or folder) it loads.
LOADER_SETTINGS = {"device", "precision"}
THUMBNAIL_MAX_BYTES = 100 * 1024


def needed_model_files(workflow: dict) -> list[str]:
    """The file names the graph's loaders read: the KeyFace Model Loader's files and a core upscale model."""
    names = []
    for node in workflow["nodes"]:
        if node["type"] == "KeyFaceModelLoader":
            combos = {name for name, kind, _, _ in node_inputs(node["type"]) if kind == "COMBO"}
            values = widget_values(node)
            names += [values[name] for name in sorted(combos - LOADER_SETTINGS) if values[name] != "none"]
        elif node["type"] == "UpscaleModelLoader":
            names.append(widget_values(node)["model_name"])
    return names


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_opens_with_a_note_naming_its_model_files(name, empty_models_folder):
    """The first node of every template (first in the file, top left on the canvas) is a Markdown note that
    names each weight file the graph's loaders read, and where the KeyFace ones go."""
    nodes = load_ui(name)["nodes"]
    note = nodes[0]
    assert note["type"] == "MarkdownNote", f"{name}: the first node is a {note['type']}"
    assert note["pos"][0] <= min(node["pos"][0] for node in nodes), f"{name}: the note is not leftmost"
    assert note["pos"][1] <= min(node["pos"][1] for node in nodes), f"{name}: the note is not topmost"
    text = note["widgets_values"][0]
    files = needed_model_files(load_ui(name))
    assert len(files) >= 7, f"{name}: {files}"  # two stages, autoguidance, VAE, three audio encoders
    missing = [file for file in files if f"{file}`" not in text]
    assert not missing, f"{name}: the note does not name {missing}"
    assert "models/keyface/" in text and "models/keyface/audio/" in text, name


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_has_its_thumbnail(name):
    """ComfyUI's template browser shows ``workflows/<name>.jpg``: a decodable square JPEG under 100 KB."""
    from PIL import Image

    path = WORKFLOWS / f"{name}.jpg"
    assert path.is_file(), f"{name}: no thumbnail {path.name} (python scripts/make_thumbnails.py)"
    assert 0 < path.stat().st_size < THUMBNAIL_MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "JPEG", f"{path.name}: {image.format}"
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.width == image.height >= 256, f"{path.name}: {image.size}"
        assert np.asarray(image.convert("L")).std() > 10, f"{path.name}: blank"
