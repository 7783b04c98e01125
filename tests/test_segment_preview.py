"""The preview video of finished segments while stage 2 runs (``keyface.preview``) and how the Keyframe
Interpolator shows it in ComfyUI: an ``executed`` message per preview through a stand-in ``PromptServer``, the
final preview as the node's ``ui`` output, files in the temp folder that re-read with the right frames."""

from __future__ import annotations

import functools
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_conditioning
from PIL import Image
from test_nodes import SPEECH_FILE, comfy_root, host, model, run, workspace  # noqa: F401 (fixtures)

from keyface import preview as preview_module
from keyface.loading import find_model_files, load_models
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.preview import FrameRing, PreviewSettings, SegmentPreview, write_animated_webp
from keyface.progress import INTERPOLATION, KEYFRAMES, ProgressEvent

FRAMES = 66  # five segments
SETTINGS = GenerationSettings(num_steps=10, segments_per_call=1)
PREVIEW = PreviewSettings(seconds=1.0, frame_step=2, max_side=40, every_segments=1, min_interval=0.0)
CAPACITY = 13  # ceil(1 s x 25 fps / 2)


def read_webp(path: Path) -> tuple[list[np.ndarray], int]:
    """The frames of an animated WebP (uint8 RGB) and its frame duration in milliseconds."""
    with Image.open(path) as image:
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.array(image.convert("RGB")))
        return frames, image.info["duration"]


class CountingDecoder:
    """Wraps a FrameDecoder, counting the frames it decodes."""

    def __init__(self, decoder):
        self.decoder, self.frames = decoder, 0

    def decode(self, latents):
        self.frames += len(latents)
        return self.decoder.decode(latents)

    def __getattr__(self, name):
        return getattr(self.decoder, name)


class Run:
    """Stage 2 of a FRAMES-frame job with a preview listening: what was published, and when."""

    def __init__(self, models, folder: Path):
        self.job = TalkingHeadJob(models, random_conditioning(models, FRAMES), SETTINGS, job_folder=folder / "job")
        self.job.generate_keyframes()
        self.folder = folder / "temp"
        self.published: list[tuple[Path, list[np.ndarray], int, int]] = []  # path, frames, ms, ring length
        self.preview = SegmentPreview(self.job, self.folder, self.record, PREVIEW)
        self.decoder = CountingDecoder(models.decoder)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(models, "decoder", self.decoder)
            self.job.progress_callback = self.preview.on_event
            self.job.interpolate()
            self.final = self.preview.finish()

    def record(self, path: Path) -> None:
        frames, duration = read_webp(path)
        self.published.append((path, frames, duration, len(self.preview.ring)))


@pytest.fixture(scope="module")
def models(demo_models):
    return load_models(find_model_files(demo_models))


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory) -> Run:
    return Run(models, tmp_path_factory.mktemp("preview"))


# ------------------------------------------------------------------------------------------- the library


def test_settings_give_the_ring_size_and_rate():
    assert PREVIEW.capacity == CAPACITY and PREVIEW.fps == 12.5
    assert PreviewSettings().capacity == 25 and PreviewSettings(seconds=0.01).capacity == 1


def test_the_ring_keeps_only_the_last_frames():
    ring = FrameRing(3)
    assert len(ring) == 0 and ring.last_index == -1
    for index in range(100):
        ring.push(index, np.full((2, 2, 3), index, np.uint8))
        assert len(ring) <= 3
    assert ring.last_index == 99 and [int(frame[0, 0, 0]) for frame in ring.frames()] == [97, 98, 99]


def test_an_animated_webp_is_written_atomically_and_reads_back(tmp_path):
    frames = [np.full((24, 40, 3), level, np.uint8) for level in (20, 120, 220)]
    path = write_animated_webp(tmp_path / "p.webp", frames, fps=12.5, quality=90)
    decoded, duration = read_webp(path)
    assert len(decoded) == 3 and decoded[0].shape == (24, 40, 3) and duration == 80
    assert [abs(int(f.mean()) - level) <= 2 for f, level in zip(decoded, (20, 120, 220), strict=True)] == [True] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.webp"]  # no temporary file left


