"""Noise levels, Euler sampler and both guidance rules against the original's golden outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import TOLERANCE, assert_close, stage_file, stage_models

from keyface.errors import InputError, Interrupted
from keyface.sampling import (
    AYS_BASE_SIGMAS,
    Autoguidance,
    KeyframeGuidance,
    ays_sigmas,
    sample_keyframes,
    sample_segments,
)


def keyframe_inputs(fixture_set: Path) -> tuple[torch.Tensor, ...]:
    data = stage_file(fixture_set, "kf_conditioner")
    return data["in_cond_frames"], data["in_audio_emb"], data["in_valence"], data["in_arousal"]


def interpolation_inputs(fixture_set: Path) -> tuple[torch.Tensor, ...]:
    data = stage_file(fixture_set, "it_conditioner")
    pairs = data["in_cond_frames"]
    return pairs[:, :, 0], pairs[:, :, 1], data["in_audio_emb"]


def record_steps(monkeypatch, guidance_class) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, guided D) of every sampler step."""
    steps, call = [], guidance_class.__call__

    def recording_call(self, x, sigma):
        denoised = call(self, x, sigma)
        steps.append((x.clone(), denoised.clone()))
        return denoised

    monkeypatch.setattr(guidance_class, "__call__", recording_call)
    return steps


# ---- noise levels ----------------------------------------------------------------------------------------------


def test_default_sigmas_match_fixture(fixture_set):
    for stage in ("kf_sample", "it_sample"):
        expected = stage_file(fixture_set, stage)["sigmas"]
        assert torch.equal(ays_sigmas(10), expected)
    assert len(ays_sigmas(10)) - 1 == 11  # num_steps 10 means 11 Euler steps


@pytest.mark.parametrize("num_steps", [12, 25])
def test_more_steps_interpolate_log_linearly(num_steps):
    sigmas = ays_sigmas(num_steps).double()
    assert len(sigmas) == num_steps + 1 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(AYS_BASE_SIGMAS[0]) and sigmas[-2] == pytest.approx(AYS_BASE_SIGMAS[-1])
    assert (sigmas[1:] < sigmas[:-1]).all()
    # every value lies on the piecewise-linear curve of ln(sigma) through the base levels
    base_grid = np.linspace(0, 1, len(AYS_BASE_SIGMAS))
    expected = np.exp(np.interp(np.linspace(0, 1, num_steps), base_grid, np.log(AYS_BASE_SIGMAS[::-1])))[::-1]
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert len(ays_sigmas(11)) - 1 == 11  # 11 steps asked -> 11 steps, as in the original


@pytest.mark.parametrize("num_steps", [9, 0, 10.0, True])
def test_fewer_than_ten_steps_are_refused(num_steps):
    with pytest.raises(InputError, match="num_steps"):
        ays_sigmas(num_steps)


# ---- guidance --------------------------------------------------------------------------------------------------


def test_keyframe_guided_step_matches_fixture(fixture_set):
    keyframe = stage_models(fixture_set)[0]
    data = stage_file(fixture_set, "kf_guided_step")
    guidance = KeyframeGuidance(keyframe, keyframe.condition(*keyframe_inputs(fixture_set)))
    with torch.no_grad():
        branches = guidance.branches(data["x"], data["sigma"])
    assert_close("kf denoised_uc", branches.uncond, data["denoised_uc"])
    assert_close("kf denoised_ref", branches.identity, data["denoised_ref"])
    assert_close("kf denoised_full", branches.full, data["denoised_full"])
    assert_close("kf guided", branches.guided(5.0, 2.0), data["guided"])


def test_batched_keyframe_guidance_equals_sequential_branch_calls(fixture_set):
    keyframe = stage_models(fixture_set)[0]
    data = stage_file(fixture_set, "kf_guided_step")
    cond = keyframe.condition(*keyframe_inputs(fixture_set))
    with torch.no_grad():
        batched = KeyframeGuidance(keyframe, cond).branches(data["x"], data["sigma"])
        for name, branch_cond in (("uncond", cond.unconditional()), ("identity", cond.without_audio()), ("full", cond)):
            sequential = keyframe.denoise(data["x"], data["sigma"], branch_cond)
            assert_close(f"batched vs sequential {name}", getattr(batched, name), sequential, 1e-5)


