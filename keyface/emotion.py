"""Emotion input: (valence, arousal) per 25-fps frame, from a name, a timed list, a curve or JSON
(docs/audio.md#emotion).

KeyFace conditions its keyframes on two scalars in [-1, 1] per frame. They are given, never predicted:

* a named emotion (:data:`EMOTIONS`, the original's 24 names) held for the whole clip: ``"happy"``;
* a timed list of names with ramps between them: ``"neutral at 0 s, happy at 4 s, sad at 12.5 s"``;
* a free curve: control points ``[time_seconds, value]`` per channel, the canonical JSON
  (``{"format": "keyface-emotion-v1", "interpolation": "linear", "accentuate": 1.0, "valence": [[0, 0], [4, 0.85]],
  "arousal": [[0, 0], [4, 0.75]]}``; ``"keys": [{"time": 0, "emotion": "neutral"}, ...]`` may replace the two
  channels).

A channel holds its first value before its first point and its last value after its last point. Between
points it ramps linearly (``"linear"``) or along a smoothstep ``3u^2 - 2u^3`` (``"smooth"``: eases in and out,
never overshoots). ``accentuate`` multiplies every value. Values outside [-1, 1] are clipped with an
:class:`EmotionClippedWarning`.

:func:`reference_emotion_frames` reproduces the original ``create_emotion_list`` for parity.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .constants import VIDEO_FPS
from .errors import InputError

EMOTION_FORMAT = "keyface-emotion-v1"
INTERPOLATIONS = ("linear", "smooth")
# docs/audio.md#reference-emotion-lists: create_emotion_list's accentuate factor (applied twice there)
REFERENCE_ACCENTUATE = 1.5

# docs/audio.md#emotion: the original's fixed (valence, arousal) of each emotion name
EMOTIONS: dict[str, tuple[float, float]] = {
    "happy": (0.85, 0.75),
    "angry": (-0.443, 0.908),
    "surprised": (0.0, 0.85),
    "sad": (-0.85, -0.35),
    "neutral": (0.0, 0.0),
    "fear": (0.181, 0.949),
    "disgusted": (-0.8, 0.5),
    "contempt": (0.307, 0.535),
    "calm": (0.65, -0.5),
    "excited": (0.9, 0.9),
    "bored": (-0.6, -0.9),
    "confused": (-0.3, 0.4),
    "anxious": (-0.85, 0.9),
    "confident": (0.7, 0.4),
    "frustrated": (-0.8, 0.6),
    "amused": (0.7, 0.5),
    "proud": (0.8, 0.4),
    "ashamed": (-0.8, -0.3),
    "grateful": (0.7, 0.2),
    "jealous": (-0.7, 0.5),
    "hopeful": (0.7, 0.3),
    "disappointed": (-0.7, -0.3),
    "curious": (0.5, 0.5),
    "overwhelmed": (-0.6, 0.8),
}

_JSON_KEYS = {"format", "interpolation", "accentuate", "valence", "arousal", "keys"}
_TIMED_ITEM = re.compile(r"^\s*([a-z][a-z_ ]*?)\s+(?:at|@)\s*([0-9]*\.?[0-9]+)\s*(?:s|sec|secs|seconds?)?\s*$")

ControlPoints = tuple[tuple[float, float], ...]


class EmotionClippedWarning(UserWarning):
    """An emotion value outside [-1, 1] was clipped."""


def emotion_values(name: str, where: str = "emotion") -> tuple[float, float]:
    """``(valence, arousal)`` of a named emotion; an unknown name raises :class:`InputError` with suggestions."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in EMOTIONS:
        return EMOTIONS[key]
    close = difflib.get_close_matches(str(key), EMOTIONS, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise InputError(f"{where}: unknown emotion {name!r}; {hint}known: {', '.join(sorted(EMOTIONS))}")


@dataclass(frozen=True)
class EmotionCurve:
    """Valence and arousal over time.

    Attributes:
        valence: control points ``((time_seconds, value), ...)``, times strictly increasing, values in [-1, 1].
        arousal: the same for arousal.
        interpolation: ``"linear"`` or ``"smooth"`` between points.
        accentuate: factor applied to every value (then clipped to [-1, 1]).
    """

    valence: ControlPoints
    arousal: ControlPoints
    interpolation: str = "linear"
    accentuate: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "valence", _control_points(self.valence, "valence"))
        object.__setattr__(self, "arousal", _control_points(self.arousal, "arousal"))
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"emotion interpolation: expected one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not _is_number(self.accentuate) or self.accentuate < 0:
            raise InputError(f"emotion accentuate: expected a number >= 0, got {self.accentuate!r}")
        object.__setattr__(self, "accentuate", float(self.accentuate))

    def __repr__(self) -> str:  # short: a host may put it into an error report (an edited curve has many points)
        last = max(self.valence[-1][0], self.arousal[-1][0])
        return (
            f"EmotionCurve({len(self.valence)} valence and {len(self.arousal)} arousal points up to {last:g} s, "
            f"{self.interpolation}, accentuate {self.accentuate:g})"
        )

    @classmethod
    def constant(cls, emotion: str, accentuate: float = 1.0) -> EmotionCurve:
        """One named emotion for the whole clip."""
        valence, arousal = emotion_values(emotion)
        return cls(((0.0, valence),), ((0.0, arousal),), accentuate=accentuate)

    @classmethod
    def from_keys(
        cls, keys: list[tuple[float, str]], interpolation: str = "linear", accentuate: float = 1.0
    ) -> EmotionCurve:
        """Named emotions at times ``[(seconds, name), ...]``, ramping from one to the next."""
        values = [(time, emotion_values(name, f"emotion at {time} s")) for time, name in keys]
        return cls(
            tuple((time, va[0]) for time, va in values),
            tuple((time, va[1]) for time, va in values),
            interpolation,
            accentuate,
        )

    @classmethod
    def from_json(cls, data: str | dict) -> EmotionCurve:
        """Parse the canonical ``keyface-emotion-v1`` JSON (text or an already decoded dict)."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError as error:
                raise InputError(f"emotion JSON: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise InputError("emotion JSON: expected an object with 'format', 'valence' and 'arousal'")
        if data.get("format") != EMOTION_FORMAT:
            raise InputError(f"emotion JSON: 'format' must be {EMOTION_FORMAT!r}, got {data.get('format')!r}")
        unknown = sorted(set(data) - _JSON_KEYS)
        if unknown:
            raise InputError(f"emotion JSON: unknown entries {unknown}; allowed: {sorted(_JSON_KEYS)}")
        interpolation = data.get("interpolation", "linear")
        accentuate = data.get("accentuate", 1.0)
        if "keys" in data:
            if "valence" in data or "arousal" in data:
                raise InputError("emotion JSON: give either 'keys' or 'valence' + 'arousal', not both")
            keys = data["keys"]
            if not isinstance(keys, list) or not keys:
                raise InputError("emotion JSON: 'keys' must be a non-empty list of {'time': s, 'emotion': name}")
            pairs = []
            for index, key in enumerate(keys):
                if not isinstance(key, dict) or set(key) != {"time", "emotion"} or not isinstance(key["emotion"], str):
                    raise InputError(
                        f"emotion JSON: keys[{index}] must be {{'time': seconds, 'emotion': name}}, got {key!r}"
                    )
                pairs.append((key["time"], key["emotion"]))
            return cls.from_keys(pairs, interpolation, accentuate)
        if "valence" not in data or "arousal" not in data:
            raise InputError("emotion JSON: needs 'valence' and 'arousal' control points (or 'keys')")
        return cls(data["valence"], data["arousal"], interpolation, accentuate)

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON object (plain lists and numbers)."""
        return {
            "format": EMOTION_FORMAT,
            "interpolation": self.interpolation,
            "accentuate": self.accentuate,
            "valence": [list(point) for point in self.valence],
            "arousal": [list(point) for point in self.arousal],
        }

    def to_json(self) -> str:
        """The canonical JSON text (:meth:`to_dict` serialised)."""
        return json.dumps(self.to_dict())

    def values_at(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Valence and arousal at ``times`` (seconds), accentuated and clipped -> two float64 arrays."""
        times = np.asarray(times, dtype=np.float64)
        channels = []
        for name, points in (("valence", self.valence), ("arousal", self.arousal)):
            values = _interpolate(points, times, self.interpolation) * self.accentuate
            channels.append(_clip(values, f"{name} after accentuate x{self.accentuate:g}"))
        return channels[0], channels[1]

    def per_frame(self, num_frames: int, fps: float = VIDEO_FPS) -> tuple[torch.Tensor, torch.Tensor]:
        """Values of frames ``0 .. num_frames-1`` (frame ``f`` at ``f / fps`` s): two ``(F,)`` float64."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 0:
            raise InputError(f"num_frames: expected an integer >= 0, got {num_frames!r}")
        valence, arousal = self.values_at(np.arange(num_frames) / fps)
        return torch.from_numpy(valence), torch.from_numpy(arousal)


def parse_emotion(value: Any, interpolation: str | None = None, accentuate: float | None = None) -> EmotionCurve:
    """Any accepted emotion input -> :class:`EmotionCurve`.

    Args:
        value: an :class:`EmotionCurve`, an emotion name (``"happy"``), a timed list
            (``"neutral at 0 s, happy at 4 s"``), canonical JSON text, or its decoded dict.
        interpolation, accentuate: override the value's own settings (defaults ``"linear"`` and 1.0).
    """
    if isinstance(value, EmotionCurve):
        curve = value
    elif isinstance(value, dict):
        curve = EmotionCurve.from_json(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise InputError("emotion: empty text; give a name such as 'neutral', a timed list or JSON")
        if text.startswith("{"):
            curve = EmotionCurve.from_json(text)
        elif re.search(r"\bat\b|@|[,;\n]", text.lower()):  # a timed list, however badly typed
            curve = EmotionCurve.from_keys(_parse_timed_list(text))
        else:
            curve = EmotionCurve.constant(text)
    else:
        raise InputError(f"emotion: expected a name, a timed list, JSON or an EmotionCurve, got {type(value).__name__}")
    if interpolation is None and accentuate is None:
        return curve
    return EmotionCurve(
        curve.valence,
        curve.arousal,
        curve.interpolation if interpolation is None else interpolation,
        curve.accentuate if accentuate is None else accentuate,
    )


def reference_emotion_frames(
    states: list[str], num_frames: int, accentuate: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The original ``create_emotion_list(states, T)`` (docs/audio.md#reference-emotion-lists) -> valence and arousal,
    float64.

    One state: constant arrays of length ``T + 2``. Several: linear ramps (numpy ``linspace``, both ends
    included) of ``T // (n - 1)`` frames between consecutive states, concatenated and cut to ``T``. Where
    the original comes out shorter than ``T`` (``T`` not divisible by ``n - 1``; it then indexes out of
    range) the last state's value is repeated up to ``T``. ``accentuate``: x1.5 and clip to [-1, 1], applied
    twice as in the original (once to the table, once to the lists).
    """
    if not states:
        raise InputError("emotion states: give at least one emotion name")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 0:
        raise InputError(f"num_frames: expected an integer >= 0, got {num_frames!r}")
    table = np.array([emotion_values(state, "emotion states") for state in states], dtype=np.float64)
    if accentuate:
        table = _clip(table * REFERENCE_ACCENTUATE, "emotion states after accentuate")
    if len(states) == 1:
        channels = np.repeat(table, num_frames + 2, axis=0).T
    else:
        ramp = num_frames // (len(states) - 1)
        pieces = [np.linspace(table[i], table[i + 1], ramp) for i in range(len(states) - 1)]
        channels = np.concatenate(pieces, axis=0)[:num_frames].T if ramp else np.zeros((2, 0))
        if channels.shape[1] < num_frames:
            padding = np.repeat(table[-1:], num_frames - channels.shape[1], axis=0).T
            channels = np.concatenate([channels, padding], axis=1)
    if accentuate:
        channels = _clip(channels * REFERENCE_ACCENTUATE, "emotion values after accentuate")
    return np.ascontiguousarray(channels[0]), np.ascontiguousarray(channels[1])


def _parse_timed_list(text: str) -> list[tuple[float, str]]:
    keys = []
    for item in re.split(r"[,;\n]", text):
        if not item.strip():
            continue
        match = _TIMED_ITEM.match(item.lower())
        if match is None:
            raise InputError(
                f"emotion: cannot read {item.strip()!r}; write items as 'NAME at SECONDS s', "
                "e.g. 'neutral at 0 s, happy at 4 s'"
            )
        keys.append((float(match.group(2)), match.group(1).strip()))
    return keys


def _control_points(points: Any, channel: str) -> ControlPoints:
    if not isinstance(points, (list, tuple)) or not points:
        raise InputError(f"emotion {channel}: expected a non-empty list of [time_seconds, value] points")
    parsed = []
    for index, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2 or not all(_is_number(v) for v in point):
            raise InputError(f"emotion {channel}[{index}]: expected [time_seconds, value] numbers, got {point!r}")
        time, value = float(point[0]), float(point[1])
        if time < 0:
            raise InputError(f"emotion {channel}[{index}]: time {time} s is negative")
        if parsed and time <= parsed[-1][0]:
            raise InputError(
                f"emotion {channel}[{index}]: times must increase strictly; {time} s comes after {parsed[-1][0]} s"
            )
        parsed.append((time, value))
    values = _clip(np.array([value for _, value in parsed]), f"{channel} control points")
    return tuple((time, float(value)) for (time, _), value in zip(parsed, values, strict=True))


def _interpolate(points: ControlPoints, times: np.ndarray, interpolation: str) -> np.ndarray:
    knots = np.array([time for time, _ in points])
    values = np.array([value for _, value in points])
    if interpolation == "linear" or len(points) == 1:
        return np.interp(times, knots, values)
    segment = np.clip(np.searchsorted(knots, times, side="right") - 1, 0, len(knots) - 2)
    start, end = knots[segment], knots[segment + 1]
    u = np.clip((times - start) / (end - start), 0.0, 1.0)
    eased = u * u * (3.0 - 2.0 * u)
    return values[segment] + (values[segment + 1] - values[segment]) * eased


def _clip(values: np.ndarray, what: str) -> np.ndarray:
    outside = np.abs(values) > 1.0
    if outside.any():
        extreme = values[outside][np.argmax(np.abs(values[outside]))]
        warnings.warn(
            f"{what}: {int(outside.sum())} value(s) outside [-1, 1] (up to {extreme:+.3f}) clipped to [-1, 1]",
            EmotionClippedWarning,
            stacklevel=3,
        )
    return np.clip(values, -1.0, 1.0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