def test_previews_are_published_as_segments_finish(finished):
    segments = len(finished.job.schedule.segments)
    assert segments == 5
    # one call per segment: at each call after the first a segment more is finished; the final one is not
    # published but returned (the host shows it as the result)
    assert len(finished.published) == segments - 1
    counts = [len(frames) for _, frames, _, _ in finished.published]
    assert counts == sorted(counts) and counts[-1] == CAPACITY and counts[0] >= 6  # segment 0: frames 0, 2, ..12
    for path, frames, duration, _ in finished.published:
        assert frames[0].shape == (40, 40, 3) and duration == 80, path  # 64 px frames downscaled to 40
    assert finished.final.is_file() and finished.final not in [path for path, *_ in finished.published]
    assert len(read_webp(finished.final)[0]) == CAPACITY
    kept = sorted(finished.folder.iterdir())
    assert kept == sorted([finished.published[-1][0], finished.final])  # older previews are removed


def test_the_final_preview_shows_the_last_finished_frames(finished):
    job = finished.job
    frames, _ = read_webp(finished.final)
    indices = [i for i in range(job.num_frames) if i % PREVIEW.frame_step == 0][-CAPACITY:]
    expected = torch.stack(list(job.frames(indices[0], job.num_frames)))[:: PREVIEW.frame_step]
    small = torch.nn.functional.interpolate(expected, size=(40, 40), mode="area")
    expected = (small.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    error = np.abs(np.stack(frames).astype(np.float32) - expected).mean()
    shifted = np.abs(np.stack(frames[1:]).astype(np.float32) - expected[:-1]).mean()
    assert error < 12 and error < shifted / 2, (error, shifted)  # lossy WebP, but these frames, not their neighbours


def test_memory_and_decoding_are_bounded_by_the_ring(finished, models, tmp_path):
    assert finished.preview.ring.capacity == CAPACITY
    assert all(ring_length <= CAPACITY for *_, ring_length in finished.published)
    wanted = math.ceil(FRAMES / PREVIEW.frame_step)
    assert finished.decoder.frames <= wanted  # every preview frame decoded once, no frame twice
    # a preview of a job whose segments were all made earlier decodes only the last seconds, however long the video
    resumed = TalkingHeadJob(models, finished.job.conditioning, SETTINGS, job_folder=finished.job.folder.path)
    published = []
    late = SegmentPreview(resumed, tmp_path, published.append, PREVIEW)
    decoder = CountingDecoder(models.decoder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "decoder", decoder)
        final = late.finish()
    assert published == [] and decoder.frames == CAPACITY and len(read_webp(final)[0]) == CAPACITY


def test_a_preview_waits_for_its_interval_and_new_segments(finished, tmp_path):
    now = {"t": 0.0}
    published = []
    settings = PreviewSettings(max_side=16, every_segments=2, min_interval=10.0)
    preview = SegmentPreview(finished.job, tmp_path, published.append, settings, clock=lambda: now["t"])
    event = ProgressEvent(INTERPOLATION, 1, 10)
    for t, stage, expected in (
        (5, INTERPOLATION, 0),
        (11, KEYFRAMES, 0),
        (11, INTERPOLATION, 1),
        (30, INTERPOLATION, 1),
    ):
        now["t"] = t
        preview.on_event(ProgressEvent(stage, event.completed, event.total))
        assert len(published) == expected, t  # at 30 s: nothing new finished since the preview at 11 s


def test_a_preview_that_cannot_be_written_stops_without_stopping_the_job(finished, tmp_path, caplog):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    published = []
    preview = SegmentPreview(finished.job, blocked, published.append, PREVIEW)
    preview.on_event(ProgressEvent(INTERPOLATION, 1, 10))  # no exception reaches the job
    assert preview.finish() is None and published == []
    assert "no more segment previews for this run" in caplog.text


# --------------------------------------------------------------------------------------------- in ComfyUI


@pytest.fixture
def comfyui(monkeypatch, tmp_path):
    """ComfyUI's modules as far as the preview uses them: the temp and user folders, the running node, a client."""
    sent = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_temp_directory = lambda: str(tmp_path / "temp")
    folder_paths.get_user_directory = lambda: str(tmp_path / "user")
    server = types.ModuleType("server")
    instance = types.SimpleNamespace(
        client_id="client-1",
        send_sync=lambda *message: sent.append(message),
        send_progress_text=lambda text, node_id: sent.append(("progress_text", text, node_id)),
    )
    server.PromptServer = types.SimpleNamespace(instance=instance)
    context = {"now": types.SimpleNamespace(prompt_id="prompt-1", node_id="9", list_index=None)}
    execution = types.ModuleType("comfy_execution.utils")
    execution.get_executing_context = lambda: context["now"]
    for name, module in (("folder_paths", folder_paths), ("server", server), ("comfy_execution.utils", execution)):
        monkeypatch.setitem(sys.modules, name, module)
    host._comfy.cache_clear()
    yield types.SimpleNamespace(sent=sent, temp=tmp_path / "temp", context=context, instance=instance)
    host._comfy.cache_clear()


def test_node_output_is_sent_as_comfyui_sends_a_finished_node_s_ui(comfyui):
    output = {"images": [{"filename": "a.webp", "subfolder": "", "type": "temp"}], "animated": (True,)}
    host.show_node_output(output)
    assert comfyui.sent == [
        ("executed", {"node": "9", "display_node": "9", "output": output, "prompt_id": "prompt-1"}, "client-1")
    ]
    comfyui.instance.client_id = None  # nobody to show it to: the executor sends nothing either
    host.show_node_output(output)
    comfyui.context["now"] = None  # no node running
    host.show_node_output(output)
    assert len(comfyui.sent) == 1


def test_no_preview_outside_comfyui():
    from test_nodes import PACK_NAME

    generate = sys.modules[f"{PACK_NAME}.nodes.generate"]
    assert host.temp_dir() is None and generate.segment_preview(object()) is None
    host.show_node_output({"images": []})  # nothing to send to, and no error


@pytest.fixture
def keyframes(model):  # noqa: F811 (fixture)
    """Stage 1 of 15 frames (two segments), run before ComfyUI's stand-in modules are installed."""
    features = run("KeyFaceLoadAudio", model=model, audio=SPEECH_FILE)[1]
    return run("KeyFaceKeyframeSampler", model=model, image=torch.rand(1, 64, 64, 3), audio=features, seed=7)[0]


def test_the_interpolator_shows_finished_segments_while_it_runs(keyframes, comfyui, monkeypatch):
    eager = functools.partial(PreviewSettings, every_segments=1, min_interval=0.0)
    monkeypatch.setattr(preview_module, "PreviewSettings", eager)
    result = run("KeyFaceKeyframeInterpolator", keyframes=keyframes, segments_per_call=1)
    messages = [message for message in comfyui.sent if message[0] == "executed"]
    assert len(messages) == 1  # after the first segment; the final preview is the node's ui output
    for _, data, client in messages:
        assert (data["node"], data["prompt_id"], client) == ("9", "prompt-1", "client-1")
        (shown,) = data["output"]["images"]
        assert shown["type"] == "temp" and shown["subfolder"] == "" and data["output"]["animated"] == (True,)
    final = result["ui"]
    assert final["animated"] == (True,) and final["images"][0]["type"] == "temp"
    assert final["images"][0]["filename"] != messages[0][1]["output"]["images"][0]["filename"]
    frames, _ = read_webp(comfyui.temp / final["images"][0]["filename"])
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)  # frames 0, 2, .. 14 of 15; 64 px kept
    (video,) = result["result"]
    assert video.num_frames == 15
