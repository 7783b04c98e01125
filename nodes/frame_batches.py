"""KeyFace Frame Batches -> (any IMAGE nodes) -> KeyFace Collect: a long video through per-frame nodes in bounded memory.

The loop is ComfyUI's queue: one run of the prompt processes one batch. Frame Batches outputs the first batch not
stored yet (it runs on every queue: its fingerprint never repeats), the nodes in between process it, and Collect
stores the result losslessly in a batch folder (:class:`keyface.frame_batches.BatchStore`) and, unless it was the
last batch, puts the same prompt on the queue again. After the last batch Collect joins the batches into one mp4
with the audio and deletes the folder. The folder is named by the source, the batch size and the whole prompt, so a
cancelled run resumes at the first missing batch when the same prompt is queued again, and a changed prompt starts
over. See docs/long_videos.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from comfy_api.v0_0_2 import io

from keyface.errors import InputError

from . import host
from .common import CATEGORY, image_to_uint8, images_from_pixels, node_function, uint8_to_image
from .handles import VIDEO
from .job_folders import jobs_root, video_written
from .video import DEFAULT_PREFIX, workflow_metadata

logger = logging.getLogger(__name__)

FRAME_BATCH = io.Custom("KEYFACE_FRAME_BATCH")
DEFAULT_BATCH_SIZE = 32  # 32 frames of 512 px are 100 MB as IMAGE, 1.6 GB once upscaled 4x
MAX_BATCH_SIZE = 4096
BATCHES_FOLDER = "batches"


@dataclass(frozen=True)
class FrameBatch:
    """What Collect needs of the batch Frame Batches sent: the store, which batch, and the audio to mux.

    ``audio`` is a :class:`keyface.video.AudioTrack` (a file source: a :class:`~keyface.video.StreamedAudioTrack`) or None; ``video`` the KeyFace video handle or None.
    """

    store: Any  # keyface.frame_batches.BatchStore
    index: int
    audio: Any
    video: Any = None

    @property
    def is_last(self) -> bool:
        return self.index == self.store.plan.num_batches - 1

    def __repr__(self) -> str:
        return f"FrameBatch({self.index + 1} of {self.store.plan.num_batches}, {self.store.folder})"


def _batches_root() -> Path:
    """``batches`` beside the job folders (not inside: the job root's pruning must not count it as a job)."""
    return jobs_root().parent / BATCHES_FOLDER


def _file_source(path_text: str):
    """(path, fps, frames, audio track) of a video file."""
    from keyface.media import probe_media
    from keyface.video import StreamedAudioTrack

    path = Path(path_text.strip()).expanduser()
    if not path.is_file():
        raise InputError(f"file: {path} does not exist; give the path of a video file (mp4, mov, mkv, webm)")
    info = probe_media(path)
    if info.video is None or info.video.num_frames < 1:
        raise InputError(f"file: {path} has no video frames")
    audio = StreamedAudioTrack(path) if info.audio is not None else None  # never decoded whole
    return path.absolute(), info.video.fps, info.video.num_frames, audio


class KeyFaceFrameBatches(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KeyFaceFrameBatches",
            display_name="KeyFace Frame Batches",
            category=CATEGORY,
            description=(
                "Sends a long video through any IMAGE nodes (upscalers, face restorers, colour match) batch by "
                "batch, so only batch_size frames are in memory: wire its images through those nodes into KeyFace "
                "Collect and its batch output straight into Collect, then queue once. Each queued run processes "
                "the next batch and Collect queues the prompt again until the last one (the queue shows one run "
                "per batch). Finished batches are kept on disk: after Cancel, queue the same prompt again to "
                "resume; changing any widget starts over. Takes a KeyFace video, a core VIDEO or a file path."
            ),
            inputs=[
                io.Int.Input(
                    "batch_size",
                    default=DEFAULT_BATCH_SIZE,
                    min=1,
                    max=MAX_BATCH_SIZE,
                    tooltip="Frames per batch (25 per second). Memory holds one batch, as processed by the nodes "
                    "in between: lower it if they run out of memory.",
                ),
                VIDEO.Input(
                    "video", optional=True, tooltip="The video from KeyFace Keyframe Interpolator (decoded per batch)."
                ),
                io.Video.Input("core_video", optional=True, tooltip="Or a core VIDEO that comes from a file."),
                io.String.Input(
                    "file", default="", optional=True, tooltip="Or the path of a video file (its audio is kept)."
                ),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="The frames of this batch, float RGB."),
                FRAME_BATCH.Output(
                    "batch", display_name="batch", tooltip="Which batch this is: connect to KeyFace Collect."
                ),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        """Never the same (NaN != NaN): every queued run takes the next batch."""
        return float("nan")  # a new object each time: a cached NaN object would equal itself

    @classmethod
    @node_function()
    def execute(cls, batch_size, video=None, core_video=None, file="") -> io.NodeOutput:
        from keyface.frame_batches import BatchPlan, BatchStore
        from keyface.jobs import fingerprint

        sources = [name for name, value in (("video", video), ("core_video", core_video), ("file", file)) if value]
        if len(sources) != 1:
            raise InputError("video / core_video / file: connect or fill in exactly one of them")
        if video is not None:
            from keyface.video import AudioTrack

            fps, num_frames = Fraction(video.fps), video.num_frames
            audio = AudioTrack.muxable(video.clip.waveform, video.clip.sample_rate)
            source = {"keyface_job": str(video.job.folder.path), "frames": num_frames}
            path = None
        else:
            if core_video is not None:
                file = core_video.get_stream_source()
                if not isinstance(file, str):
                    raise InputError("core_video: this VIDEO is not backed by a file; save it first (Save Video)")
            from keyface.files import file_identity

            path, fps, num_frames, audio = _file_source(file)
            source = {"file": str(path), "identity": file_identity(path)}
        plan = BatchPlan(num_frames, batch_size)
        hidden = cls.hidden
        key = {
            "source": source,
            "batch_size": batch_size,
            "node": hidden.unique_id,
            "prompt": host.submitted_prompt(hidden.prompt or {}),
        }
        store = BatchStore(_batches_root() / fingerprint(key), plan, fps, source)
        # every batch stored but not joined yet (interrupted while joining): redo the last one, Collect then joins
        index = store.next_batch()
        index = plan.num_batches - 1 if index is None else index
        start, stop = plan.frame_range(index)
        logger.info("KeyFace Frame Batches: batch %d of %d (frames %d..%d)", index + 1, plan.num_batches, start, stop)
        if video is not None:
            import torch

            with video.bundle.on_device():
                images = images_from_pixels(torch.stack(list(video.job.frames(start, stop))))
        else:
            from keyface.frame_batches import read_video_frames

            images = uint8_to_image(read_video_frames(path, start, stop))  # (n, H, W, 3) too
        return io.NodeOutput(images, FrameBatch(store, index, audio, video))


class KeyFaceCollect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.video import DEFAULT_CRF

        return io.Schema(
            node_id="KeyFaceCollect",
            display_name="KeyFace Collect",
            category=CATEGORY,
            description=(
                "The end of a KeyFace Frame Batches loop: stores each processed batch losslessly on disk, queues "
                "the prompt again for the next batch, and after the last one writes all frames to an mp4 "
                "(H.264 + AAC, the source's audio) in ComfyUI's output folder, frame by frame. Frames may change "
                "size on the way (upscaled) but must keep their count. Needs disk for the processed frames "
                "(lossless) until the end. The queue runs only this node's branch again, not other outputs."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The processed frames of the batch."),
                FRAME_BATCH.Input("batch", tooltip="The batch output of KeyFace Frame Batches."),
                io.Int.Input(
                    "crf", default=DEFAULT_CRF, min=0, max=51, tooltip="H.264 quality of the mp4 (18 looks lossless)."
                ),
                io.String.Input(
                    "filename_prefix",
                    default=DEFAULT_PREFIX,
                    tooltip="Name of the file inside ComfyUI's output folder (as in KeyFace Video Combine).",
                ),
                io.Audio.Input("audio", optional=True, tooltip="Sound track; default: the source video's audio."),
            ],
            outputs=[
                io.String.Output(
                    "path", display_name="path", tooltip="The mp4 written after the last batch (empty before)."
                )
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    @node_function()
    def execute(cls, images, batch, crf, filename_prefix, audio=None) -> io.NodeOutput:
        if not isinstance(batch, FrameBatch):
            raise InputError("batch: connect the batch output of KeyFace Frame Batches")
        if getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
            raise InputError("images: expected a non-empty IMAGE batch (frames, height, width, 3)")
        host.check_filename_prefix(filename_prefix)
        store, plan = batch.store, batch.store.plan
        store.save_batch(batch.index, (image_to_uint8(frame) for frame in images))
        if not batch.is_last:
            host.queue_prompt_again(cls.hidden.prompt, cls.hidden.extra_pnginfo, cls.hidden.unique_id)
            text = f"batch {batch.index + 1} of {plan.num_batches} stored; the next one is queued"
            return io.NodeOutput("", ui={"text": [text]})
        track = batch.audio
        if audio is not None:
            from keyface.audio.io import AudioClip
            from keyface.video import AudioTrack

            clip = AudioClip.from_comfy(audio, "audio")
            track = AudioTrack.muxable(clip.waveform, clip.sample_rate)
        height, width = images.shape[1:3]
        path, subfolder = host.save_path(filename_prefix, width, height, ".mp4")
        metadata = workflow_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo)
        store.finish(path, track, crf=crf, metadata=metadata)
        logger.info("KeyFace Collect: wrote %s (%d frames)", path, plan.num_frames)
        if batch.video is not None:
            video_written(batch.video)
        result = {"filename": path.name, "subfolder": subfolder, "type": "output"}
        return io.NodeOutput(str(path), ui={"images": [result], "animated": (True,)})
