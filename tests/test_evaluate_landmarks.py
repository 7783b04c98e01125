"""LipScore's original mouth crop: the FAN landmark network, its heatmap decoding, the mean-face warp, the streamed
smoothing, and the five-landmark fallback with the report's field.

The FAN is a tiny random-initialised stand-in of the real architecture saved under the real file name and key
layout, read back through the evaluation weight loader. The mean face is a synthetic 68-point face (the real
``20words_mean_face.npy`` is a user-supplied file, like the weights).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from helpers import NO_FACE_DETECTOR, face_detector_available
from PIL import Image

from keyface.errors import CheckpointError, MissingWeightsError
from keyface.evaluate import EvaluationOptions, evaluate_frames
from keyface.evaluate.landmarks import FAN_WEIGHTS, FaceLandmarker, Fan, FanConfig, decode_heatmaps, face_crop_box
from keyface.evaluate.lipscore import VSR_WEIGHTS, VsrEncoder, VsrEncoderConfig
from keyface.evaluate.mouth import (
    FIVE_LANDMARK_CROP,
    MEAN_FACE_CROP,
    MEAN_FACE_WEIGHTS,
    FiveLandmarkMouths,
    LandmarkSmoother,
    MeanFaceMouths,
    load_mean_face,
    load_mouth_cropper,
    mean_face_mouth,
    mean_face_transform,
)
from keyface.evaluate.tracking import TrackedFace, TrackedFrame

TINY_FAN = FanConfig(features=32, stem=8, stem_features=16)
TINY_VSR = VsrEncoderConfig(
    blocks=1, dim=16, heads=2, feed_forward=32, kernel=5, stem=8, trunk_widths=(8, 8, 8, 16), trunk_blocks=(1, 1, 1, 1)
)
SIDE = 160


def _synthetic_mean_face() -> np.ndarray:
    """A 68-point face in the 256 x 256 reference frame, in the iBUG 68 order (jaw, brows, nose, eyes, mouth)."""
    t = np.linspace(-1, 1, 17)
    jaw = np.stack([128 + 70 * t, 110 + 80 * np.sqrt(1 - 0.8 * t**2)], 1)
    brows = np.stack([np.r_[np.linspace(75, 115, 5), np.linspace(141, 181, 5)], np.full(10, 80.0)], 1)
    ridge = np.stack([np.full(4, 128.0), np.linspace(95, 125, 4)], 1)
    nostrils = np.stack([np.linspace(113, 143, 5), np.full(5, 138.0)], 1)
    angles = np.pi - np.arange(6) * np.pi / 3  # from the outer corner, over the top

    def eye(cx: float, outer_left: bool) -> np.ndarray:
        sign = 1 if outer_left else -1
        return np.stack([cx - sign * 13 * np.cos(angles), 97 - 5 * np.sin(angles)], 1)

    outer = np.pi - np.arange(12) * np.pi / 6  # 48 left corner, 54 right corner
    inner = np.pi - np.arange(8) * np.pi / 4
    mouth = np.stack([128 + 24 * np.cos(outer), 160 - 10 * np.sin(outer)], 1)
    lips = np.stack([128 + 15 * np.cos(inner), 160 - 4 * np.sin(inner)], 1)
    points = np.concatenate([jaw, brows, ridge, nostrils, eye(100, True), eye(156, False), mouth, lips])
    assert points.shape == (68, 2)
    return points


def _similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift)[:, None]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _tiny_fan(seed: int = 0) -> Fan:
    torch.manual_seed(seed)
    return Fan(TINY_FAN).eval()


@pytest.fixture(scope="module")
def lipscore_folder(tmp_path_factory):
    """An evaluation folder with the VSR encoder only (fallback crop) and one with FAN and the mean face too."""
    vsr_only = tmp_path_factory.mktemp("vsr_only")
    torch.manual_seed(3)
    encoder = VsrEncoder(TINY_VSR).state_dict()
    torch.save({"encoder." + key: value for key, value in encoder.items()}, vsr_only / VSR_WEIGHTS.file)
    full = tmp_path_factory.mktemp("full")
    (full / VSR_WEIGHTS.file).write_bytes((vsr_only / VSR_WEIGHTS.file).read_bytes())
    torch.save(_tiny_fan().state_dict(), full / FAN_WEIGHTS.file)
    np.save(full / MEAN_FACE_WEIGHTS.file, _synthetic_mean_face())
    return vsr_only, full


# ------------------------------------------------------------------------------------------------------ FAN


def test_fan_stand_in_loads_through_the_eval_loader_with_the_released_layout(tmp_path):
    torch.save(_tiny_fan().state_dict(), tmp_path / FAN_WEIGHTS.file)
    landmarker = FaceLandmarker.from_folder(tmp_path)
    assert landmarker.network.config == TINY_FAN
    crops = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        heatmaps = landmarker.network(crops)
        torch.testing.assert_close(heatmaps, _tiny_fan()(crops))
    assert heatmaps.shape == (2, 68, 64, 64)

    # the released 2dfan2's layout: stem, two hourglasses of depth 4, heatmap feedback only between them
    state = Fan().state_dict()
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "conv1.bias": (64,),
        "conv2.downsample.2.weight": (128, 64, 1, 1),
        "conv4.conv3.weight": (64, 64, 3, 3),
        "m0.b1_4.conv1.weight": (128, 256, 3, 3),
        "m1.b2_plus_1.conv2.weight": (64, 128, 3, 3),
        "top_m_1.bn3.running_var": (64,),
        "bl0.weight": (256, 256, 1, 1),
        "al0.weight": (256, 68, 1, 1),
        "l1.weight": (68, 256, 1, 1),
    }
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    assert "bl1.weight" not in state and "conv3.downsample.0.weight" not in state and "m2.b1_4.bn1.weight" not in state
    assert FanConfig.from_state_dict(state) == FanConfig()

    with pytest.raises(MissingWeightsError) as error:
        FaceLandmarker.from_folder(tmp_path / "none")
    assert "2dfan2.pth" in str(error.value) and "hhj1897/face_alignment" in str(error.value)
    assert "\n" not in str(error.value)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / FAN_WEIGHTS.file)
    with pytest.raises(CheckpointError, match="holds another network"):
        FaceLandmarker.from_folder(tmp_path)


def test_heatmap_decoding_has_the_exact_sub_pixel_centroid_around_the_peak():
    heatmaps = torch.zeros(1, 3, 64, 64)
    heatmaps[0, 0, 10, 20], heatmaps[0, 0, 10, 21] = 3.0, 1.0  # x: (20.5 * 3 + 21.5) / 4
    heatmaps[0, 0, 11, 20] = -5.0  # negative: ignored
    heatmaps[0, 0, 50, 50] = 2.5  # a second blob 50 px away: outside the 6.4 px disc
    heatmaps[0, 1, 30:32, 40] = torch.tensor([1.0, 3.0])  # y: (30.5 + 31.5 * 3) / 4
    heatmaps[0, 2, 5, 5] = 1.0
    heatmaps[0, 2, 5 + 6, 5] = 1.0  # 6 px from the peak: inside the disc
    points, scores = decode_heatmaps(heatmaps)
    np.testing.assert_allclose(points[0], [[20.75, 10.5], [40.5, 31.25], [5.5, 8.5]], atol=1e-5)
    np.testing.assert_allclose(scores[0], [3.0, 3.0, 1.0])


def test_landmarks_are_mapped_from_the_heatmap_to_frame_pixels():
    """The crop square is ibug's (mean side / 0.55 + 1 px, zero-padded off the frame), the 64 x 64 heatmap
    spans it: a peak at heatmap (16, 31) lands at left + 16.5 * side / 64."""

    class PeakAt(torch.nn.Module):
        def forward(self, crops):
            self.crops = crops
            heatmaps = torch.zeros(crops.shape[0], 68, 64, 64)
            heatmaps[:, :, 31, 16] = 1.0
            return heatmaps

    assert face_crop_box(np.array([100.0, 50, 110, 110])) == (55, 5, 256, 206)
    network = PeakAt()
    image = np.full((120, 200, 3), 255, np.uint8)
    points = FaceLandmarker(network).landmarks(image, np.array([100.0, 50, 110, 110]))
    np.testing.assert_allclose(points, np.tile([55 + 16.5 * 201 / 64, 5 + 31.5 * 201 / 64], (68, 1)))
    crops = network.crops[0].numpy()
    assert crops.shape == (3, 256, 256) and crops.max() == pytest.approx(1.0)
    assert crops[:, 250:, :].max() == 0.0 and crops[:, :, 250:].max() == 0.0  # below and right of the frame


# ------------------------------------------------------------------------------------------- mean-face warp


def test_a_frame_warped_with_a_known_transform_is_mapped_back_onto_the_mean_face():
    mean_face = _synthetic_mean_face()
    ys, xs = np.mgrid[0:256, 0:256].astype(np.float32)
    texture = np.stack([127 + 100 * np.sin(xs / 9), 127 + 100 * np.cos(ys / 11), 127 + 60 * np.sin((xs + ys) / 13)], -1)
    to_frame = _similarity(1.3, 12.0, (60.0, 20.0))  # mean face -> frame
    frame = cv2.warpAffine(texture.astype(np.float32), to_frame, (420, 400), flags=cv2.INTER_LINEAR)
    landmarks = _apply(to_frame, mean_face)

    back = mean_face_transform(landmarks, mean_face)
    assert np.abs(_apply(back, landmarks) - mean_face).max() < 0.5  # every landmark, not only the 8 fitted
    outlier = landmarks.copy()
    outlier[28] += 40  # one stable point far off: the least-median fit ignores it
    assert np.abs(_apply(mean_face_transform(outlier, mean_face), landmarks) - mean_face).max() < 0.5

    square = mean_face_mouth(frame, landmarks, mean_face)
    x0, y0 = np.round(mean_face[48:68].mean(axis=0) - 48).astype(int)  # the 96 x 96 square on the mouth
    expected = texture[y0 : y0 + 96, x0 : x0 + 96]
    assert square.shape == (96, 96, 3) and square.dtype == np.float32
    assert np.abs(square - expected).mean() < 1.0 and np.abs(square - expected).max() < 8.0


def test_the_streamed_cropper_fills_in_frames_between_detections():
    """A still face warped off the mean face, with landmarks (a stand-in FAN giving the true ones) on every 5th
    frame only: every frame's square is the mean face's mouth square, released in order."""
    mean_face = _synthetic_mean_face()
    ys, xs = np.mgrid[0:256, 0:256].astype(np.float32)
    texture = np.repeat((127 + 100 * np.sin(xs / 9) * np.cos(ys / 7))[..., None], 3, axis=-1)
    to_frame = _similarity(0.8, -8.0, (30.0, 40.0))
    frame = cv2.warpAffine(texture, to_frame, (300, 300), flags=cv2.INTER_LINEAR)

    class TrueLandmarks:
        calls = 0

        def landmarks(self, image, box):
            TrueLandmarks.calls += 1
            return _apply(to_frame, mean_face)

    cropper = MeanFaceMouths(TrueLandmarks(), mean_face)
    face = TrackedFace(np.array([80.0, 80, 120, 120]), np.zeros((5, 2)), True)
    between = TrackedFace(face.box, face.landmarks, False)
    released = []
    for index in range(23):
        released += cropper.push(TrackedFrame(index, frame, face if index % 5 == 0 else between))
    released += cropper.finish()
    assert [index for index, _ in released] == list(range(23)) and TrueLandmarks.calls == 5
    x0, y0 = np.round(mean_face[48:68].mean(axis=0) - 48).astype(int)
    expected = texture[y0 : y0 + 96, x0 : x0 + 96]
    for _, square in released:
        assert np.abs(square - expected).mean() < 1.0


# ------------------------------------------------------------------------------------------------ smoothing


def _whole_video(landmarks: list, half: int = 6) -> list[np.ndarray]:
    """auto_avsr's VideoProcess on a whole list, written out: fill in, then smooth over min(6, i, n - 1 - i)."""
    n, valid = len(landmarks), [i for i, points in enumerate(landmarks) if points is not None]
    filled = list(landmarks)
    for start, stop in zip(valid, valid[1:], strict=False):
        for i in range(start + 1, stop):
            filled[i] = landmarks[start] + (i - start) / (stop - start) * (landmarks[stop] - landmarks[start])
    filled = (
        [landmarks[valid[0]]] * valid[0]
        + filled[valid[0] : valid[-1] + 1]
        + [landmarks[valid[-1]]] * (n - 1 - valid[-1])
    )
    smoothed = []
    for i in range(n):
        margin = min(half, i, n - 1 - i)
        mean = np.mean(filled[i - margin : i + margin + 1], axis=0)
        smoothed.append(mean + filled[i].mean(axis=0) - mean.mean(axis=0))
    return smoothed


