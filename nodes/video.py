"""KeyFace Video Combine (frames -> mp4 in ComfyUI's output folder, streamed) and KeyFace Video to Images."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

from comfy_api.v0_0_2 import InputImpl, io, ui

from keyface.constants import VIDEO_FPS
from keyface.errors import InputError

from . import host
from .common import (
    CATEGORY,
    NodeProgress,
    check_widgets,
    image_to_uint8,
    images_from_pixels,
    node_function,
    reporting,
    uint8_to_image,
    widget_problem,
)
from .handles import CROP, VIDEO
from .job_folders import video_written

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "video/KeyFace"
MAX_FPS = 240.0
# validate_inputs default for `video`: ComfyUI passes a connected input as None while validating and leaves an
# unconnected one out, so this value means "not connected".
_NOT_CONNECTED = object()


def _frames_of_video(video, progress: NodeProgress, start: int = 0, stop: int | None = None) -> Iterator:
    """Float frames (3, H, W) of a KEYFACE_VIDEO, decoded on demand, reported on ``progress``."""
    with reporting(video.job, progress):
        yield from video.job.frames(start, stop)


def _check_video(video) -> None:
    if video is None:
        raise InputError("video: connect the video output of KeyFace Keyframe Interpolator")


def _frame_rate_problem(fps: float) -> str | None:
    """Why a KeyFace video cannot be written at ``fps`` (the models' rate is fixed), or None."""
    from keyface.generate import check_frame_rate

    try:
        check_frame_rate(fps)
    except InputError:
        return (
            f"fps: {fps:g} is not the rate of a KeyFace video, which is always {VIDEO_FPS} fps (the models' rate); "
            f"set fps to {VIDEO_FPS} and retime the video afterwards if you need another rate"
        )
    return None


class KeyFaceVideoCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.video import DEFAULT_CRF

        return io.Schema(
            node_id="KeyFaceVideoCombine",
            display_name="KeyFace Video Combine",
            category=CATEGORY,
            description=(
                "Writes the video to an mp4 (H.264 + AAC) in ComfyUI's output folder while it is decoded, frame by "
                "frame, so even hours of video never sit in memory. Takes a KeyFace video or any IMAGE batch; "
                "optionally upscales each frame with an upscale model and pastes the face back into the full "
                "portrait. The workflow is stored in the file: drag it onto ComfyUI to get the graph back."
            ),
            inputs=[
                io.Float.Input(
                    "fps",
                    default=float(VIDEO_FPS),
                    min=1.0,
                    max=MAX_FPS,
                    step=0.01,
                    tooltip="Frame rate for an IMAGE batch. A KeyFace video is always 25 fps (the models' "
                    "rate); another value is refused there.",
                ),
                io.Int.Input(
                    "crf",
                    default=DEFAULT_CRF,
                    min=0,
                    max=51,
                    tooltip="H.264 quality: lower is "
                    "better and larger (18 looks lossless, 23 is ffmpeg's default, 0 is lossless).",
                ),
                io.String.Input(
                    "filename_prefix",
                    default=DEFAULT_PREFIX,
                    tooltip="Name of the file inside "
                    "ComfyUI's output folder; sub-folders allowed ('video/KeyFace' -> "
                    "output/video/KeyFace_00001_.mp4). Paths leaving the output folder are refused.",
                ),
                VIDEO.Input("video", optional=True, tooltip="The video from KeyFace Keyframe Interpolator (streamed)."),
                io.Image.Input("images", optional=True, tooltip="Or any IMAGE batch (frames), written at fps."),
                io.Audio.Input(
                    "audio",
                    optional=True,
                    tooltip="Sound track. Default: the KeyFace video's own audio; none for an "
                    "IMAGE batch. Cut or padded with silence to the video's length.",
                ),
                io.UpscaleModel.Input(
                    "upscale_model",
                    optional=True,
                    tooltip="Optional upscale model (Load Upscale Model) run on "
                    "every frame while writing, before paste-back.",
                ),
                CROP.Input(
                    "crop",
                    optional=True,
                    tooltip="Crop info from KeyFace Crop Face: paste each frame back into the full "
                    "original picture while writing.",
                ),
            ],
            outputs=[
                io.Video.Output(
                    "core_video",  # "video" is the input's id; ids are unique across inputs and outputs
                    display_name="video",
                    tooltip="The written mp4 (audio muxed) as a core VIDEO, for Save Video, Get Video Components "
                    "and other video nodes.",
                )
            ],
            is_output_node=True,  # also asks for the hidden prompt and extra_pnginfo (the workflow)
        )

    @classmethod
    def validate_inputs(cls, fps=None, crf=None, filename_prefix=None, video=_NOT_CONNECTED):
        """Refuse the prompt before anything runs: fps and crf out of range, a filename prefix leaving the output
        folder, a KeyFace video at another rate than 25 fps. Linked values arrive as None and are checked when
        the node runs."""
        problem = widget_problem(cls, {"fps": fps, "crf": crf})
        if problem is None and filename_prefix is not None:
            try:
                host.check_filename_prefix(filename_prefix)
            except InputError as error:
                problem = str(error)
        if problem is None and fps is not None and video is not _NOT_CONNECTED:
            problem = _frame_rate_problem(fps)
        return problem or True

    @classmethod
    @node_function()
    def execute(cls, fps, crf, filename_prefix, video=None, images=None, audio=None, upscale_model=None, crop=None):
        from keyface.audio.io import AudioClip
        from keyface.video import AudioTrack, MapSink, Mp4Writer, to_uint8

        check_widgets(cls, {"fps": fps, "crf": crf})
        if (video is None) == (images is None):
            raise InputError("video / images: connect exactly one of them (a KeyFace video or an IMAGE batch)")
        if images is not None and (getattr(images, "ndim", 0) != 4 or images.shape[0] == 0):
            raise InputError("images: expected a non-empty ComfyUI IMAGE batch (frames, height, width, 3)")
        if video is not None:
            if problem := _frame_rate_problem(fps):
                raise InputError(problem)
            total, size = video.num_frames, (video.size, video.size)
        else:
            total, size = len(images), tuple(images.shape[1:3])
        track = None
        if audio is not None:
            clip = AudioClip.from_comfy(audio, "audio")
            track = AudioTrack.muxable(clip.waveform, clip.sample_rate)
        elif video is not None:
            track = AudioTrack.muxable(video.clip.waveform, video.clip.sample_rate)
        path, subfolder = host.save_path(filename_prefix, size[1], size[0], ".mp4")
        metadata = workflow_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo)
        writer = Mp4Writer(path, fps=fps, audio=track, crf=crf, metadata=metadata)
        sink = writer
        if crop is not None:
            sink = MapSink(crop.paste_back(), sink)
        if upscale_model is not None:
            sink = MapSink(_Upscaler(upscale_model), sink)
        progress = NodeProgress(total)
        models = video.bundle.on_device() if video is not None else contextlib.nullcontext()
        with models, sink:
            if video is not None:
                for pixels in _frames_of_video(video, progress):
                    sink.write(to_uint8(pixels))
            else:
                for index, frame in enumerate(images):
                    sink.write(image_to_uint8(frame))
                    progress.update(index + 1, total)
        logger.info("KeyFace: wrote %s (%d frames)", path, writer.frames_written)
        if video is not None:
            video_written(video)
        saved = ui.SavedResult(path.name, subfolder, io.FolderType.output)
        return io.NodeOutput(InputImpl.VideoFromFile(str(path)), ui=ui.PreviewVideo([saved]))