def test_several_keyframe_clips_in_one_call_equal_separate_calls(fixture_set):
    keyframe = stage_models(fixture_set)[0]
    identity, audio, valence, arousal = keyframe_inputs(fixture_set)
    data = stage_file(fixture_set, "kf_guided_step")
    x2 = torch.cat([data["x"], data["x"].flip(0)])
    audio2, valence2, arousal2 = torch.cat([audio, audio.flip(1)]), valence.repeat(2, 1), -arousal.repeat(2, 1)
    with torch.no_grad():
        together = KeyframeGuidance(keyframe, keyframe.condition(identity, audio2, valence2, arousal2))(
            x2, data["sigma"].repeat(2)
        )
        for clip in range(2):
            frames = slice(clip * len(data["x"]), (clip + 1) * len(data["x"]))
            alone = KeyframeGuidance(
                keyframe,
                keyframe.condition(
                    identity, audio2[clip : clip + 1], valence2[clip : clip + 1], arousal2[clip : clip + 1]
                ),
            )(x2[frames], data["sigma"])
            assert_close(f"clip {clip} batched vs alone", together[frames], alone, 1e-5)


def test_interpolation_guided_step_matches_fixture(fixture_set):
    _, interpolation, bad = stage_models(fixture_set)
    data = stage_file(fixture_set, "it_guided_step")
    cond = interpolation.condition(*interpolation_inputs(fixture_set))
    with torch.no_grad():
        good = interpolation.denoise(data["x"], data["sigma"], cond)
        worse = bad.denoise(data["x"], data["sigma"], cond)
        guided = Autoguidance(interpolation, bad, cond, 2.0)(data["x"], data["sigma"])
        plain = Autoguidance(interpolation, None, cond)(data["x"], data["sigma"])
    assert_close("it denoised_good", good, data["denoised_good"])
    assert_close("it denoised_bad", worse, data["denoised_bad"])
    assert_close("it guided", guided, data["guided"])
    assert torch.equal(plain, good)


# ---- full sampling ---------------------------------------------------------------------------------------------


def assert_trace(prefix: str, steps, data: dict[str, torch.Tensor]):
    assert len(steps) == len(data["step_x"])
    for i, (x, denoised) in enumerate(steps):
        sigma = data["sigmas"][i].item()
        assert_close(f"{prefix} step {i} x", x, data["step_x"][i], TOLERANCE * max(1.0, sigma))
        assert_close(f"{prefix} step {i} denoised", denoised, data["step_denoised"][i])


def test_keyframe_sampling_matches_fixture(fixture_set, monkeypatch):
    keyframe = stage_models(fixture_set)[0]
    data = stage_file(fixture_set, "kf_sample")
    steps = record_steps(monkeypatch, KeyframeGuidance)
    progress = []
    latents = sample_keyframes(
        keyframe,
        *keyframe_inputs(fixture_set),
        data["noise"],
        callback=lambda step, total: progress.append((step, total)),
    )
    assert latents.dtype == torch.float32
    assert_close("kf samples_z", latents, data["samples_z"])
    assert_trace("kf", steps, data)
    assert progress == [(step, 11) for step in range(1, 12)]


def test_interpolation_sampling_matches_fixture(fixture_set, monkeypatch):
    _, interpolation, bad = stage_models(fixture_set)
    data = stage_file(fixture_set, "it_sample")
    steps = record_steps(monkeypatch, Autoguidance)
    latents = sample_segments(interpolation, bad, *interpolation_inputs(fixture_set), data["noise"])
    assert_close("it samples_z", latents, data["samples_z"])
    assert_trace("it", steps, data)


def test_callback_can_interrupt_sampling(fixture_set):
    keyframe = stage_models(fixture_set)[0]
    noise = stage_file(fixture_set, "kf_sample")["noise"]
    seen = []

    def stop_after_two(step, total):
        seen.append(step)
        if step == 2:
            raise Interrupted("stopped by the test")

    with pytest.raises(Interrupted):
        sample_keyframes(keyframe, *keyframe_inputs(fixture_set), noise, callback=stop_after_two)
    assert seen == [1, 2]


def test_sampling_validates_shapes(fixture_set):
    keyframe, interpolation, bad = stage_models(fixture_set)
    identity, audio, valence, arousal = keyframe_inputs(fixture_set)
    noise = stage_file(fixture_set, "kf_sample")["noise"]
    with pytest.raises(InputError, match="noise"):
        sample_keyframes(keyframe, identity, audio, valence, arousal, noise[:-1])
    with pytest.raises(InputError, match="valence"):
        sample_keyframes(keyframe, identity, audio, valence[:, :-1], arousal, noise)
    with pytest.raises(InputError, match="audio"):
        sample_keyframes(keyframe, identity, audio[..., :-1], valence, arousal, noise)
    start, end, segment_audio = interpolation_inputs(fixture_set)
    with pytest.raises(InputError, match="end_latents"):
        sample_segments(interpolation, bad, start, end[:1], segment_audio, noise)
