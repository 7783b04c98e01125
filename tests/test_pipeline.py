"""The two-stage pipeline end to end on tiny random weights: parity with the original's full-pipeline fixture
(reference schedule), aligned-schedule output lengths and files, resume after an interruption, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from keyface.errors import InputError, Interrupted, KeyFaceError
from keyface.media import probe_media
from keyface.noise import InjectedNoise, SeededNoise
from keyface.pipeline import Conditioning, GenerationSettings, TalkingHeadJob
from keyface.schedule import plan_schedule
from keyface.video import FrameListSink

_models_cache: dict[Path, object] = {}


def tiny_models(folder: Path):
    """The models of a models folder (a fixture set's ``checkpoints/`` or the demo weights), loaded once."""
    from keyface.loading import find_model_files, load_models

    if folder not in _models_cache:
        _models_cache[folder] = load_models(find_model_files(folder))
    return _models_cache[folder]


def fixture_conditioning(fixture_set: Path) -> tuple[Conditioning, dict]:
    stored = load_file(fixture_set / "pipeline" / "full_pipeline.safetensors")
    keyframe_audio = torch.cat([stored["in_wavlm_frames"], stored["in_beats_frames"]], dim=-1)
    interpolation_audio = torch.cat([stored["in_wav2vec2_frames"], stored["in_beats_frames"]], dim=-1)
    frames = keyframe_audio.shape[0]
    conditioning = Conditioning(
        stored["in_identity_latent"],
        keyframe_audio,
        interpolation_audio,
        stored["emotion_valence"][:frames],
        stored["emotion_arousal"][:frames],
    )
    return conditioning, stored


def random_conditioning(models, frames: int, seed: int = 0) -> Conditioning:
    generator = torch.Generator().manual_seed(seed)
    audio_dim = models.keyframe.config.audio_feature_dim
    return Conditioning(
        torch.randn(1, *models.latent_shape, generator=generator) * 0.2,
        torch.randn(frames, 2, audio_dim, generator=generator),
        torch.randn(frames, 2, models.interpolation.config.audio_feature_dim, generator=generator),
        torch.linspace(-0.5, 0.5, frames),
        torch.zeros(frames),
    )


def test_seeded_noise_is_the_original_draw_order(fixture_set):
    """Seed 23 on a CPU generator gives the fixture's recorded draws bit for bit (docs/schedule.md#noise-draws)."""
    stored = load_file(fixture_set / "pipeline" / "full_pipeline.safetensors")
    schedule = plan_schedule(stored["in_wavlm_frames"].shape[0], "reference")
    noise = SeededNoise(schedule, tuple(stored["in_identity_latent"].shape[1:]), seed=23)
    draws = sorted(key for key in stored if key.startswith("noise_"))
    assert len(draws) == len(noise.draws)
    for index in reversed(range(len(draws))):  # out of order: the stream is replayed
        assert torch.equal(noise.draw(index), stored[draws[index]])


def test_reference_pipeline_reproduces_the_original(fixture_set, tmp_path):
    models = tiny_models(fixture_set / "checkpoints")
    conditioning, stored = fixture_conditioning(fixture_set)
    intermediates = load_file(fixture_set / "pipeline" / "full_pipeline_intermediates.safetensors")
    schedule = plan_schedule(conditioning.num_frames, "reference")
    draws = sorted(key for key in stored if key.startswith("noise_"))
    noise = InjectedNoise(schedule, models.latent_shape, [stored[key] for key in draws])
    job = TalkingHeadJob(
        models, conditioning, GenerationSettings(schedule="reference"), job_folder=tmp_path, noise=noise
    )

    for batch in range(len(schedule.batches)):
        expected = intermediates[f"keyframe_batch{batch}_latents"]
        assert (job.keyframe_batch(batch) - expected).abs().max() <= 1e-4
    for chunk in schedule.chunks:
        latents = torch.cat([job.segment(k) for k in chunk.segments])
        assert (latents - intermediates[f"chunk{chunk.index}_interpolation_latents"]).abs().max() <= 1e-4

    sink = FrameListSink()
    assert job.run(sink) == stored["out_video_uint8"].shape[0]
    video = torch.from_numpy(sink.stack()).permute(0, 3, 1, 2).int()
    difference = (video - stored["out_video_uint8"].int()).abs()
    assert video.shape == stored["out_video_uint8"].shape
    assert difference.max() <= 1
    assert (difference > 0).float().mean() <= 0.01


def test_aligned_generation_writes_an_mp4_of_the_audio_length(demo_models, tmp_path):
    """3 s of speech-like audio -> 75 frames, with the audio track of the same length, via the CLI's path."""
    from keyface.generate import GenerationRequest, generate_video

    sample_rate, seconds = 44100, 3.0
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = tmp_path / "speech.wav"
    _write_wav(audio, np.stack([tone, 0.5 * tone]).astype(np.float32), sample_rate)
    image = tmp_path / "portrait.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "talk.mp4"
    generate_video(GenerationRequest(image, audio, out, demo_models, settings=GenerationSettings(), device="cpu"))

    info = probe_media(out)
    assert info.video.num_frames == 75
    assert info.audio.sample_rate == sample_rate and info.audio.channels == 2
    assert math.isclose(info.audio.duration, 3.0, abs_tol=1024 / sample_rate)
    assert not any(p.name.endswith(".keyface-job") for p in tmp_path.iterdir())  # removed after success


def _write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    import wave

    pcm = (np.clip(waveform.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as file:
        file.setnchannels(waveform.shape[0])
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(pcm.tobytes())


class _StopAfter:
    def __init__(self, stage: str, units: int):
        self.stage, self.units, self.seen = stage, units, 0

    def __call__(self, event) -> None:
        if event.stage == self.stage:
            self.seen += 1
            if self.seen > self.units:
                raise Interrupted("stopped by the test")


def test_resume_after_interruption_gives_the_uninterrupted_frames(demo_models, tmp_path):
    models = tiny_models(demo_models)
    conditioning = random_conditioning(models, frames=45)
    settings = GenerationSettings(segments_per_call=1)

    reference = FrameListSink()
    TalkingHeadJob(models, conditioning, settings, job_folder=tmp_path / "straight").run(reference)

    folder = tmp_path / "interrupted"
    stopper = _StopAfter("interpolation", units=2 * settings.steps_per_sample + 3)  # mid third segment
    sink = FrameListSink()
    with pytest.raises(Interrupted):
        TalkingHeadJob(models, conditioning, settings, job_folder=folder, progress=stopper).run(sink)
    assert sink.closed and len(list((folder).glob("segments-*/segment_*.safetensors"))) == 2

    events = []
    resumed = FrameListSink()
    TalkingHeadJob(models, conditioning, settings, job_folder=folder, progress=events.append).run(resumed)
    assert np.array_equal(resumed.stack(), reference.stack())
    assert any("resumed" in event.detail for event in events)
    assert events[-1].completed == events[-1].total


def test_edited_keyframe_changes_only_its_segments(demo_models, tmp_path):
    models = tiny_models(demo_models)
    job = TalkingHeadJob(models, random_conditioning(models, frames=40), job_folder=tmp_path)
    before = [job.segment(k).clone() for k in range(len(job.schedule.segments))]
    frame, _ = job.keyframe_slots()[1]  # frame 13: end of segment 0, start of segment 1
    job.replace_keyframe(frame, torch.zeros(models.latent_shape))
    after = [job.segment(k) for k in range(len(job.schedule.segments))]
    changed = [k for k in range(len(before)) if not torch.equal(before[k], after[k])]
    assert changed == [0, 1]
    with pytest.raises(InputError, match="not a keyframe"):
        job.replace_keyframe(frame + 1, torch.zeros(models.latent_shape))


def test_interpolation_settings_keep_the_keyframes(demo_models, tmp_path):
    models = tiny_models(demo_models)
    job = TalkingHeadJob(models, random_conditioning(models, frames=20), job_folder=tmp_path)
    job.generate_keyframes()
    keyframes = job.keyframe_batch(0).clone()
    rerolled = job.with_settings(interpolation_seed=7, autoguidance_scale=1.5)
    assert rerolled.folder.keyframe_fingerprint == job.folder.keyframe_fingerprint
    assert torch.equal(rerolled.keyframe_batch(0), keyframes)
    assert not torch.equal(rerolled.segment(0), job.segment(0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_steps": 5}, "num_steps"),
        ({"audio_scale": float("nan")}, "audio_scale"),
        ({"schedule": "fast"}, "schedule"),
        ({"segments_per_call": 0}, "segments_per_call"),
        ({"seed": -1}, "seed"),
    ],
)
def test_impossible_settings_are_refused(changes, message):
    with pytest.raises(InputError, match=message):
        GenerationSettings(**changes)


def test_job_folder_refuses_a_foreign_non_empty_folder(demo_models, tmp_path):
    models = tiny_models(demo_models)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KeyFaceError, match="not empty"):
        TalkingHeadJob(models, random_conditioning(models, frames=5), job_folder=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
