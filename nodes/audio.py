"""KeyFace Load Audio: an audio file from ComfyUI's input folder (or any node's ``AUDIO``) -> per-frame features."""

from __future__ import annotations

from keyface.errors import InputError

from . import host
from .common import CATEGORY, NodeProgress, check_widgets, file_named_as_chosen, node_function
from .handles import AUDIO_FEATURES, MODEL, AudioInput

MAX_SECONDS = 24 * 3600.0
AUDIO_PLAYER = "audioUI"  # the name ComfyUI's frontend gives the audio player widget
# VALIDATE_INPUTS default for `audio_input`: ComfyUI passes a connected input as None while validating and
# leaves an unconnected one out, so this value means "not connected".
_NOT_CONNECTED = object()


class KeyFaceLoadAudio:
    DESCRIPTION = (
        "Loads the speech that drives the video - an audio or video file from ComfyUI's input folder (upload "
        "with the button) or the AUDIO output of any node - optionally trims it, and computes KeyFace's per-frame "
        "audio features (WavLM, BEATs, wav2vec2; 25 frames per second). Features are cached on disk, so running "
        "the same audio again costs nothing."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("AUDIO", AUDIO_FEATURES, "FLOAT", "INT")
    RETURN_NAMES = ("audio", "features", "duration", "frame_count")
    OUTPUT_TOOLTIPS = (
        "The (trimmed) audio, for saving or for other audio nodes.",
        "Per-frame audio features for the Keyframe Sampler.",
        "Length of the (trimmed) audio in seconds; e.g. connect to the Emotion Curve's duration.",
        "Number of 25-fps video frames the audio makes (ceil(seconds x 25)).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        files = host.input_media_files()
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The KeyFace models (their audio encoders compute the features)."}),
                "audio": (
                    files,
                    {
                        "audio_upload": True,
                        "tooltip": "Audio or video file in ComfyUI's input folder "
                        "(wav, mp3, flac, m4a, ogg, mp4, ...). Ignored when audio_input is connected.",
                    },
                ),
                "start_seconds": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": MAX_SECONDS,
                        "step": 0.01,
                        "tooltip": "Skip this many seconds at the start.",
                    },
                ),
                "duration_seconds": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": MAX_SECONDS,
                        "step": 0.01,
                        "tooltip": "Keep this many seconds from the start point; 0 keeps everything to the end.",
                    },
                ),
            },
            "optional": {
                "audio_input": (
                    "AUDIO",
                    {
                        "tooltip": "Audio from any node (Load Audio, a text-to-speech node, ...); "
                        "when connected it is used instead of the file."
                    },
                ),
                # The frontend's audio player. Its upload button (audio_upload above) looks for this widget, which
                # the frontend adds by itself to core audio nodes only; declared here (optional, never sent with
                # the prompt) it is created before the button.
                AUDIO_PLAYER: ("AUDIO_UI", {"tooltip": "Plays the chosen audio file."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, audio=None, audio_input=_NOT_CONNECTED):
        if audio_input is not _NOT_CONNECTED:
            return True
        if not audio or not host.input_path(audio).is_file():
            return f"audio: file {audio!r} not found in ComfyUI's input folder; upload it or connect audio_input"
        return True

    @classmethod
    def IS_CHANGED(cls, audio=None, **_):
        path = host.input_path(audio) if audio else None
        if path is None or not path.is_file():
            return ""
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @node_function()
    def load(self, model, audio=None, start_seconds=0.0, duration_seconds=0.0, audio_input=None, audioUI=None):
        # audioUI: the frontend sends its player widget's (empty) value along; nothing to do with it
        clip = self.clip(audio, start_seconds, duration_seconds, audio_input)
        progress = NodeProgress()
        features = model.extractor.extract(clip, mode="default", progress=progress.update)
        if model.offloads:  # the encoders are only needed for new audio; give their memory back
            model.extractor.unload()
            host.empty_cache()
        handle = AudioInput(clip, features, model.extractor)
        return (clip.to_comfy(), handle, clip.duration_seconds, features.num_frames)

    @classmethod
    def clip(cls, audio, start_seconds, duration_seconds, audio_input):
        """The requested audio as an :class:`~keyface.audio.io.AudioClip`, trimmed."""
        from keyface.audio.io import AudioClip, load_audio

        check_widgets(cls, {"start_seconds": start_seconds, "duration_seconds": duration_seconds})
        duration = duration_seconds if duration_seconds > 0 else None
        if audio_input is None:
            if not audio:
                raise InputError("audio: no audio file chosen and audio_input is not connected")
            path = host.input_path(audio)
            if not path.is_file():
                raise InputError(f"audio: file {audio!r} not found in ComfyUI's input folder; upload it")
            with file_named_as_chosen(path, f"audio {audio}"):
                return load_audio(path, start_seconds, duration)
        return AudioClip.from_comfy(audio_input, "audio_input").cut(start_seconds, duration)
