"""KeyFace Load Audio: an audio file from ComfyUI's input folder (or any node's ``AUDIO``) -> per-frame features."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from keyface.errors import InputError

from . import host
from .common import CATEGORY, NodeProgress, check_widgets, file_named_as_chosen, node_function
from .handles import AUDIO_FEATURES, MODEL, AudioInput

MAX_SECONDS = 24 * 3600.0
AUDIO_PLAYER = "audioUI"  # the name ComfyUI's frontend gives the audio player widget
AUDIO_UI = io.Custom("AUDIO_UI")
# validate_inputs default for `audio_input`: ComfyUI passes a connected input as None while validating and
# leaves an unconnected one out, so this value means "not connected".
_NOT_CONNECTED = object()


class KeyFaceLoadAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KeyFaceLoadAudio",
            display_name="KeyFace Load Audio",
            category=CATEGORY,
            description=(
                "Loads the speech that drives the video - an audio or video file from ComfyUI's input folder "
                "(upload with the button) or the AUDIO output of any node - optionally trims it, and computes "
                "KeyFace's per-frame audio features (WavLM, BEATs, wav2vec2; 25 frames per second). Features are "
                "cached on disk, so running the same audio again costs nothing."
            ),
            inputs=[
                MODEL.Input("model", tooltip="The KeyFace models (their audio encoders compute the features)."),
                io.Combo.Input(
                    "audio",
                    options=host.input_media_files(),
                    upload=io.UploadType.audio,
                    tooltip="Audio or video file in ComfyUI's input folder "
                    "(wav, mp3, flac, m4a, ogg, mp4, ...). Ignored when audio_input is connected.",
                ),
                io.Float.Input(
                    "start_seconds",
                    default=0.0,
                    min=0.0,
                    max=MAX_SECONDS,
                    step=0.01,
                    tooltip="Skip this many seconds at the start.",
                ),
                io.Float.Input(
                    "duration_seconds",
                    default=0.0,
                    min=0.0,
                    max=MAX_SECONDS,
                    step=0.01,
                    tooltip="Keep this many seconds from the start point; 0 keeps everything to the end.",
                ),
                io.Audio.Input(
                    "audio_input",
                    optional=True,
                    tooltip="Audio from any node (Load Audio, a text-to-speech node, ...); "
                    "when connected it is used instead of the file.",
                ),
                # The frontend's audio player. Its upload button (the audio upload above) looks for this widget,
                # which the frontend adds by itself to core audio nodes only; declared here (optional, never sent
                # with the prompt) it is created before the button.
                AUDIO_UI.Input(AUDIO_PLAYER, optional=True, tooltip="Plays the chosen audio file."),
                io.Video.Input(
                    "video",
                    optional=True,
                    tooltip="A core VIDEO (Load Video, Create Video, ...): its sound track is used instead of the "
                    "file. Connect this or audio_input, not both.",
                ),
            ],
            outputs=[
                io.Audio.Output(
                    display_name="audio", tooltip="The (trimmed) audio, for saving or for other audio nodes."
                ),
                AUDIO_FEATURES.Output(
                    display_name="features", tooltip="Per-frame audio features for the Keyframe Sampler."
                ),
                io.Float.Output(
                    display_name="duration",
                    tooltip="Length of the (trimmed) audio in seconds; e.g. connect to the Emotion Curve's duration.",
                ),
                io.Int.Output(
                    display_name="frame_count",
                    tooltip="Number of 25-fps video frames the audio makes (ceil(seconds x 25)).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, audio=None, audio_input=_NOT_CONNECTED, video=_NOT_CONNECTED):
        if audio_input is not _NOT_CONNECTED or video is not _NOT_CONNECTED:
            return True
        if not audio or not host.input_path(audio).is_file():
            return f"audio: file {audio!r} not found in ComfyUI's input folder; upload it or connect audio_input"
        return True

    @classmethod
    def fingerprint_inputs(cls, audio=None, **_):
        path = host.input_path(audio) if audio else None
        if path is None or not path.is_file():
            return ""
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    @node_function()
    def execute(
        cls, model, audio=None, start_seconds=0.0, duration_seconds=0.0, audio_input=None, audioUI=None, video=None
    ):
        # audioUI: the frontend sends its player widget's (empty) value along; nothing to do with it
        clip = cls.clip(audio, start_seconds, duration_seconds, audio_input, video)
        progress = NodeProgress()
        features = model.extractor.extract(clip, mode="default", progress=progress.update)
        if model.offloads:  # the encoders are only needed for new audio; give their memory back
            model.extractor.unload()
            host.empty_cache()
        handle = AudioInput(clip, features, model.extractor)
        return io.NodeOutput(clip.to_comfy(), handle, clip.duration_seconds, features.num_frames)

    @classmethod
    def clip(cls, audio, start_seconds, duration_seconds, audio_input, video=None):
        """The requested audio as an :class:`~keyface.audio.io.AudioClip`, trimmed."""
        from keyface.audio.io import AudioClip, load_audio

        check_widgets(cls, {"start_seconds": start_seconds, "duration_seconds": duration_seconds})
        duration = duration_seconds if duration_seconds > 0 else None
        if video is not None:
            if audio_input is not None:
                raise InputError("video / audio_input: connect one of them, not both (each replaces the audio file)")
            audio_input = video.get_components().audio
            if audio_input is None:
                raise InputError("video: the connected video has no sound track; connect audio_input or pick a file")
            return AudioClip.from_comfy(audio_input, "video").cut(start_seconds, duration)
        if audio_input is None:
            if not audio:
                raise InputError("audio: no audio file chosen and audio_input is not connected")
            path = host.input_path(audio)
            if not path.is_file():
                raise InputError(f"audio: file {audio!r} not found in ComfyUI's input folder; upload it")
            with file_named_as_chosen(path, f"audio {audio}"):
                return load_audio(path, start_seconds, duration)
        return AudioClip.from_comfy(audio_input, "audio_input").cut(start_seconds, duration)
