"""LipScore's mouth crops, streamed: the original's (68 FAN landmarks on auto_avsr's mean face) or, when its files
are missing, the five-landmark approximation (:func:`keyface.evaluate.tracking.mouth_crop`).

The original (auto_avsr's ``VideoProcess``, as KeyFace's LipScore calls it, colour kept) over a whole video:

1. 68 landmarks per frame (FAN on the detected face); frames without are filled in: linearly between the two
   neighbouring frames with landmarks, the first landmarks copied to the frames before, the last to those after;
2. each frame's landmarks smoothed: the mean over frames ``i - m ... i + m``, ``m = min(6, i, n - 1 - i)``,
   shifted so that its centroid is frame ``i``'s own;
3. a similarity transform (rotation, uniform scale, shift; OpenCV's ``estimateAffinePartial2D``, least median
   of squares) from the 8 stable points (nose ridge 28, nose tip 33, eye corners 36, 39, 42, 45, mouth corners
   48, 54) onto the same points of the 256 x 256 mean face, applied to the frame (bilinear, black border);
4. the 96 x 96 square centred on the mean of the warped mouth landmarks 48-67.

Here the same runs frame by frame: :class:`LandmarkSmoother` holds 6 frames ahead for the smoothing and at most
``max_gap`` frames waiting for landmarks, so memory does not grow with the video's length. Differences, only
where the original could not run on a stream or would fail: a run of more than ``max_gap`` frames without
landmarks is bridged by the last landmarks (held), frames before the first landmarks beyond ``max_gap`` get no
crop (not compared), and a square leaving the 256 x 256 face is moved inside it (the original stops there).
The detector's box is the pack's MTCNN one (the original's is RetinaFace's), and FAN runs where the detector
ran and found the face (every ``detect_every``-th frame, :mod:`keyface.evaluate.tracking`): the frames in
between, and those where the tracker holds an older face, are "missing" and filled in by step 1, as the
original's are where RetinaFace finds no face. With ``detect_every=1`` every frame has its own landmarks, as
in the original.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..constants import VIDEO_FPS
from ..errors import CheckpointError, KeyFaceError, MissingWeightsError
from .tracking import MOUTH_CROP, TrackedFrame, mouth_crop
from .weights import EvalWeights

MEAN_FACE_WEIGHTS = EvalWeights(
    file="20words_mean_face.npy",
    what="auto_avsr mean face (LipScore mouth crop)",
    origin=(
        "it comes from auto_avsr's preparation code (mpc001/auto_avsr, "
        "preparation/detectors/retinaface/20words_mean_face.npy, 68 x 2 points on a 256 x 256 face)"
    ),
)
MEAN_FACE_SIZE = 256
STABLE_POINTS = [28, 33, 36, 39, 42, 45, 48, 54]
MOUTH_POINTS = slice(48, 68)
SMOOTHING_HALF_WINDOW = 6  # auto_avsr's window_margin 12
MAX_GAP_FRAMES = VIDEO_FPS  # frames held waiting for landmarks (1 s)

MEAN_FACE_CROP = "fan68_mean_face"
FIVE_LANDMARK_CROP = "mtcnn5"


def load_mean_face(folder: str | os.PathLike) -> np.ndarray:
    """The ``(68, 2)`` float64 mean face of ``folder``; MissingWeightsError / CheckpointError as one line."""
    path = Path(folder).expanduser() / MEAN_FACE_WEIGHTS.file
    if not path.is_file():
        raise MissingWeightsError(MEAN_FACE_WEIGHTS.missing_message(folder))
    try:
        points = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{MEAN_FACE_WEIGHTS.what}: {path} is not a readable .npy file ({error}); {MEAN_FACE_WEIGHTS.origin}"
        ) from None
    if points.shape != (68, 2) or not np.issubdtype(points.dtype, np.number) or not np.isfinite(points).all():
        raise CheckpointError(
            f"{MEAN_FACE_WEIGHTS.what}: {path} holds a {points.dtype} array of shape {points.shape}, expected "
            f"68 x 2 finite points; {MEAN_FACE_WEIGHTS.origin}"
        )
    return points.astype(np.float64)


class LandmarkSmoother:
    """Steps 1-2 of the module doc on a stream: :meth:`push` ``(index, item, landmarks or None)`` per frame, in
    order; it returns the frames it can release, ``(index, item, smoothed landmarks or None)``, in order;
    :meth:`finish` releases the rest. At most ``max_gap + 2 * half_window + 1`` frames are held (:attr:`held`).
    """

    def __init__(self, half_window: int = SMOOTHING_HALF_WINDOW, max_gap: int = MAX_GAP_FRAMES) -> None:
        self.half_window, self.max_gap = int(half_window), int(max_gap)
        self._gap: list[tuple[int, Any]] = []  # frames without landmarks, waiting for the next ones
        self._last: np.ndarray | None = None  # the last frame's own landmarks (start of an interpolation)
        self._run: deque[tuple[int, Any, np.ndarray]] = deque(maxlen=2 * self.half_window + 1)
        self._count = 0  # frames with (filled-in) landmarks so far
        self._released = 0  # of which released

    @property
    def held(self) -> int:
        """Frames pushed and not yet released."""
        return len(self._gap) + self._count - self._released

    def push(self, index: int, item: Any, landmarks: np.ndarray | None) -> list[tuple[int, Any, np.ndarray | None]]:
        if landmarks is None:
            self._gap.append((index, item))
            return self._close_gap(None) if len(self._gap) > self.max_gap else []
        landmarks = np.asarray(landmarks, np.float64)
        released = self._close_gap(landmarks)
        self._last = landmarks
        return released + self._add(index, item, landmarks)

    def finish(self) -> list[tuple[int, Any, np.ndarray | None]]:
        released = self._close_gap(None)
        while self._released < self._count:
            released.append(self._release())
        return released

    def _close_gap(self, following: np.ndarray | None) -> list[tuple[int, Any, np.ndarray | None]]:
        """Fill the waiting frames: interpolated up to ``following``, held (``following`` None) or, before any
        landmarks, ``following`` copied (None: no crop)."""
        gap, self._gap = self._gap, []
        released: list[tuple[int, Any, np.ndarray | None]] = []
        for step, (index, item) in enumerate(gap, start=1):
            if self._last is None:
                filled = following
            elif following is None:
                filled = self._last
            else:
                filled = self._last + step / (len(gap) + 1) * (following - self._last)
            released.extend([(index, item, None)] if filled is None else self._add(index, item, filled))
        return released

    def _add(self, index: int, item: Any, landmarks: np.ndarray) -> list[tuple[int, Any, np.ndarray]]:
        self._run.append((index, item, landmarks))
        self._count += 1
        released = []
        while self._released + self.half_window < self._count:
            released.append(self._release())
        return released

    def _release(self) -> tuple[int, Any, np.ndarray]:
        position = self._released
        margin = min(self.half_window, position, self._count - 1 - position)
        first = self._count - len(self._run)  # run position of self._run[0]
        window = [self._run[p - first][2] for p in range(position - margin, position + margin + 1)]
        index, item, own = self._run[position - first]
        smoothed = np.mean(window, axis=0)
        smoothed += own.mean(axis=0) - smoothed.mean(axis=0)
        self._released += 1
        return index, item, smoothed


def mean_face_transform(landmarks: np.ndarray, mean_face: np.ndarray) -> np.ndarray | None:
    """The 2 x 3 similarity transform of step 3 (frame -> mean face), None when it cannot be fitted."""
    import cv2

    matrix, _ = cv2.estimateAffinePartial2D(
        landmarks[STABLE_POINTS].astype(np.float64), mean_face[STABLE_POINTS].astype(np.float64), method=cv2.LMEDS
    )
    return matrix


def mean_face_mouth(image: np.ndarray, landmarks: np.ndarray, mean_face: np.ndarray) -> np.ndarray | None:
    """Steps 3-4: the ``(96, 96, 3)`` float32 RGB (0-255) mouth square of one frame given its smoothed
    ``(68, 2)`` landmarks, None when no transform fits. One warp straight into the square (the same pixels
    as warping the whole 256 x 256 face, then cutting)."""
    import cv2

    matrix = mean_face_transform(landmarks, mean_face)
    if matrix is None:
        return None
    centre = (landmarks[MOUTH_POINTS] @ matrix[:, :2].T + matrix[:, 2]).mean(axis=0)
    origin = np.clip(np.round(centre - MOUTH_CROP / 2), 0, MEAN_FACE_SIZE - MOUTH_CROP)
    to_square = matrix.copy()
    to_square[:, 2] -= origin
    return cv2.warpAffine(
        np.asarray(image, np.float32),
        to_square,
        (MOUTH_CROP, MOUTH_CROP),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


class MouthCropper(Protocol):
    """Mouth squares ``(96, 96, 3)`` of a stream of tracked frames: :meth:`push` per frame returns the
    ``(index, square or None)`` it can release (in order), :meth:`finish` the rest."""

    method: str

    def push(self, tracked: TrackedFrame) -> list[tuple[int, np.ndarray | None]]: ...

    def finish(self) -> list[tuple[int, np.ndarray | None]]: ...


class FiveLandmarkMouths:
    """The fallback: :func:`~keyface.evaluate.tracking.mouth_crop` on the tracker's five landmarks, at once."""

    method = FIVE_LANDMARK_CROP

    def push(self, tracked: TrackedFrame) -> list[tuple[int, np.ndarray | None]]:
        return [(tracked.index, None if tracked.face is None else mouth_crop(tracked.image, tracked.face))]

    def finish(self) -> list[tuple[int, np.ndarray | None]]:
        return []


