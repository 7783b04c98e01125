"""KeyFace Keyframe Sampler (stage 1) and KeyFace Keyframe Interpolator (stage 2).

Both run a :class:`keyface.pipeline.TalkingHeadJob` whose finished keyframe batches and segments live in a job
folder (ComfyUI's ``user/keyface/jobs/<fingerprint>``, size-capped; see :mod:`.job_folders`), so a cancelled run
resumes where it stopped and nothing large is held in RAM. Between the two nodes an artist may edit keyframes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from comfy_api.v0_0_2 import io, ui

from keyface.constants import VIDEO_FPS
from keyface.errors import InputError

from . import host
from .common import (
    CATEGORY,
    NodeProgress,
    check_widgets,
    node_function,
    portrait_input,
    reporting,
    single_image,
)
from .handles import (
    AUDIO_FEATURES,
    EMOTION,
    KEYFRAMES,
    MODEL,
    VIDEO,
    KeyframesHandle,
    VideoHandle,
)
from .job_folders import jobs_root

logger = logging.getLogger(__name__)

SEED_MAX = 0xFFFFFFFFFFFFFFFF
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
SEGMENTS_PER_CALL_MAX = 64
# GenerationSettings fields -> the widget that sets them, for library messages about a value.
SAMPLER_WIDGETS = {"num_steps": "steps"}
INTERPOLATOR_WIDGETS = {"interpolation_steps": "steps", "interpolation_seed": "seed"}


def _seed_input(name: str, tooltip: str) -> io.Int.Input:
    from keyface.noise import DEFAULT_SEED

    return io.Int.Input(name, default=DEFAULT_SEED, min=0, max=SEED_MAX, tooltip=tooltip)


def _steps_input(name: str, tooltip: str) -> io.Int.Input:
    from keyface.sampling import DEFAULT_NUM_STEPS

    return io.Int.Input(name, default=DEFAULT_NUM_STEPS, min=DEFAULT_NUM_STEPS, max=MAX_STEPS, tooltip=tooltip)


def _scale_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=MAX_GUIDANCE, step=0.1, tooltip=tooltip)


class KeyFaceKeyframeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.sampling import KEYFRAME_AUDIO_SCALE, KEYFRAME_IDENTITY_SCALE
        from keyface.schedule import ALIGNED, SCHEDULE_MODES

        return io.Schema(
            node_id="KeyFaceKeyframeSampler",
            display_name="KeyFace Keyframe Sampler",
            category=CATEGORY,
            description=(
                "Stage 1: generates the keyframes of the whole video (one every 13 frames, about two per second) "
                "from the portrait, the audio features and the emotion curve. Shows each keyframe batch as it "
                "finishes and outputs the decoded keyframes as an image batch, to inspect or edit before the "
                "Keyframe Interpolator. Finished work is kept on disk: after Cancel the next run resumes."
            ),
            inputs=[
                MODEL.Input("model", tooltip="The KeyFace models from the Model Loader."),
                portrait_input(
                    "The portrait: one square face crop (KeyFace Crop Face), or a video whose first frame is the "
                    "portrait. A non-square image is centre-cropped; a batch of several is refused."
                ),
                AUDIO_FEATURES.Input(
                    "audio",
                    tooltip="Audio features from KeyFace Load Audio; they set the "
                    "video's length (25 frames per second).",
                ),
                _seed_input(
                    "seed",
                    "Random seed of the keyframes (and of the in-between frames, unless the "
                    "Interpolator is given another seed).",
                ),
                _steps_input("steps", "Sampler steps per keyframe batch (10 = the original's 11-level schedule)."),
                _scale_input(
                    "audio_scale",
                    KEYFRAME_AUDIO_SCALE,
                    "Audio guidance: how strongly the mouth and expression follow the speech.",
                ),
                _scale_input(
                    "identity_scale",
                    KEYFRAME_IDENTITY_SCALE,
                    "Identity guidance: how strongly the face keeps the portrait's look.",
                ),
                io.Combo.Input(
                    "schedule",
                    options=list(SCHEDULE_MODES),
                    default=ALIGNED,
                    tooltip="aligned: every frame gets "
                    "its own audio (recommended); reference: the original code's frame arithmetic, quirks "
                    "and 45-second limit included, for comparison with its results.",
                ),
                io.Int.Input(
                    "keyframe_image_size",
                    default=512,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="Longest side of the keyframe_images output (capped at the model resolution; "
                    "long videos get smaller images so the batch stays under 1 GiB). 0 skips decoding the "
                    "keyframes (one black placeholder image): faster for long videos.",
                ),
                EMOTION.Input(
                    "emotion",
                    optional=True,
                    tooltip="Emotion over time from KeyFace Emotion Curve; neutral when not connected.",
                ),
                _devices_input("keyframe batches"),
                _ray_address_input("keyframe batches"),
            ],
            outputs=[
                KEYFRAMES.Output(
                    display_name="keyframes",
                    tooltip="The generated keyframes (kept in the job folder): connect to the Keyframe Interpolator.",
                ),
                io.Image.Output(
                    display_name="keyframe_images",
                    tooltip="Every keyframe decoded, in frame order (keyframe i is video frame 13 x i with the "
                    "aligned schedule).",
                ),
            ],
        )

    @classmethod
    @node_function(SAMPLER_WIDGETS)
    def execute(
        cls,
        model,
        image,
        audio,
        seed,
        steps,
        audio_scale,
        identity_scale,
        schedule,
        keyframe_image_size,
        emotion=None,
        devices="",
        ray_address="",
    ):
        import torch

        from keyface.emotion import parse_emotion
        from keyface.face import centre_square
        from keyface.generate import audio_feature_mode
        from keyface.keyframe_images import decode_keyframe_images, keyframe_image_side
        from keyface.pipeline import Conditioning, GenerationSettings, TalkingHeadJob

        check_widgets(cls, locals())
        check_scale_out(devices, ray_address)
        if audio is None:
            raise InputError("audio: connect the features output of KeyFace Load Audio")
        face = centre_square(single_image(image, "image"), "image")
        settings = GenerationSettings(
            num_steps=steps, audio_scale=audio_scale, identity_scale=identity_scale, seed=seed, schedule=schedule
        )
        curve = emotion if emotion is not None else parse_emotion("neutral")
        features = audio.features_for(audio_feature_mode(schedule))
        progress = NodeProgress()
        with model.on_device() as models:
            valence, arousal = curve.per_frame(features.num_frames)
            conditioning = Conditioning(
                models.encode_image(face), features.keyframe, features.interpolation, valence, arousal
            )
            job = TalkingHeadJob(
                models,
                conditioning,
                settings,
                jobs_root=jobs_root(),
                progress=progress.on_event,
                preview_keyframes=True,
            )
            with scale_out(job, model, devices, ray_address):
                job.generate_keyframes()
            frames = [frame for frame, _ in job.keyframe_slots()]
            if keyframe_image_size == 0:
                images = torch.zeros((1, 64, 64, 3))  # ComfyUI needs an IMAGE: one black placeholder
            else:
                side = keyframe_image_side(len(frames), keyframe_image_size, models.image_size)
                images = decode_keyframe_images(job, side, progress.update)
        logger.info("KeyFace: %d keyframes at frames %s (job folder %s)", len(frames), frames[:6], job.folder.path)
        handle = KeyframesHandle(job, model, audio, frames, images if keyframe_image_size else None)
        return io.NodeOutput(handle, images)


class KeyFaceKeyframeInterpolator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.sampling import AUTOGUIDANCE_SCALE

        return io.Schema(
            node_id="KeyFaceKeyframeInterpolator",
            display_name="KeyFace Keyframe Interpolator",
            category=CATEGORY,
            description=(
                "Stage 2: fills in the 12 frames between each pair of keyframes, following the audio. Optional "
                "edited keyframe images (the sampler's keyframe_images after your edits, same count and order) "
                "replace the keyframes that differ, so the motion follows a retouch. Outputs a video handle that "
                "decodes frames on demand (never the whole video in RAM): connect to Video Combine or Video to "
                "Images. While it runs, it shows a short preview of the last finished seconds."
            ),
            inputs=[
                KEYFRAMES.Input("keyframes", tooltip="The keyframes from the Keyframe Sampler."),
                _seed_input(
                    "seed",
                    "Random seed of the in-between frames. The sampler's seed keeps the original "
                    "single noise stream (the CLI's result); another value re-rolls only these "
                    "frames, keeping the keyframes.",
                ),
                _steps_input("steps", "Sampler steps per group of segments (10 = the original's schedule)."),
                _scale_input(
                    "autoguidance_scale",
                    AUTOGUIDANCE_SCALE,
                    "Autoguidance strength (the 'bad' network "
                    "steers away from blur); 1 = plain sampling. Ignored when the "
                    "loader's autoguidance is 'none'.",
                ),
                io.Int.Input(
                    "segments_per_call",
                    default=0,
                    min=0,
                    max=SEGMENTS_PER_CALL_MAX,
                    tooltip="Segments (13 frames each) interpolated per network call: more is faster on a "
                    "large GPU and needs more memory. 0 = auto: as many as fit in free GPU memory. Changes the "
                    "result only by float rounding.",
                ),
                io.Image.Input(
                    "edited_keyframes",
                    optional=True,
                    tooltip="The sampler's keyframe_images with some keyframes "
                    "edited (same count and order). Keyframes that differ replace the generated "
                    "ones; leave unconnected to use the keyframes as generated.",
                ),
                io.Boolean.Input(
                    "keep_job_folder",
                    default=False,
                    optional=True,
                    tooltip="Keep the job folder (finished keyframes and in-between frames, in ComfyUI's "
                    "user/keyface/jobs) after Video Combine has written the whole video, so a re-roll or "
                    "another encode of this job skips the finished work. Off: it is deleted then.",
                ),
                _devices_input("segments"),
                _ray_address_input("segments"),
            ],
            outputs=[
                VIDEO.Output(
                    display_name="video",
                    tooltip="The finished video (25 fps), streamed frame by frame to Video Combine or Video to Images.",
                )
            ],
        )

    @classmethod
    @node_function(INTERPOLATOR_WIDGETS)
    def execute(
        cls,
        keyframes,
        seed,
        steps,
        autoguidance_scale,
        segments_per_call,
        edited_keyframes=None,
        keep_job_folder=False,
        devices="",
        ray_address="",
    ):
        check_widgets(cls, locals())
        check_scale_out(devices, ray_address)
        if keyframes is None:
            raise InputError("keyframes: connect the keyframes output of KeyFace Keyframe Sampler")
        sampled = keyframes.job
        job = sampled.with_settings(
            interpolation_steps=steps,
            autoguidance_scale=autoguidance_scale,
            segments_per_call=segments_per_call or None,  # 0: auto
            interpolation_seed=None if seed == sampled.settings.seed else seed,
        )
        progress = NodeProgress()
        preview = segment_preview(job)
        with keyframes.bundle.on_device():
            if edited_keyframes is not None:
                apply_edits(job, keyframes, edited_keyframes)
            listeners = [preview.on_event] if preview else []
            with reporting(job, progress, *listeners), scale_out(job, keyframes.bundle, devices, ray_address):
                job.interpolate()
            final_preview = preview.finish() if preview else None
        handle = VideoHandle(
            job, keyframes.bundle, keyframes.audio.clip, fps=VIDEO_FPS, keep_job_folder=keep_job_folder
        )
        return io.NodeOutput(handle, ui=preview_ui(final_preview) if final_preview else None)


def preview_ui(path) -> ui.SavedImages:
    """The node's UI output showing the animated preview ``path`` (a file in ComfyUI's temp folder)."""
    return ui.SavedImages([ui.SavedResult(path.name, "", io.FolderType.temp)], is_animated=True)


def segment_preview(job):
    """A :class:`keyface.preview.SegmentPreview` of ``job``'s stage 2 shown on the running node, written into
    ComfyUI's temp folder; None outside ComfyUI (nothing to show it on)."""
    folder = host.temp_dir()
    if folder is None:
        return None
    from keyface import preview

    show = lambda path: host.show_node_output(preview_ui(path).as_dict())  # noqa: E731
    return preview.SegmentPreview(job, folder, show, preview.PreviewSettings())


