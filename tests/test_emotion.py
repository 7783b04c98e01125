"""Emotion input: names, timed lists, curves, JSON, per-frame values and the original's reference lists."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from keyface.emotion import (
    EMOTION_FORMAT,
    EMOTIONS,
    EmotionClippedWarning,
    EmotionCurve,
    emotion_values,
    parse_emotion,
    reference_emotion_frames,
)
from keyface.errors import InputError


def test_emotion_table_is_the_original_one():
    assert len(EMOTIONS) == 24
    assert EMOTIONS["happy"] == (0.85, 0.75) and EMOTIONS["angry"] == (-0.443, 0.908)
    assert EMOTIONS["neutral"] == (0.0, 0.0) and EMOTIONS["bored"] == (-0.6, -0.9)
    assert all(-1 <= v <= 1 and -1 <= a <= 1 for v, a in EMOTIONS.values())


def test_named_emotion_is_constant_for_any_length():
    for frames in (0, 1, 7, 1000):
        valence, arousal = parse_emotion("Happy ").per_frame(frames)
        assert valence.shape == arousal.shape == (frames,) and valence.dtype == torch.float64
        assert torch.all(valence == 0.85) and torch.all(arousal == 0.75)


def test_timed_list_ramps_linearly_between_names():
    curve = parse_emotion("neutral at 0 s, happy at 4 s, sad at 12.5 s")
    valence, arousal = curve.per_frame(400)
    assert valence[0] == 0 and arousal[0] == 0
    assert valence[50] == pytest.approx(0.85 / 2) and arousal[50] == pytest.approx(0.75 / 2)  # 2 s: half way
    assert valence[100] == pytest.approx(0.85)  # 4 s
    assert valence[313] == pytest.approx(-0.85) and arousal[399] == pytest.approx(-0.35)  # held after
    assert np.all(np.diff(valence[:100].numpy()) > 0)
    assert parse_emotion("neutral @ 0, sad at 2 seconds").valence == ((0.0, 0.0), (2.0, -0.85))


def test_smooth_interpolation_eases_without_overshoot():
    curve = parse_emotion("neutral at 0 s, excited at 2 s", interpolation="smooth")
    linear = parse_emotion("neutral at 0 s, excited at 2 s")
    times = np.linspace(0, 2, 201)
    smooth_values, _ = curve.values_at(times)
    linear_values, _ = linear.values_at(times)
    assert smooth_values[100] == pytest.approx(0.45)  # symmetric: half way at the middle
    assert smooth_values[20] < linear_values[20] and smooth_values[180] > linear_values[180]  # eases in and out
    assert np.all(np.diff(smooth_values) >= 0) and smooth_values.max() <= 0.9
    assert smooth_values[0] == 0 and smooth_values[-1] == pytest.approx(0.9)


def test_free_curve_per_channel_and_json_round_trip():
    data = {
        "format": EMOTION_FORMAT,
        "interpolation": "smooth",
        "accentuate": 1.0,
        "valence": [[0.0, -0.5], [1.0, 0.5], [3.0, 0.0]],
        "arousal": [[0.5, 0.25]],
    }
    curve = parse_emotion(json.dumps(data))
    assert curve.to_dict() == data
    assert EmotionCurve.from_json(curve.to_json()) == curve
    json.dumps(curve.to_dict())  # plain JSON types only
    valence, arousal = curve.per_frame(100, fps=25)
    assert valence[0] == -0.5 and valence[25] == pytest.approx(0.5) and valence[99] == 0
    assert torch.all(arousal == 0.25)
    assert parse_emotion(data) == curve and parse_emotion(curve) is curve


def test_keys_form_expands_to_both_channels():
    curve = parse_emotion(
        {"format": EMOTION_FORMAT, "keys": [{"time": 0.0, "emotion": "neutral"}, {"time": 4.0, "emotion": "happy"}]}
    )
    assert curve.valence == ((0.0, 0.0), (4.0, 0.85)) and curve.arousal == ((0.0, 0.0), (4.0, 0.75))
    assert curve == parse_emotion("neutral at 0 s, happy at 4 s")


def test_accentuate_and_out_of_range_values_clip_with_a_warning():
    with pytest.warns(EmotionClippedWarning, match="after accentuate x1.5"):
        valence, arousal = parse_emotion("happy", accentuate=1.5).per_frame(3)
    assert torch.all(valence == 1.0) and torch.all(arousal == 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        valence, _ = parse_emotion("calm", accentuate=1.2).per_frame(2)  # 0.78 and -0.6: nothing clipped
    assert valence[0] == pytest.approx(0.78)
    with pytest.warns(EmotionClippedWarning, match="valence control points.*\\+2.000"):
        curve = EmotionCurve(((0, 2.0),), ((0, 0.0),))
    assert curve.valence == ((0.0, 1.0),)


def test_reference_mode_matches_pipeline_fixture(fixture_set):
    expected = load_file(fixture_set / "pipeline" / "full_pipeline.safetensors")
    config = json.loads((fixture_set / "pipeline" / "full_pipeline.json").read_text())
    frames = expected["keyframe_audio"].shape[0]
    valence, arousal = reference_emotion_frames(config["emotion_states"], frames)
    assert valence.dtype == np.float64 and valence.shape == expected["emotion_valence"].shape
    np.testing.assert_array_equal(valence, expected["emotion_valence"].numpy())
    np.testing.assert_array_equal(arousal, expected["emotion_arousal"].numpy())


def test_reference_mode_ramps_and_padding():
    valence, arousal = reference_emotion_frames(["neutral", "happy", "sad"], 10)
    assert valence.shape == arousal.shape == (10,)
    np.testing.assert_allclose(valence, [*np.linspace(0, 0.85, 5), *np.linspace(0.85, -0.85, 5)])
    valence, _ = reference_emotion_frames(["neutral", "happy", "sad"], 11)  # 2 ramps of 5: the 11th frame padded
    assert valence.shape == (11,) and valence[-1] == -0.85 and valence[-2] == -0.85
    with pytest.warns(EmotionClippedWarning):
        valence, arousal = reference_emotion_frames(["happy"], 4, accentuate=True)
    assert valence.shape == (6,) and np.all(valence == 1.0)
    with pytest.warns(EmotionClippedWarning):
        valence, arousal = reference_emotion_frames(["calm", "neutral"], 4, accentuate=True)
    np.testing.assert_allclose(valence[0], min(1.0, min(1.0, 0.65 * 1.5) * 1.5))  # x1.5 twice, clipped each time
    np.testing.assert_allclose(arousal[0], -1.0)
    assert reference_emotion_frames(["neutral", "sad"], 0)[0].shape == (0,)


def test_bad_emotion_inputs_name_the_problem():
    with pytest.raises(InputError, match="unknown emotion 'hapy'; did you mean 'happy'"):
        parse_emotion("hapy")
    with pytest.raises(InputError, match="'angyr'.*'angry'"):
        parse_emotion("neutral at 0 s, angyr at 2 s")
    with pytest.raises(InputError, match="times must increase strictly; 1.0 s comes after 4.0 s"):
        parse_emotion("neutral at 4 s, happy at 1 s")
    with pytest.raises(InputError, match="cannot read 'happy at soon'"):
        parse_emotion("neutral at 0 s, happy at soon")
    with pytest.raises(InputError, match="not valid JSON"):
        parse_emotion('{"format": "keyface-emotion-v1", "valence": [[0, 0]')
    with pytest.raises(InputError, match="'format' must be"):
        parse_emotion({"valence": [[0, 0]], "arousal": [[0, 0]]})
    with pytest.raises(InputError, match="arousal\\[0\\]: expected \\[time_seconds, value\\]"):
        parse_emotion({"format": EMOTION_FORMAT, "valence": [[0, 0]], "arousal": [[0, "high"]]})
    with pytest.raises(InputError, match="valence: expected a non-empty list"):
        parse_emotion({"format": EMOTION_FORMAT, "valence": [], "arousal": [[0, 0]]})
    with pytest.raises(InputError, match="unknown entries \\['speed'\\]"):
        parse_emotion({"format": EMOTION_FORMAT, "valence": [[0, 0]], "arousal": [[0, 0]], "speed": 2})
    with pytest.raises(InputError, match="either 'keys' or"):
        parse_emotion({"format": EMOTION_FORMAT, "keys": [{"time": 0, "emotion": "sad"}], "valence": [[0, 0]]})
    with pytest.raises(InputError, match="interpolation"):
        parse_emotion("happy", interpolation="cubic")
    with pytest.raises(InputError, match="negative"):
        EmotionCurve(((-1.0, 0.0),), ((0.0, 0.0),))
    with pytest.raises(InputError, match="num_frames"):
        parse_emotion("happy").per_frame(-1)
    with pytest.raises(InputError, match="empty"):
        parse_emotion("  ")
    with pytest.raises(InputError, match="expected a name"):
        parse_emotion(3.5)
    with pytest.raises(InputError, match="emotion states"):
        reference_emotion_frames(["neutral", "glad"], 10)
    assert emotion_values("Neutral") == (0.0, 0.0)
