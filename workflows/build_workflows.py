"""Writes the example workflows: ``workflows/<name>.json`` (ComfyUI's UI format, drag-and-drop) and
``workflows/api/<name>.json`` (API format, for ``POST /prompt``), both from one description per graph.

    python workflows/build_workflows.py

Widget values are listed the way ComfyUI's frontend (1.27) stores them: every widget input in input order, a
``control_after_generate`` value after each seed, the frontend's own widgets (audio player, upload button) at
their places. Inputs not given here keep the node's default.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACK_ROOT = ROOT.parent
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_CONTROL = "fixed"  # the same seed on every run: the job folder resumes and results repeat


def load_pack():
    spec = importlib.util.spec_from_file_location(
        "keyface_pack", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["keyface_pack"] = module
    spec.loader.exec_module(module)
    return module


PACK = load_pack()
# The sample inputs the pack puts into ComfyUI's input folder, so that every example runs as shipped.
SAMPLES = importlib.import_module(f"{PACK.__name__}.nodes.samples")
PORTRAIT, SPEECH, SPEECH_LONG = SAMPLES.SAMPLE_PORTRAIT, SAMPLES.SAMPLE_SPEECH, SAMPLES.SAMPLE_SPEECH_LONG
UPSCALE_MODEL = "RealESRGAN_x4plus.pth"  # the long-form example's: the one file a user must add

# The core nodes the examples use: inputs in order (name, kind, default) and outputs (ComfyUI 0.3.64).
CORE_NODES = {
    "LoadImage": {
        "inputs": [("image", "COMBO", PORTRAIT)],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
        "upload": ("IMAGEUPLOAD", "image"),
    },
    "PreviewImage": {"inputs": [("images", "IMAGE", None)], "outputs": []},
    "ImageFromBatch": {
        "inputs": [("image", "IMAGE", None), ("batch_index", "INT", 0), ("length", "INT", 1)],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "ImageBatch": {"inputs": [("image1", "IMAGE", None), ("image2", "IMAGE", None)], "outputs": [("IMAGE", "IMAGE")]},
    "ImageSharpen": {
        "inputs": [
            ("image", "IMAGE", None),
            ("sharpen_radius", "INT", 1),
            ("sigma", "FLOAT", 1.0),
            ("alpha", "FLOAT", 1.0),
        ],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "UpscaleModelLoader": {
        "inputs": [("model_name", "COMBO", UPSCALE_MODEL)],
        "outputs": [("UPSCALE_MODEL", "UPSCALE_MODEL")],
    },
    "ImageUpscaleWithModel": {
        "inputs": [("upscale_model", "UPSCALE_MODEL", None), ("image", "IMAGE", None)],
        "outputs": [("IMAGE", "IMAGE")],
    },
}
CORE_TITLES = {
    "LoadImage": "Load Image",
    "PreviewImage": "Preview Image",
    "ImageFromBatch": "Image From Batch",
    "ImageBatch": "Batch Images",
    "ImageSharpen": "Image Sharpen",
    "UpscaleModelLoader": "Load Upscale Model",
    "ImageUpscaleWithModel": "Upscale Image (using Model)",
}
NOTE = "MarkdownNote"  # a frontend-only node: in the UI file, not in the API file
KEYFACE_HUB = "Hugging Face `toninio19/keyface`"
NO_AUTOGUIDANCE = "none"  # the loader's choice of no autoguidance network
# The KeyFace Model Loader's file inputs: (folder under ComfyUI/models/, what the file is, where it comes from).
# The loader's other inputs (device, precision) name no file.
LOADER_FILES = {
    "keyframe": ("keyface", "stage 1, the keyframe network", f"{KEYFACE_HUB} (released as `.pt`; both load)"),
    "interpolation": ("keyface", "stage 2, the in-between frames", f"{KEYFACE_HUB} (released as `.pt`)"),
    "autoguidance": ("keyface", "stage 2's autoguidance network", f"{KEYFACE_HUB} (released as `.pt`)"),
    "vae": (
        "keyface",
        "SVD's VAE (a diffusers folder)",
        "`stabilityai/stable-video-diffusion-img2vid`, folder `vae` (gated)",
    ),
    "wavlm": ("keyface/audio", "WavLM Base+ speech encoder", KEYFACE_HUB),
    "beats": ("keyface/audio", "BEATs audio encoder", KEYFACE_HUB),
    "wav2vec2": ("keyface/audio", "wav2vec2 speech encoder (a folder)", "`facebook/wav2vec2-base-960h`"),
}


@dataclass
class InputSlot:
    name: str
    kind: str  # a wire type, "COMBO", or a widget kind
    default: object
    optional: bool = False
    seed: bool = False
    frontend_widget: bool = False  # made and stored by the frontend only (e.g. the audio player)


@dataclass
class NodeSpec:
    inputs: list[InputSlot]
    outputs: list[tuple[str, str]]
    upload: tuple[str, object] | None = None  # the frontend's upload button: (widget type, stored value)


def node_spec(node_type: str, nodes: dict) -> NodeSpec:
    if node_type in CORE_NODES:
        core = CORE_NODES[node_type]
        slots = [InputSlot(name, kind, default) for name, kind, default in core["inputs"]]
        return NodeSpec(slots, core["outputs"], core.get("upload"))
    node_class = nodes[node_type]
    spec = node_class.INPUT_TYPES()
    slots, upload = [], None
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            options = rest[0] if rest else {}
            slot_kind = "COMBO" if isinstance(kind, list) else kind
            default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
            seed = slot_kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate"))
            slots.append(InputSlot(name, slot_kind, default, section == "optional", bool(seed), kind == "AUDIO_UI"))
            if options.get("audio_upload"):
                upload = ("AUDIOUPLOAD", None)
    names = getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)
    outputs = list(zip(names, node_class.RETURN_TYPES, strict=True))
    return NodeSpec(slots, outputs, upload)


def is_widget(slot: InputSlot) -> bool:
    return slot.kind in WIDGET_KINDS or slot.kind == "COMBO" or slot.frontend_widget


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int] = (300, 120)
    widgets: dict = field(default_factory=dict)
    title: str | None = None


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    links: list[tuple[int, str, int, str]]  # (from node, output name, to node, input name)
    notes: list[Node] = field(default_factory=list)

    def node(self, node_id: int) -> Node:
        return next(node for node in self.nodes if node.id == node_id)


def execution_order(graph: Graph) -> dict[int, int]:
    """Position of each node in a topological order (ComfyUI's ``order`` field)."""
    parents = {node.id: {src for src, _, dst, _ in graph.links if dst == node.id} for node in graph.nodes}
    order, done = {}, set()
    while len(done) < len(graph.nodes):
        ready = sorted(node_id for node_id, needs in parents.items() if node_id not in done and needs <= done)
        for node_id in ready:
            order[node_id] = len(order)
            done.add(node_id)
    return order


def model_files(graph: Graph, nodes: dict) -> str:
    """The note's list of the weight files the graph's KeyFace Model Loader reads, with where each comes from."""
    loader = next(node for node in graph.nodes if node.type == "KeyFaceModelLoader")
    lines = []
    for slot in node_spec(loader.type, nodes).inputs:
        name = loader.widgets.get(slot.name, slot.default)
        if slot.name in LOADER_FILES and name != NO_AUTOGUIDANCE:
            folder, what, source = LOADER_FILES[slot.name]
            lines.append(f"- `models/{folder}/{name}`: {what}, from {source}")
    return (
        "**Model files** (in ComfyUI's `models/` folder; `python -m keyface download --models "
        "ComfyUI/models/keyface` fetches them all, `python -m keyface demo --weights-only --models "
        "ComfyUI/models/keyface` puts tiny random ones there to try the graph):\n\n" + "\n".join(lines)
    )


# Measured on 2 shared CPU cores (tests/test_workflows.py runs, README): the whole graph on the demo weights.
DEMO_CPU_TIME = {SPEECH: "about 30 s", SPEECH_LONG: "about 2 minutes"}
# One full-size UNet pass over a 14-frame clip (bench/unet_forward.py's network, float32, 2 CPU cores) took
# over 90 s already at a 32 x 32 latent, a quarter of the released 64 x 64. A second of video needs about 43
# passes: keyframes 10 steps x 3 guidance branches per 14 keyframes (7.3 s), in-between frames 10 steps x 2
# networks per segment of 13 frames.
RELEASED_CPU_TIME = (
    "with the released weights, over an hour per second of video (about 43 passes of the full-size network "
    "per second, each over 90 s on 2 cores): use a CUDA GPU"
)


def cpu_time(graph: Graph) -> str:
    """The note's line on how long the graph takes on a CPU."""
    audio = next(node.widgets.get("audio") for node in graph.nodes if node.type == "KeyFaceLoadAudio")
    line = f"**Time on a CPU**: {RELEASED_CPU_TIME}."
    if audio in DEMO_CPU_TIME:
        line += f" On the demo weights the graph runs as shipped in {DEMO_CPU_TIME[audio]} (2 cores)."
    return line


def ui_workflow(graph: Graph, nodes: dict) -> dict:
    specs = {node.id: node_spec(node.type, nodes) for node in graph.nodes}
    link_rows = []
    for link_id, (src, output, dst, input_name) in enumerate(graph.links, start=1):
        outputs = specs[src].outputs
        slot = next(i for i, (name, _) in enumerate(outputs) if name == output)
        link_rows.append([link_id, src, slot, dst, input_name, outputs[slot][1]])
    order = execution_order(graph)
    ui_nodes = []
    for node in graph.nodes:
        spec = specs[node.id]
        unknown = set(node.widgets) - {slot.name for slot in spec.inputs}
        if unknown:
            raise ValueError(f"{graph.name}: node {node.id} ({node.type}) has no inputs {sorted(unknown)}")
        inputs, values = [], []
        # the frontend lists wire inputs first, then the widgets (each also an input a wire can replace)
        for slot in sorted(spec.inputs, key=is_widget):
            link = next((row for row in link_rows if row[3] == node.id and row[4] == slot.name), None)
            entry = {"name": slot.name, "type": slot.kind, "link": None if link is None else link[0]}
            if is_widget(slot):
                entry["widget"] = {"name": slot.name}
                values.append(None if slot.frontend_widget else node.widgets.get(slot.name, slot.default))
                if slot.seed:
                    values.append(SEED_CONTROL)
            if slot.optional:
                entry["shape"] = 7
            inputs.append(entry)
        if spec.upload is not None:
            kind, value = spec.upload
            inputs.append({"name": "upload", "type": kind, "widget": {"name": "upload"}, "link": None})
            values.append(value)
        outputs = [
            {
                "name": name,
                "type": kind,
                "links": [row[0] for row in link_rows if row[1] == node.id and row[2] == i] or None,
            }
            for i, (name, kind) in enumerate(spec.outputs)
        ]
        ui_node = {
            "id": node.id,
            "type": node.type,
            "pos": list(node.pos),
            "size": list(node.size),
            "flags": {},
            "order": order[node.id],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": node.type},
            "widgets_values": values,
        }
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append(ui_node)
    # the notes first in the file (and top left on the canvas): the first thing a template shows
    ui_nodes[:0] = [
        {
            "id": note.id,
            "type": NOTE,
            "pos": list(note.pos),
            "size": list(note.size),
            "flags": {},
            "order": len(graph.nodes) + index,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": ["\n\n".join((note.widgets["text"], model_files(graph, nodes), cpu_time(graph)))],
            "color": "#432",
            "bgcolor": "#653",
        }
        for index, note in enumerate(graph.notes)
    ]
    for row in link_rows:  # the input slot index, now that every node's input list is known
        ui_node = next(n for n in ui_nodes if n["id"] == row[3])
        row[4] = next(i for i, entry in enumerate(ui_node["inputs"]) if entry["name"] == row[4])
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"keyface/workflows/{graph.name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in ui_nodes),
        "last_link_id": len(link_rows),
        "nodes": ui_nodes,
        "links": link_rows,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40, 300]}},
        "version": 0.4,
    }