def _devices_input(work: str) -> io.String.Input:
    return io.String.Input(
        "devices",
        default="",
        optional=True,
        tooltip=f"Several GPUs: a comma-separated list such as cuda:0,cuda:1 runs the {work} on all of them at "
        "once (one model copy each, made for this run and freed after it; same result as one GPU). Empty: "
        "ComfyUI's device only.",
    )


def _ray_address_input(work: str) -> io.String.Input:
    return io.String.Input(
        "ray_address",
        default="",
        optional=True,
        tooltip=f"A Ray cluster runs the {work}, one worker per GPU (pip install 'ray>=2.9' into ComfyUI's Python; every node needs "
        "the pack and the same model files at the same paths): host:port of its head node, auto (the cluster "
        "this machine belongs to) or local (start one on this machine). Same result as here. Empty: not used.",
    )


def check_scale_out(devices: str, ray_address: str) -> None:
    if devices.strip() and ray_address.strip():
        raise InputError(
            "devices, ray_address: give one of them (devices: several GPUs of this machine; ray_address: a Ray "
            "cluster), not both; empty the other"
        )


@contextlib.contextmanager
def scale_out(job, bundle, devices: str, ray_address: str) -> Iterator[None]:
    """The block runs ``job``'s network calls on the listed devices (:class:`keyface.scheduling.DevicesBackend`)
    or a Ray cluster (:class:`keyface.scheduling.RayBackend`, its workers loading the bundle's model files); with
    both empty, here. The job goes back to this process's backend afterwards, its work all in the job folder."""
    from keyface.scheduling import DevicesBackend, LocalBackend, RayBackend

    devices, ray_address = devices.strip(), ray_address.strip()
    if not devices and not ray_address:
        yield
        return
    if devices:
        backend = DevicesBackend(devices)
    else:
        files = bundle.models.sources
        if files is None:
            raise InputError("ray_address: these models were not loaded from files, which every Ray worker needs")
        try:
            backend = RayBackend(files, address=ray_address, precision=bundle.dtype)
        except InputError as error:
            raise InputError(f"ray_address: {error}") from None
    with backend:
        job.backend = backend
        try:
            yield
        finally:
            job.backend = LocalBackend()


def apply_edits(job, keyframes: KeyframesHandle, edited) -> list[int]:
    """Replace the keyframes whose image in ``edited`` differs from the sampler's; returns their frames."""
    from keyface.keyframe_images import apply_keyframe_edits

    if keyframes.images is None:
        raise InputError(
            "edited_keyframes: the Keyframe Sampler did not output keyframe images (keyframe_image_size is 0); "
            "set it above 0 to edit keyframes"
        )
    replaced = apply_keyframe_edits(job, keyframes.frames, keyframes.images, edited)
    logger.info("KeyFace: %d edited keyframe(s) at frames %s", len(replaced), replaced)
    return replaced