def test_streamed_smoothing_equals_the_whole_video_algorithm_and_holds_a_bounded_window():
    rng = np.random.default_rng(0)
    missing = {0, 1, 2, *range(10, 15), 30, 57, 58, 59}
    sequence = [None if i in missing else rng.uniform(0, 200, (68, 2)) for i in range(60)]
    smoother = LandmarkSmoother(half_window=6, max_gap=25)
    released = []
    for index, points in enumerate(sequence):
        released += smoother.push(index, f"frame {index}", points)
    released += smoother.finish()
    assert [index for index, _, _ in released] == list(range(60))
    assert [item for _, item, _ in released] == [f"frame {i}" for i in range(60)]
    np.testing.assert_allclose(np.stack([points for _, _, points in released]), np.stack(_whole_video(sequence)))
    # frame 20: the mean of frames 14-26, moved onto frame 20's own centroid
    window = np.mean(_whole_video(sequence, half=0)[14:27], axis=0)
    np.testing.assert_allclose(released[20][2], window + sequence[20].mean(0) - window.mean(0))

    # a long video with landmarks every 5th frame and a 100-frame gap: what is held stays bounded
    smoother, most_held, count = LandmarkSmoother(half_window=6, max_gap=25), 0, 0
    for index in range(1000):
        points = rng.uniform(0, 200, (68, 2)) if index % 5 == 0 and not 400 <= index < 500 else None
        count += len(smoother.push(index, None, points))
        most_held = max(most_held, smoother.held)
    count += len(smoother.finish())
    assert count == 1000 and most_held <= 25 + 2 * 6 + 1


