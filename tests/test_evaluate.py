"""keyface.evaluate: tracking, cheap sync signals, identity drift, SyncNet scoring, the report, CLI and node.

Networks are tiny random-initialised stand-ins of the real architectures, saved under the real file names and
read back through the same loading code. Videos are made here from the real portrait with PyAV.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import NO_FACE_DETECTOR, face_detector_available
from PIL import Image

from keyface import face as face_module
from keyface.constants import ENCODER_SAMPLE_RATE, SAMPLES_PER_FRAME, VIDEO_FPS
from keyface.errors import CheckpointError, KeyFaceError, MissingWeightsError
from keyface.evaluate import EvaluationOptions, evaluate_file, evaluate_frames
from keyface.evaluate.arcface import ArcFaceConfig, IdentityEmbedder, IResNet
from keyface.evaluate.lipscore import (
    VSR_WEIGHTS,
    RelativeSelfAttention,
    VsrEncoder,
    VsrEncoderConfig,
    load_vsr_encoder,
    relative_positions,
)
from keyface.evaluate.signals import frame_energy, lagged_correlation, mfcc, per_period, slope_per_minute
from keyface.evaluate.syncnet import SyncNet, SyncNetConfig, SyncScorer
from keyface.evaluate.tracking import track_faces
from keyface.evaluate.weights import ARCFACE_WEIGHTS, SYNCNET_WEIGHTS, load_state_dict
from keyface.video import AudioTrack, Mp4Writer

SIDE = 160  # frame size of the synthetic videos


def _needs_matplotlib() -> None:
    """The figure needs matplotlib: skip without it on a user machine, fail in CI."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("matplotlib")


needs_detector = pytest.mark.skipif(not face_detector_available(), reason=NO_FACE_DETECTOR)

TINY_ARCFACE = ArcFaceConfig(blocks=(1, 1, 1, 1), widths=(8, 8, 16, 16), embedding=32)
TINY_VSR = VsrEncoderConfig(
    blocks=3, dim=16, heads=2, feed_forward=32, kernel=5, stem=8, trunk_widths=(8, 8, 8, 16), trunk_blocks=(1, 1, 1, 1)
)
TINY_SYNCNET = SyncNetConfig(audio_channels=(4, 4, 8, 8, 8, 16), video_channels=(4, 4, 8, 8, 8, 16), hidden=16)


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random convolution / linear weights (fan-in scaled), zero biases, BatchNorm left as identity:
    a stand-in whose embedding follows the input instead of a constant offset."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module.eval()


@pytest.fixture(scope="module")
def eval_weights(tmp_path_factory):
    """An evaluation folder with tiny stand-ins under the real names (syncnet_v2.model without BN counters,
    as PyTorch < 0.4 wrote it)."""
    folder = tmp_path_factory.mktemp("eval")
    torch.save(_randomised(IResNet(TINY_ARCFACE), 1).state_dict(), folder / ARCFACE_WEIGHTS.file)
    syncnet = _randomised(SyncNet(TINY_SYNCNET), 2).state_dict()
    torch.save({k: v for k, v in syncnet.items() if "num_batches_tracked" not in k}, folder / SYNCNET_WEIGHTS.file)
    # the whole auto_avsr model: encoder under "encoder.", ESPnet's "pointwise_cov" spelling, a decoder to ignore
    encoder = _randomised(VsrEncoder(TINY_VSR), 3).state_dict()
    vsr = {"encoder." + k.replace(".pointwise_conv", ".pointwise_cov"): v for k, v in encoder.items()}
    torch.save({**vsr, "decoder.embed.0.weight": torch.zeros(5, 16)}, folder / VSR_WEIGHTS.file)
    return folder


@pytest.fixture(scope="module")
def portrait(portrait_path) -> np.ndarray:
    return np.asarray(Image.open(portrait_path).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)).copy()


@pytest.fixture(scope="module")
def mouth(portrait):
    """Centre and width of the portrait's mouth (from the detector's corners)."""
    if not face_detector_available():
        pytest.skip("face detector not installed")
    face = face_module.detect_faces(portrait)[0]
    (lx, ly), (rx, ry) = face.landmarks[3:5]
    return ((lx + rx) / 2, (ly + ry) / 2), rx - lx