class _Upscaler:
    """Per-frame transform: uint8 frame -> the UPSCALE_MODEL's output (ComfyUI's ImageUpscaleWithModel)."""

    def __init__(self, upscale_model):
        self.upscale_model = upscale_model

    def __call__(self, frame):
        upscaled = host.upscale_image(self.upscale_model, uint8_to_image(frame)[None])
        return image_to_uint8(upscaled[0])


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """ComfyUI's convention: ``prompt`` and each extra_pnginfo entry (``workflow``) as JSON text."""
    if not host.metadata_enabled():
        return {}
    metadata = {key: json.dumps(value) for key, value in (extra_pnginfo or {}).items()}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    return metadata


class KeyFaceVideoToImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KeyFaceVideoToImages",
            display_name="KeyFace Video to Images",
            category=CATEGORY,
            description=(
                "Decodes a range of a KeyFace video into an IMAGE batch (and the matching audio), so any image node "
                "can follow: face restorers, upscalers, core Create Video / Save Video. Mind the memory: 1 minute at "
                "512 px is about 4.7 GB of frames; take the video in ranges or use Video Combine for long videos."
            ),
            inputs=[
                VIDEO.Input("video", tooltip="The video from KeyFace Keyframe Interpolator."),
                io.Int.Input("start", default=0, min=0, max=10**8, tooltip="First frame (25 per second)."),
                io.Int.Input("count", default=0, min=0, max=10**8, tooltip="Number of frames; 0 = to the end."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Frames start .. start + count - 1, float RGB."),
                io.Audio.Output(display_name="audio", tooltip="The audio of those frames."),
                io.Float.Output(display_name="fps", tooltip="The frame rate (25)."),
            ],
        )

    @classmethod
    @node_function()
    def execute(cls, video, start=0, count=0):
        import torch

        from keyface.media import samples_for_frames

        check_widgets(cls, {"start": start, "count": count})
        _check_video(video)
        if start >= video.num_frames:
            raise InputError(f"start: frame {start} is past the video's end ({video.num_frames} frames)")
        stop = video.num_frames if count == 0 else min(start + count, video.num_frames)
        progress = NodeProgress(stop - start)
        with video.bundle.on_device():
            frames = torch.stack(list(_frames_of_video(video, progress, start, stop)))
        clip = video.clip
        first, last = (samples_for_frames(frame, clip.sample_rate, video.fps) for frame in (start, stop))
        waveform = clip.waveform[:, first:last]
        audio = {"waveform": waveform[None].contiguous(), "sample_rate": clip.sample_rate}
        return io.NodeOutput(images_from_pixels(frames), audio, float(video.fps))
