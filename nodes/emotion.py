"""KeyFace Emotion Curve: valence and arousal over the clip, from a name, a timed list or curve JSON.

The web extension (``web/js/keyface_emotion_curve.js``) edits the ``emotion`` text visually; the node reads the
text alone, so it works (and validates) without the extension.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from keyface.errors import InputError

from .common import CATEGORY, check_widgets, node_function, tell_artist
from .handles import EMOTION

DEFAULT_DURATION = 10.0  # seconds; the editor's time axis when no audio length is connected (web widget default)
MAX_DURATION = 24 * 3600.0


def parse_emotion_input(text) -> object:
    """The :class:`~keyface.emotion.EmotionCurve` of the ``emotion`` widget text (InputError naming ``emotion``)."""
    from keyface.emotion import parse_emotion

    if not isinstance(text, str):
        raise InputError(f"emotion: expected text, got {type(text).__name__}")
    try:
        return parse_emotion(text)
    except InputError as error:
        message = str(error)
        raise InputError(message if message.startswith("emotion") else f"emotion: {message}") from None


class KeyFaceEmotionCurve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from keyface.emotion import EMOTIONS

        return io.Schema(
            node_id="KeyFaceEmotionCurve",
            display_name="KeyFace Emotion Curve",
            category=CATEGORY,
            description=(
                "The emotion of the talking head over time, as valence (unpleasant..pleasant) and arousal "
                "(calm..excited) in [-1, 1]. Type an emotion name ('happy'), a timed list ('neutral at 0 s, happy at "
                "4 s, sad at 12.5 s') or edit the curve with the graph below the text. The values hold before the "
                "first and after the last point."
            ),
            inputs=[
                io.String.Input(
                    "emotion",
                    default="neutral",
                    multiline=True,
                    tooltip="An emotion name (" + ", ".join(sorted(EMOTIONS)) + "), a timed list such as "
                    "'neutral at 0 s, happy at 4 s', or the curve JSON the editor writes "
                    '({"format": "keyface-emotion-v1", "valence": [[t, v], ...], "arousal": [[t, a], ...]}).',
                ),
                io.Float.Input(
                    "duration",
                    default=DEFAULT_DURATION,
                    min=0.1,
                    max=MAX_DURATION,
                    step=0.1,
                    tooltip="Length of the clip in seconds: the time axis of the curve editor (connect Load "
                    "Audio's duration). The curve itself is in seconds and does not depend on it.",
                ),
            ],
            outputs=[
                EMOTION.Output(
                    display_name="emotion", tooltip="The emotion curve, for the Keyframe Sampler's emotion input."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, emotion):
        try:
            parse_emotion_input(emotion)
        except InputError as error:
            return str(error)
        return True

    @classmethod
    @node_function()
    def execute(cls, emotion, duration=DEFAULT_DURATION):
        check_widgets(cls, {"duration": duration})
        curve = parse_emotion_input(emotion)
        last = max(curve.valence[-1][0], curve.arousal[-1][0])
        if last > duration:
            tell_artist(f"emotion: the curve has points up to {last:.2f} s, after the clip's {duration:.2f} s")
        return io.NodeOutput(curve)