class MeanFaceMouths:
    """The original's crop (module doc): FAN on each detected face, filled in, smoothed, warped to the mean face."""

    method = MEAN_FACE_CROP

    def __init__(self, landmarker, mean_face: np.ndarray, max_gap: int = MAX_GAP_FRAMES) -> None:
        self.landmarker, self.mean_face = landmarker, mean_face
        self.smoother = LandmarkSmoother(max_gap=max_gap)

    def push(self, tracked: TrackedFrame) -> list[tuple[int, np.ndarray | None]]:
        face = tracked.face
        found = self.landmarker.landmarks(tracked.image, face.box) if face is not None and face.detected else None
        return self._squares(self.smoother.push(tracked.index, tracked.image, found))

    def finish(self) -> list[tuple[int, np.ndarray | None]]:
        return self._squares(self.smoother.finish())

    def _squares(self, released) -> list[tuple[int, np.ndarray | None]]:
        return [
            (index, None if landmarks is None else mean_face_mouth(image, landmarks, self.mean_face))
            for index, image, landmarks in released
        ]


def load_mouth_cropper(folder: str | os.PathLike, device: str = "cpu") -> tuple[Callable[[], MouthCropper], str | None]:
    """A factory of the mouth cropper to use (one per video) and, when it is the fallback, why: the FAN and
    mean-face files of ``folder`` give :class:`MeanFaceMouths`, else :class:`FiveLandmarkMouths`."""
    from .landmarks import FaceLandmarker

    problems = []
    landmarker = mean_face = None
    try:
        landmarker = FaceLandmarker.from_folder(folder, device)
    except KeyFaceError as error:
        problems.append(str(error))
    try:
        mean_face = load_mean_face(folder)
    except KeyFaceError as error:
        problems.append(str(error))
    if problems:
        return FiveLandmarkMouths, "; ".join(problems)
    return (lambda: MeanFaceMouths(landmarker, mean_face)), None