def test_frames_before_the_first_landmarks_beyond_the_gap_limit_have_none():
    smoother = LandmarkSmoother(half_window=2, max_gap=3)
    released = [r for i in range(5) for r in smoother.push(i, i, None)]
    released += smoother.push(5, 5, np.ones((68, 2))) + smoother.finish()
    assert [index for index, _, _ in released] == list(range(6))
    assert [points is None for _, _, points in released] == [True] * 4 + [False] * 2


# ------------------------------------------------------------------------------------- fallback and report


def test_mean_face_file_is_read_without_pickle_and_checked(tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        load_mean_face(tmp_path)
    assert str(tmp_path / "20words_mean_face.npy") in str(error.value) and "mpc001/auto_avsr" in str(error.value)
    np.save(tmp_path / MEAN_FACE_WEIGHTS.file, np.zeros((5, 2)))
    with pytest.raises(CheckpointError, match="shape \\(5, 2\\).*68 x 2"):
        load_mean_face(tmp_path)
    np.save(tmp_path / MEAN_FACE_WEIGHTS.file, np.array([{"points": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="not a readable .npy"):
        load_mean_face(tmp_path)
    np.save(tmp_path / MEAN_FACE_WEIGHTS.file, _synthetic_mean_face().astype(np.float32))
    np.testing.assert_allclose(load_mean_face(tmp_path), _synthetic_mean_face(), atol=1e-4)


def test_the_fallback_is_chosen_when_a_file_is_missing(lipscore_folder, tmp_path):
    vsr_only, full = lipscore_folder
    make, reason = load_mouth_cropper(vsr_only)
    assert make is FiveLandmarkMouths and "2dfan2.pth" in reason and "20words_mean_face.npy" in reason
    assert "\n" not in reason
    (tmp_path / FAN_WEIGHTS.file).write_bytes((full / FAN_WEIGHTS.file).read_bytes())
    make, reason = load_mouth_cropper(tmp_path)
    assert make is FiveLandmarkMouths and "20words_mean_face.npy" in reason and "2dfan2" not in reason
    make, reason = load_mouth_cropper(full)
    assert reason is None and isinstance(make(), MeanFaceMouths)


@pytest.mark.skipif(not face_detector_available(), reason=NO_FACE_DETECTOR)
def test_report_says_which_mouth_crop_lipscore_used(lipscore_folder, portrait_path, caplog):
    vsr_only, full = lipscore_folder
    portrait = np.asarray(Image.open(portrait_path).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR))
    frames = [np.roll(portrait, shift, axis=1).copy() for shift in range(0, 24, 2)]  # a moving face, 12 frames

    def lipscore(folder):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="keyface.evaluate.report"):
            report = evaluate_frames(
                iter(frames), None, ground_truth=iter(frames), options=EvaluationOptions(weights=folder)
            )
        lines = [record for record in caplog.records if "mouth crop" in record.getMessage()]
        assert len(lines) == 1
        return report.to_dict()["lipscore"], lines[0]

    original, line = lipscore(full)
    assert original["mouth_crop"] == MEAN_FACE_CROP and original["mouth_crop_fallback"] is None
    assert line.levelno == logging.INFO and "mean face" in line.getMessage()
    # FAN ran on the detected frames 0, 5, 10; the others were filled in; every frame was compared
    assert original["frames_compared"] == len(frames) and original["mean"] == pytest.approx(1.0, abs=1e-5)

    shorter = evaluate_frames(
        iter(frames), None, ground_truth=iter(frames[:8]), options=EvaluationOptions(weights=full)
    )
    assert shorter.to_dict()["lipscore"]["frames_compared"] == 8 and np.isnan(shorter.lipscore[8:]).all()
    assert "shorter" in shorter.skipped["lipscore_frames"]

    fallback, line = lipscore(vsr_only)
    assert fallback["mouth_crop"] == FIVE_LANDMARK_CROP and "2dfan2.pth" in fallback["mouth_crop_fallback"]
    assert line.levelno == logging.WARNING and "20words_mean_face.npy" in line.getMessage()
    assert fallback["frames_compared"] == len(frames) and fallback["mean"] == pytest.approx(1.0, abs=1e-5)
