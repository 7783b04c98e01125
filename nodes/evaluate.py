"""KeyFace Evaluate: identity drift, lip-sync measures and the emotion curve of a generated video, as a plot."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from keyface.errors import InputError

from . import host
from .common import CATEGORY, image_to_uint8, single_image, uint8_to_image

EVAL_SUBFOLDER = "eval"


def _weights_folder():
    """``<models>/keyface/eval``: the first KeyFace models folder that has one, else the first folder's."""
    folders = [root / EVAL_SUBFOLDER for root in host.model_roots()]
    return next((folder for folder in folders if folder.is_dir()), folders[0])


def _media_path(value: str):
    """An absolute path as is, else a file in ComfyUI's input folder (``name [output]`` understood)."""
    from pathlib import Path

    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else host.input_path(value.strip())


class KeyFaceEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.evaluate.tracking import DEFAULT_DETECT_EVERY

        return io.Schema(
            node_id="KeyFaceEvaluate",
            display_name="KeyFace Evaluate",
            category=CATEGORY,
            description=(
                "Measures a generated talking-head video: identity similarity to the reference over time (drift per "
                "minute), SyncNet LSE-C / LSE-D and a mouth-open vs audio-energy correlation over time, and the "
                "emotion curve stored in the file, and LipScore against a real video. Weights are read from "
                "models/keyface/eval (arcface_r50.pth, syncnet_v2.model, vsr_trlrs2lrs3vox2avsp_base_updated.pth; "
                "2dfan2.pth and 20words_mean_face.npy give LipScore the paper's mouth crop); measures whose weights "
                "are missing are skipped and listed in the report."
            ),
            inputs=[
                io.String.Input(
                    "video_path",
                    default="",
                    tooltip="The video file to measure (absolute, or relative to ComfyUI's input folder; "
                    "'name [output]' for the output folder). Leave empty and connect images + audio instead.",
                ),
                io.Int.Input(
                    "detect_every",
                    default=DEFAULT_DETECT_EVERY,
                    min=1,
                    max=100,
                    tooltip="Run the face detector on every n-th frame; the face is interpolated in between.",
                ),
                io.Image.Input(
                    "images", optional=True, tooltip="The video as frames (25 fps), used when video_path is empty."
                ),
                io.Audio.Input("audio", optional=True, tooltip="The video's audio, with images."),
                io.Image.Input(
                    "reference_image", optional=True, tooltip="The portrait the video was made from (one image)."
                ),
                io.String.Input(
                    "ground_truth_path",
                    default="",
                    optional=True,
                    tooltip="A real video of the same speech (25 fps) for LipScore; same rules as video_path.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="plot",
                    tooltip="One figure with every curve on a shared time axis (connect Preview Image or Save Image).",
                ),
                io.String.Output(
                    display_name="report_json",
                    tooltip="The report's numbers as JSON text (per second, per minute, per window, and what was "
                    "skipped).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, video_path="", detect_every=5, images=None, audio=None, reference_image=None, ground_truth_path=""
    ):
        from keyface.evaluate import EvaluationOptions, evaluate_file, evaluate_frames
        from keyface.evaluate.plot import render_image

        options = EvaluationOptions(weights=_weights_folder(), detect_every=int(detect_every))
        reference = None if reference_image is None else single_image(reference_image, "reference_image")
        ground_truth = _media_path(ground_truth_path) if ground_truth_path.strip() else None
        if video_path.strip():
            report = evaluate_file(
                _media_path(video_path), reference_image=reference, ground_truth=ground_truth, options=options
            )
        elif images is not None:
            waveform = None
            if audio is not None:
                from keyface.audio.io import AudioClip, to_encoder_waveform

                waveform = to_encoder_waveform(AudioClip.from_comfy(audio, "audio")).numpy()
            frames = (image_to_uint8(frame) for frame in images)
            report = evaluate_frames(
                frames, waveform, reference_image=reference, ground_truth=ground_truth, options=options, source="images"
            )
        else:
            raise InputError("video_path: give a video file, or leave it empty and connect images (and audio)")
        return io.NodeOutput(uint8_to_image(render_image(report))[None], report.to_json())