def _with_mouth(portrait: np.ndarray, mouth, opening: float) -> np.ndarray:
    """The portrait with a dark open mouth of ``opening`` (0-1) times half the mouth width."""
    (cx, cy), width = mouth
    ys, xs = np.mgrid[0 : portrait.shape[0], 0 : portrait.shape[1]]
    height = max(opening, 1e-3) * 0.3 * width
    inside = ((xs - cx) / (0.4 * width)) ** 2 + ((ys - cy) / height) ** 2 <= 1
    frame = portrait.copy()
    frame[inside] = (30, 10, 10)
    return frame


def _speech_like(num_frames: int, shift: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame loudness (0-1, random, held 2-4 frames) and 16 kHz noise audio following it ``shift`` frames late."""
    rng = np.random.default_rng(seed)
    levels = np.repeat(rng.uniform(0, 1, num_frames), rng.integers(2, 5, num_frames))[:num_frames]
    delayed = np.concatenate([np.zeros(shift), levels])[:num_frames]
    carrier = rng.standard_normal(num_frames * SAMPLES_PER_FRAME) * 0.3
    return levels, (carrier * np.repeat(delayed, SAMPLES_PER_FRAME)).astype(np.float32)


def _write_video(path, frames, waveform=None, metadata=None):
    audio = None if waveform is None else AudioTrack(waveform[None], ENCODER_SAMPLE_RATE)
    with Mp4Writer(path, fps=VIDEO_FPS, audio=audio, crf=1, preset="ultrafast", metadata=metadata) as writer:
        for frame in frames:
            writer.write(frame)
    return path


# --------------------------------------------------------------------------------------------------- signals


def test_lagged_correlation_finds_the_shift_and_slope_is_per_minute():
    rng = np.random.default_rng(3)
    mouth = rng.standard_normal(200)
    audio = np.concatenate([np.zeros(4), mouth])[:200]  # audio 4 frames late
    result = lagged_correlation(mouth, audio, 10)
    assert result.lag == 4 and result.correlation == pytest.approx(1.0, abs=1e-9)
    assert lagged_correlation(audio, mouth, 10).lag == -4
    # 0.1 per second = 6 per minute
    assert slope_per_minute(np.arange(250) * 0.1 / VIDEO_FPS) == pytest.approx(6.0)
    np.testing.assert_allclose(per_period(np.array([1, 3, np.nan, 5, 7.0]), 2), [2, 5, 7])


def test_mfcc_rate_and_frame_energy():
    rng = np.random.default_rng(0)
    one_second = rng.standard_normal(ENCODER_SAMPLE_RATE).astype(np.float32)
    coefficients = mfcc(one_second)
    # windows starting every 10 ms that fit (the last one padded): 1 + ceil((16000 - 400) / 160)
    assert coefficients.shape == (13, 99) and np.isfinite(coefficients).all()
    loud = frame_energy(np.concatenate([one_second[:640] * 0.01, one_second[:640]]))
    assert loud.shape == (2,) and loud[1] - loud[0] == pytest.approx(np.log(100), abs=0.01)


# --------------------------------------------------------------------------------------------------- weights


def test_missing_weights_name_file_folder_and_origin(tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        load_state_dict(SYNCNET_WEIGHTS, tmp_path)
    message = str(error.value)
    assert str(tmp_path / "syncnet_v2.model") in message and "joonson/syncnet_python" in message
    assert "\n" not in message
    with pytest.raises(MissingWeightsError, match="arcface_r50.pth.*arcface_torch"):
        IdentityEmbedder.from_folder(tmp_path)


def test_stand_ins_load_through_the_real_loaders(eval_weights, tmp_path):
    embedder = IdentityEmbedder.from_folder(eval_weights)
    assert embedder.network.config == TINY_ARCFACE
    crops = [np.random.default_rng(i).integers(0, 255, (112, 112, 3), dtype=np.uint8) for i in range(3)]
    embeddings = embedder.embed(crops)
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, rtol=1e-5)
    reference = _randomised(IResNet(TINY_ARCFACE), 1)
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(embeddings, torch.nn.functional.normalize(reference(batch), dim=1).detach(), atol=1e-5)

    scorer = SyncScorer.from_folder(eval_weights)
    assert scorer.network.netfcaud[3].out_features == TINY_SYNCNET.embedding
    video = scorer.video_features(np.zeros((7, 224, 224, 3), np.uint8))
    audio = scorer.audio_features(np.zeros((13, 40), np.float32), range(-2, 3))
    assert video.shape == (3, 1024) and audio.shape == (5, 1024)

    # the full-size layouts are the released ones: iresnet50 has 43.6 M parameters
    assert sum(p.numel() for p in IResNet().parameters()) == 43_590_848
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / ARCFACE_WEIGHTS.file)
    with pytest.raises(CheckpointError, match="holds another network"):
        IdentityEmbedder.from_folder(tmp_path)


def test_vsr_encoder_loads_at_reduced_depth_and_attends_by_relative_position(eval_weights, tmp_path):
    full = load_vsr_encoder(eval_weights)
    assert full.config == TINY_VSR
    reduced = load_vsr_encoder(eval_weights, max_blocks=1)
    assert reduced.config.blocks == 1 and len(reduced.encoders) == 1
    torch.testing.assert_close(
        reduced.encoders[0].conv_module.pointwise_conv1.weight, full.encoders[0].conv_module.pointwise_conv1.weight
    )
    mouths = torch.randn(1, 1, 6, 88, 88)
    with torch.no_grad():
        assert full(mouths).shape == reduced(mouths).shape == (1, 6, 16)
    with pytest.raises(MissingWeightsError, match="vsr_trlrs2lrs3vox2avsp_base_updated.pth.*auto_avsr"):
        load_vsr_encoder(tmp_path)

    # Transformer-XL attention, written out: score(i, j) = (q_i + u).k_j + (q_i + v).W_pos r(i - j)
    attention = _randomised(RelativeSelfAttention(8, 2), 4)
    with torch.no_grad():
        attention.pos_bias_u.normal_()
        attention.pos_bias_v.normal_()
        x = torch.randn(1, 5, 8)
        positions = relative_positions(5, 8)  # offsets 4 ... -4
        q, k, v = (layer(x)[0].view(5, 2, 4) for layer in (attention.linear_q, attention.linear_k, attention.linear_v))
        p = attention.linear_pos(positions).view(9, 2, 4)
        scores = torch.empty(2, 5, 5)
        for i in range(5):
            for j in range(5):
                content = ((q[i] + attention.pos_bias_u) * k[j]).sum(-1)
                position = ((q[i] + attention.pos_bias_v) * p[4 - (i - j)]).sum(-1)
                scores[:, i, j] = (content + position) / 2.0
        expected = attention.linear_out(torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(5, 8))
        torch.testing.assert_close(attention(x, positions)[0], expected)


def test_syncnet_offset_search_on_a_stand_in_with_a_known_answer():
    """Features where video window i equals audio window i - 3: the search must report offset +3, LSE-D 0."""
    table = torch.randn(400, 8, generator=torch.Generator().manual_seed(0)).numpy()

    class KnownScorer(SyncScorer):
        def __init__(self):
            pass

        def video_features(self, crops):
            return table[crops[:-4, 0, 0, 0].astype(int)]

        def audio_features(self, mfcc, frames):
            return table[np.array(frames) - 3 + 50]

    crops = np.zeros((40, 224, 224, 3), np.uint8)
    crops[:, 0, 0, 0] = np.arange(60, 100) + 50 - 3 * 0  # video frame f (f = 60..99) -> table[f + 50]
    score = KnownScorer().score(crops, 60, np.zeros((13, 1)), 15)
    assert score.offset == 3 and score.lse_d == pytest.approx(0.0) and score.lse_c > 1
    assert (score.start_frame, score.num_frames) == (60, 36)


# --------------------------------------------------------------------------------------------------- videos


@needs_detector
def test_a_video_without_a_face_reports_the_audio_only(eval_weights):
    noise = np.random.default_rng(0).integers(0, 255, (20, 96, 96, 3), dtype=np.uint8)  # like the demo's output
    report = evaluate_frames(iter(noise), _speech_like(20)[1], options=EvaluationOptions(weights=eval_weights))
    data = report.to_dict()
    assert data["face"]["frames_with_face"] == 0 and "no face found" in data["skipped"]["face"]
    assert data["identity"]["per_second"] == [None] and data["syncnet"] is None
    assert (
        data["mouth_audio_correlation"]["correlation"] is None and data["mouth_audio_correlation"]["lag_frames"] is None
    )
    assert len(data["signals_per_second"]["audio_energy"]) == 1
    json.dumps(data, allow_nan=False)


@needs_detector
def test_tracking_interpolates_between_detections(portrait):
    frames = [np.roll(portrait, shift, axis=1) for shift in range(0, 22, 2)]  # moves 2 px per frame
    tracked = list(track_faces(iter(frames), detect_every=5))
    assert [t.index for t in tracked] == list(range(11))
    assert [t.face.detected for t in tracked] == [i % 5 == 0 for i in range(11)]
    xs = np.array([t.face.box[0] for t in tracked])
    np.testing.assert_allclose(np.diff(xs), 2, atol=1.5)


@needs_detector
def test_video_of_the_reference_itself_has_similarity_one_and_no_drift(portrait, eval_weights):
    report = evaluate_frames(
        iter([portrait] * 50), None, reference_image=portrait, options=EvaluationOptions(weights=eval_weights)
    )
    summary = report.to_dict()["identity"]
    assert summary["reference"] == "reference image"
    assert summary["per_second"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert summary["slope_per_minute"] == pytest.approx(0.0, abs=1e-4)
    assert report.skipped["syncnet"] == "the video has no audio"


@needs_detector
def test_a_face_that_changes_halfway_shows_as_a_step(portrait, eval_weights, tmp_path):
    other = np.ascontiguousarray(portrait[:, ::-1, ::-1])  # mirrored, colours swapped: another "person"
    path = _write_video(tmp_path / "step.mp4", [portrait] * 50 + [other] * 50)
    report = evaluate_file(path, reference_image=portrait, options=EvaluationOptions(weights=eval_weights))
    identity = report.to_dict()["identity"]
    first, second = identity["per_second"][:2], identity["per_second"][2:]
    # the random stand-in is sensitive to H.264's chroma loss, a real ArcFace much less: same face ~0.93 here
    assert min(first) > 0.85 and max(second) < min(first) - 0.3
    assert np.isfinite(report.identity[::5]).all() and np.isnan(report.identity[1::5]).all()  # detected frames
    assert identity["slope_per_minute"] < -5


@needs_detector
def test_audio_shifted_by_k_frames_is_found_by_the_mouth_energy_lag(portrait, mouth, tmp_path):
    levels, waveform = _speech_like(100, shift=3)
    frames = [_with_mouth(portrait, mouth, level) for level in levels]
    path = _write_video(tmp_path / "shifted.mp4", frames, waveform)
    report = evaluate_file(path, options=EvaluationOptions(weights=tmp_path / "none", detect_every=10))
    assert report.correlation.lag == 3 and report.correlation.correlation > 0.7
    assert "arcface_r50.pth" in report.skipped["identity"] and "syncnet_v2.model" in report.skipped["syncnet"]
    assert report.to_dict()["identity"] is None

    in_sync = evaluate_frames(iter(frames), _speech_like(100)[1], options=EvaluationOptions(weights=tmp_path))
    assert in_sync.correlation.lag == 0


@needs_detector
def test_cli_writes_report_json_and_png(portrait, mouth, eval_weights, tmp_path):
    _needs_matplotlib()
    from keyface.cli import main
    from keyface.emotion import EmotionCurve

    levels, waveform = _speech_like(75)
    emotion = EmotionCurve.constant("happy").to_json()
    video = _write_video(
        tmp_path / "talk.mp4", [_with_mouth(portrait, mouth, v) for v in levels], waveform, {"keyface_emotion": emotion}
    )
    Image.fromarray(portrait).save(tmp_path / "ref.png")
    out = tmp_path / "report"
    argv = ["evaluate", str(video), "--reference-image", str(tmp_path / "ref.png"), "--out", str(out)]
    assert main([*argv, "--weights", str(eval_weights), "--ground-truth", str(video)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["frames"] == 75 and data["duration_s"] == 3.0
    assert len(data["identity"]["per_second"]) == 3 and 0.5 < data["identity"]["mean"] <= 1
    assert data["syncnet"]["windows"][0]["frames"] == 46 and len(data["syncnet"]["windows"]) == 2
    assert -15 <= data["syncnet"]["offset_frames"] <= 15
    assert data["mouth_audio_correlation"]["lag_frames"] == 0
    happy = EmotionCurve.constant("happy").values_at(np.zeros(1))
    assert data["emotion"]["valence"] == pytest.approx([float(happy[0][0])] * 3, abs=1e-6)
    assert data["lipscore"]["frames_compared"] == 75 and data["lipscore"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert data["lipscore"]["encoder_blocks"] == 3
    with Image.open(out / "report.png") as figure:
        assert figure.format == "PNG" and figure.size[0] == 1000 and figure.size[1] >= 500


@needs_detector
def test_node_measures_images_and_audio(portrait, mouth, eval_weights, tmp_path):
    _needs_matplotlib()
    from helpers import execute_node

    from nodes import NODE_CLASS_MAPPINGS, host

    node = NODE_CLASS_MAPPINGS["KeyFaceEvaluate"]
    levels, waveform = _speech_like(50)
    images = torch.from_numpy(np.stack([_with_mouth(portrait, mouth, v) for v in levels])).float() / 255
    audio = {"waveform": torch.from_numpy(waveform)[None, None], "sample_rate": ENCODER_SAMPLE_RATE}
    (tmp_path / "eval").symlink_to(eval_weights)
    host.configure(models=tmp_path)
    try:
        plot, text = execute_node(
            node, video_path="", detect_every=5, images=images, audio=audio, reference_image=images[:1]
        ).result
    finally:
        host.configure(models=None)
    data = json.loads(text)
    assert plot.shape[0] == 1 and plot.shape[3] == 3 and plot.dtype == torch.float32
    assert data["frames"] == 50 and 0.5 < data["identity"]["mean"] <= 1 and data["syncnet"] is not None
    with pytest.raises(KeyFaceError, match="video_path: give a video file"):
        execute_node(node, video_path="", detect_every=5)


@needs_detector
def test_lipscore_is_one_against_itself_and_lower_against_other_lips(portrait, mouth, eval_weights):
    options = EvaluationOptions(weights=eval_weights)
    levels, _ = _speech_like(30, seed=1)
    others, _ = _speech_like(30, seed=2)
    generated = [_with_mouth(portrait, mouth, v) for v in levels]
    same = evaluate_frames(iter(generated), None, ground_truth=iter(generated), options=options)
    np.testing.assert_allclose(same.lipscore, 1.0, atol=1e-5)
    shorter = [_with_mouth(portrait, mouth, v) for v in others[:20]]
    other = evaluate_frames(iter(generated), None, ground_truth=iter(shorter), options=options)
    summary = other.to_dict()["lipscore"]
    assert summary["frames_compared"] == 20 and np.isnan(other.lipscore[20:]).all()
    assert summary["mean"] < 0.999 and "shorter" in other.skipped["lipscore_frames"]


@needs_detector
def test_memory_does_not_grow_with_the_length_of_the_video(portrait, mouth, eval_weights):
    """Peak Python/numpy allocations for 150 streamed frames stay near those for 50 (frames are never held)."""
    import tracemalloc

    levels, waveform = _speech_like(150)
    options = EvaluationOptions(weights=eval_weights, detect_every=10)

    def peak(num_frames: int) -> int:
        frames = (_with_mouth(portrait, mouth, levels[i]) for i in range(num_frames))
        tracemalloc.start()
        evaluate_frames(frames, waveform[: num_frames * SAMPLES_PER_FRAME], options=options)
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    short, long = peak(50), peak(150)
    held_video = 100 * portrait.nbytes  # what holding the 100 extra frames would add
    assert long - short < held_video / 4, (short, long)


def test_a_video_the_pipeline_made_carries_its_emotion_curve_to_the_report(demo_models, eval_weights, tmp_path):
    """End to end on the demo weights: ``generate`` writes the curve into the mp4, ``evaluate`` reads it back and
    measures the video (the demo's random networks draw no face, so only the face-free measures have numbers)."""
    from keyface.cli import main
    from keyface.demo import write_demo_inputs
    from keyface.emotion import parse_emotion

    image, audio = write_demo_inputs(tmp_path, seconds=1.2)
    video = tmp_path / "made.mp4"
    emotion = "neutral at 0 s, happy at 1 s"
    argv = ["generate", "--image", str(image), "--audio", str(audio), "--out", str(video), "--emotion", emotion]
    assert main([*argv, "--models", str(demo_models), "--device", "cpu", "--steps", "10"]) == 0
    report = evaluate_file(video, options=EvaluationOptions(weights=eval_weights)).to_dict()
    assert report["frames"] == 30 and report["duration_s"] == pytest.approx(1.2)
    valence, _ = parse_emotion(emotion).values_at(np.arange(2.0))
    assert report["emotion"]["valence"] == pytest.approx(list(valence), abs=1e-6)
    assert len(report["signals_per_second"]["audio_energy"]) == 2
    json.dumps(report, allow_nan=False)