def api_workflow(graph: Graph, nodes: dict, titles: dict[str, str]) -> dict:
    specs = {node.id: node_spec(node.type, nodes) for node in graph.nodes}
    prompt = {}
    for node in sorted(graph.nodes, key=lambda n: n.id):
        inputs = {}
        for slot in specs[node.id].inputs:
            link = next(
                ((src, out) for src, out, dst, name in graph.links if dst == node.id and name == slot.name), None
            )
            if link is not None:
                src, output = link
                inputs[slot.name] = [str(src), [name for name, _ in specs[src].outputs].index(output)]
            elif slot.frontend_widget:
                inputs[slot.name] = ""  # what the frontend sends for its audio player
            elif is_widget(slot):
                inputs[slot.name] = node.widgets.get(slot.name, slot.default)
        prompt[str(node.id)] = {
            "class_type": node.type,
            "inputs": inputs,
            "_meta": {"title": node.title or titles[node.type]},
        }
    return prompt


# --------------------------------------------------------------------------------------------------- graphs

EMOTION_CURVE = json.dumps(
    {
        "format": "keyface-emotion-v1",
        "interpolation": "smooth",
        "accentuate": 1.0,
        "valence": [[0.0, 0.0], [4.0, 0.85], [10.0, 0.85], [14.0, -0.85]],
        "arousal": [[0.0, 0.0], [4.0, 0.75], [10.0, 0.75], [14.0, -0.35]],
    }
)


def base_nodes(audio_file: str = SPEECH, sampler: dict | None = None) -> list[Node]:
    """Portrait -> face crop; models; audio -> features; keyframes (previewed)."""
    return [
        Node(1, "LoadImage", (0, 0), (300, 330), {"image": PORTRAIT}),
        Node(2, "KeyFaceCropFace", (330, 0), (300, 270)),
        Node(3, "KeyFaceModelLoader", (0, 380), (330, 270)),
        Node(4, "KeyFaceLoadAudio", (360, 380), (300, 250), {"audio": audio_file}),
        Node(5, "KeyFaceKeyframeSampler", (700, 120), (320, 280), sampler or {}),
        Node(8, "PreviewImage", (1060, 420), (300, 300), title="Keyframes"),
    ]


# The examples shipped with two segments per call, the node's default then (now 0, auto); kept so that saved
# job folders and results of the shipped graphs stay the same.
SHIPPED_INTERPOLATOR = {"segments_per_call": 2}

BASE_LINKS = [
    (1, "IMAGE", 2, "image"),
    (3, "model", 4, "model"),
    (3, "model", 5, "model"),
    (2, "face", 5, "image"),
    (4, "features", 5, "audio"),
    (5, "keyframe_images", 8, "images"),
]


def note(node_id: int, pos: tuple[int, int], text: str, size: tuple[int, int] = (720, 630)) -> Node:
    return Node(node_id, NOTE, pos, size, {"text": text})


GRAPHS = [
    Graph(
        "keyface_portrait_speech",
        base_nodes()
        + [
            Node(6, "KeyFaceKeyframeInterpolator", (1060, 120), (320, 200), SHIPPED_INTERPOLATOR),
            Node(7, "KeyFaceVideoCombine", (1420, 120), (320, 420)),
        ],
        BASE_LINKS + [(5, "keyframes", 6, "keyframes"), (6, "video", 7, "video")],
        [
            note(
                20,
                (0, -680),
                "## KeyFace: portrait + speech\n\nRuns as shipped on the pack's sample inputs (put into ComfyUI's "
                f"input folder when the pack loads): a drawn portrait, `{PORTRAIT}`, and synthetic speech, "
                f"`{SPEECH}`. **Replace them with your own**: a portrait in **Load Image** and a recording (or a "
                "video's sound) in **KeyFace Load Audio**, both with their upload buttons. The weights go into "
                "`models/keyface/` (see KeyFace Model Loader's help). The video is written to `output/video/` and "
                "plays in **KeyFace Video Combine**.",
            )
        ],
    ),
    Graph(
        "keyface_emotion_curve",
        base_nodes(SPEECH_LONG)
        + [
            Node(9, "KeyFaceEmotionCurve", (360, 680), (440, 360), {"emotion": EMOTION_CURVE, "duration": 19.2}),
            Node(6, "KeyFaceKeyframeInterpolator", (1060, 120), (320, 200), SHIPPED_INTERPOLATOR),
            Node(7, "KeyFaceVideoCombine", (1420, 120), (320, 420), {"filename_prefix": "video/KeyFace_emotion"}),
        ],
        BASE_LINKS
        + [
            (4, "duration", 9, "duration"),
            (9, "emotion", 5, "emotion"),
            (5, "keyframes", 6, "keyframes"),
            (6, "video", 7, "video"),
            (2, "crop", 7, "crop"),
        ],
        [
            note(
                20,
                (0, -680),
                "## Emotion across the clip\n\nThe curve goes from neutral to happy (4-10 s) to sad "
                "(from 14 s). Drag the points in **KeyFace Emotion Curve**, or type e.g. `neutral at 0 s, happy at "
                "4 s, sad at 14 s`. Its duration comes from the audio. **KeyFace Video Combine** pastes the animated "
                f"face back into the full portrait (crop input). Runs as shipped on the sample inputs `{PORTRAIT}` "
                f"and `{SPEECH_LONG}` (17 s); **replace them** with your portrait in **Load Image** and your "
                "recording in **KeyFace Load Audio**.",
            )
        ],
    ),
    Graph(
        "keyface_long_form_upscaled",
        base_nodes(SPEECH_LONG, {"keyframe_image_size": 0})
        + [
            Node(6, "KeyFaceKeyframeInterpolator", (1060, 120), (320, 200), {"segments_per_call": 4}),
            Node(10, "UpscaleModelLoader", (1060, 380), (320, 60)),
            Node(7, "KeyFaceVideoCombine", (1420, 120), (320, 420), {"filename_prefix": "video/KeyFace_long"}),
        ],
        BASE_LINKS
        + [
            (5, "keyframes", 6, "keyframes"),
            (6, "video", 7, "video"),
            (10, "UPSCALE_MODEL", 7, "upscale_model"),
        ],
        [
            note(
                20,
                (0, -680),
                "## Long form, upscaled\n\nFor minutes or hours of speech: the keyframes are not decoded for "
                "preview (keyframe_image_size 0), four segments go through the network per call, and **KeyFace "
                "Video Combine** upscales every frame with the upscale model while it writes the mp4, so memory "
                "stays flat. After Cancel, queue again: finished work resumes from the job folder (deleted once "
                "the video is written; turn on keep_job_folder in the Keyframe Interpolator to keep it).\n\n"
                f"**Needs an upscale model**: `{UPSCALE_MODEL}` in `models/upscale_models/`, from the Real-ESRGAN "
                "releases on GitHub (xinntao/Real-ESRGAN, release v0.1.0). Or pick any 2x/4x model listed in "
                "**Load Upscale Model**, or delete that node to write the frames at the model's 512 px.\n\n"
                f"Runs on the sample inputs `{PORTRAIT}` and `{SPEECH_LONG}` (17 s); **replace them** with your "
                "portrait in **Load Image** and your long recording in **KeyFace Load Audio**.",
            )
        ],
    ),
    Graph(
        "keyface_long_upscaled_batches",
        base_nodes(SPEECH_LONG, {"keyframe_image_size": 0})
        + [
            Node(6, "KeyFaceKeyframeInterpolator", (1060, 120), (320, 200), {"segments_per_call": 4}),
            Node(9, "KeyFaceFrameBatches", (1420, 120), (300, 160), {"batch_size": 32}),
            Node(10, "UpscaleModelLoader", (1420, 330), (300, 60)),
            Node(11, "ImageUpscaleWithModel", (1760, 120), (300, 60)),
            Node(7, "KeyFaceCollect", (2100, 120), (320, 400), {"filename_prefix": "video/KeyFace_batches"}),
        ],
        BASE_LINKS
        + [
            (5, "keyframes", 6, "keyframes"),
            (6, "video", 9, "video"),
            (9, "images", 11, "image"),
            (10, "UPSCALE_MODEL", 11, "upscale_model"),
            (11, "IMAGE", 7, "images"),
            (9, "batch", 7, "batch"),
        ],
        [
            note(
                20,
                (0, -280),
                "## Long video through any image node, in batches\n\n**KeyFace Frame Batches** sends the video "
                "through core **Upscale Image (using Model)** 32 frames at a time and **KeyFace Collect** joins "
                "the batches into one mp4 with the audio, so memory holds one batch however long the video is "
                "(a minute of 512 px video is 4.7 GB as one image batch, 75 GB upscaled 4x). Queue once: each "
                "run does one batch and Collect queues the next; the queue shows one run per batch. After "
                "Cancel, queue again to resume. Put any image nodes (face restore, colour match) between the "
                "two instead.\n\n"
                f"**Needs an upscale model**: `{UPSCALE_MODEL}` in `models/upscale_models/`, from the Real-ESRGAN "
                "releases on GitHub (xinntao/Real-ESRGAN, release v0.1.0), or any model **Load Upscale Model** "
                "lists. Processed frames wait on disk (lossless) until the last batch: keep some GB free.\n\n"
                f"Runs on the sample inputs `{PORTRAIT}` and `{SPEECH_LONG}` (17 s); **replace them** with your "
                "portrait and your recording (60 s or hours).",
            )
        ],
    ),
    Graph(
        "keyface_edit_keyframes",
        base_nodes()
        + [
            Node(11, "ImageFromBatch", (1060, 760), (270, 100), {"batch_index": 0, "length": 1}, "Keyframes before"),
            Node(12, "ImageFromBatch", (1060, 890), (270, 100), {"batch_index": 1, "length": 1}, "Keyframe to edit"),
            Node(13, "ImageSharpen", (1360, 890), (270, 110), {"sharpen_radius": 2, "alpha": 1.5}, "Your edit"),
            Node(14, "ImageFromBatch", (1060, 1020), (270, 100), {"batch_index": 2, "length": 4096}, "Keyframes after"),
            Node(15, "ImageBatch", (1660, 800), (160, 50)),
            Node(16, "ImageBatch", (1860, 900), (160, 50)),
            Node(6, "KeyFaceKeyframeInterpolator", (1860, 120), (320, 220), SHIPPED_INTERPOLATOR),
            Node(7, "KeyFaceVideoCombine", (2220, 120), (320, 420), {"filename_prefix": "video/KeyFace_edited"}),
        ],
        BASE_LINKS
        + [
            (5, "keyframe_images", 11, "image"),
            (5, "keyframe_images", 12, "image"),
            (12, "IMAGE", 13, "image"),
            (5, "keyframe_images", 14, "image"),
            (11, "IMAGE", 15, "image1"),
            (13, "IMAGE", 15, "image2"),
            (15, "IMAGE", 16, "image1"),
            (14, "IMAGE", 16, "image2"),
            (5, "keyframes", 6, "keyframes"),
            (16, "IMAGE", 6, "edited_keyframes"),
            (6, "video", 7, "video"),
        ],
        [
            note(
                20,
                (0, -680),
                "## Inspect and edit keyframes\n\n**Keyframes** shows every keyframe (one per 13 "
                "frames). Keyframe 1 (video frame 13) is taken out, sharpened as a stand-in for your retouch, and "
                "put back in place; the interpolator replaces the keyframes that changed and the motion follows. "
                "Replace **Image Sharpen** with any edit (or save the keyframes, retouch them in an image editor and "
                "load them back), keeping the number and order of the images. Needs audio of at least three "
                f"keyframes (1.1 s). Runs on the sample inputs `{PORTRAIT}` and `{SPEECH}`; **replace them** with "
                "your portrait in **Load Image** and your recording in **KeyFace Load Audio**.",
            )
        ],
    ),
]


def main() -> None:
    nodes = PACK.NODE_CLASS_MAPPINGS
    titles = {**CORE_TITLES, **PACK.NODE_DISPLAY_NAME_MAPPINGS}
    (ROOT / "api").mkdir(exist_ok=True)
    for graph in GRAPHS:
        (ROOT / f"{graph.name}.json").write_text(json.dumps(ui_workflow(graph, nodes), indent=1) + "\n")
        (ROOT / "api" / f"{graph.name}.json").write_text(
            json.dumps(api_workflow(graph, nodes, titles), indent=1) + "\n"
        )
        print(f"wrote workflows/{graph.name}.json and workflows/api/{graph.name}.json")


if __name__ == "__main__":
    main()
