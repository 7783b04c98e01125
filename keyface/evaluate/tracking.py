"""Per-frame face tracking over a streamed video, and the crops each metric needs.

Frames are decoded one at a time; the pack's MTCNN detector (:func:`keyface.face.detect_faces`) runs on
every ``detect_every``-th frame (default 5: five detections per second at 25 fps). The box and the five
landmarks of the frames in between are interpolated linearly between the two neighbouring detections, so
at most ``detect_every`` frames are held at any time: memory does not grow with the video's length. A
detection that finds no face keeps the previous one (the face of a talking-head video does not vanish);
frames before the first face have none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

DEFAULT_DETECT_EVERY = 5

# ArcFace's 112 x 112 alignment template for the five landmarks (eyes, nose tip, mouth corners), in pixels.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
ARCFACE_SIZE = 112


@dataclass(frozen=True)
class TrackedFace:
    """The face of one frame: ``box`` (x, y, width, height) and ``landmarks`` (5, 2), in frame pixels."""

    box: np.ndarray
    landmarks: np.ndarray
    detected: bool  # True on frames where the detector ran and found it, False when interpolated or held

    @classmethod
    def from_detection(cls, face) -> TrackedFace:
        """From a :class:`keyface.face.FaceDetection`."""
        return cls(np.array([face.x, face.y, face.width, face.height]), np.array(face.landmarks, np.float64), True)


@dataclass(frozen=True)
class TrackedFrame:
    index: int
    image: np.ndarray  # uint8 RGB (height, width, 3)
    face: TrackedFace | None


def _detect(image: np.ndarray) -> TrackedFace | None:
    from ..face import detect_faces

    faces = detect_faces(image)
    if not faces:
        return None
    return TrackedFace.from_detection(faces[0])


def _between(start: TrackedFace, stop: TrackedFace, weight: float) -> TrackedFace:
    return TrackedFace(
        (1 - weight) * start.box + weight * stop.box, (1 - weight) * start.landmarks + weight * stop.landmarks, False
    )


def _held(face: TrackedFace | None) -> TrackedFace | None:
    return None if face is None else TrackedFace(face.box, face.landmarks, False)


def track_faces(frames: Iterable[np.ndarray], detect_every: int = DEFAULT_DETECT_EVERY) -> Iterator[TrackedFrame]:
    """Yield every frame with its face, in order, holding at most ``detect_every`` frames (module doc)."""
    if int(detect_every) < 1:
        raise InputError(f"detect_every: must be at least 1, got {detect_every}")
    detect_every = int(detect_every)
    pending: list[tuple[int, np.ndarray]] = []
    last: TrackedFace | None = None
    last_index = -1
    for index, image in enumerate(frames):
        if index % detect_every:
            pending.append((index, image))
            continue
        found = _detect(image)
        for waiting_index, waiting in pending:
            if last is not None and found is not None:
                face = _between(last, found, (waiting_index - last_index) / (index - last_index))
            else:
                face = _held(last)
            yield TrackedFrame(waiting_index, waiting, face)
        pending.clear()
        if found is not None:
            last, last_index = found, index
        yield TrackedFrame(index, image, found if found is not None else _held(last))
    for waiting_index, waiting in pending:
        yield TrackedFrame(waiting_index, waiting, _held(last))


def _similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 rotation + uniform scale + shift mapping ``source`` points onto ``target`` (least squares)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    src, dst = source - source_mean, target - target_mean
    # Complex least squares: dst = a * src with a = scale * e^{i angle}.
    zs, zt = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    a = (np.conj(zs) * zt).sum() / max((np.abs(zs) ** 2).sum(), 1e-12)
    rotation = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.hstack([rotation, (target_mean - rotation @ source_mean)[:, None]])


def arcface_crop(image: np.ndarray, face: TrackedFace) -> np.ndarray:
    """The 112 x 112 uint8 RGB face aligned on ArcFace's five-point template (what ArcFace was trained on)."""
    import cv2

    matrix = _similarity_transform(face.landmarks, ARCFACE_TEMPLATE)
    return cv2.warpAffine(image, matrix, (ARCFACE_SIZE, ARCFACE_SIZE), borderMode=cv2.BORDER_REPLICATE)


def _crop_resized(image: np.ndarray, centre: tuple[float, float], half: float, size: int) -> np.ndarray:
    """A square of side ``2 * half`` around ``centre`` (edge-padded where it leaves the frame), resized."""
    import cv2

    half = max(half, 1.0)
    x0, y0 = centre[0] - half, centre[1] - half
    scale = size / (2 * half)
    matrix = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


# SyncNet's face crop (syncnet_python): a square 1.4 times the detected face's half size on each side,
# its centre moved down by 0.4 half sizes (mouth and chin fully inside), resized to 224 x 224.
SYNCNET_CROP_SCALE = 0.4
SYNCNET_SIZE = 224


def syncnet_crop(image: np.ndarray, face: TrackedFace) -> np.ndarray:
    """SyncNet's 224 x 224 uint8 RGB face crop of one frame."""
    x, y, width, height = face.box
    half = max(width, height) / 2
    centre = (x + width / 2, y + height / 2 + SYNCNET_CROP_SCALE * half)
    return _crop_resized(image, centre, half * (1 + SYNCNET_CROP_SCALE), SYNCNET_SIZE)


# LipScore's fallback mouth crop (keyface.evaluate.mouth has the original's): 96 x 96 around the mouth.
MOUTH_CROP = 96
MOUTH_CROP_WIDTHS = 2.0  # crop side in mouth-corner distances (approximates the 68-landmark mean-face crop)


def mouth_crop(image: np.ndarray, face: TrackedFace) -> np.ndarray:
    """The ``(96, 96, 3)`` float32 RGB (0-255) mouth square of one frame from the five landmarks: levelled,
    scaled so that its side is ``MOUTH_CROP_WIDTHS`` mouth-corner distances, centred on the corners' midpoint."""
    import cv2

    left, right = face.landmarks[3], face.landmarks[4]
    centre = (left + right) / 2
    width = max(float(np.hypot(*(right - left))), 1.0)
    angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
    matrix = cv2.getRotationMatrix2D(
        (float(centre[0]), float(centre[1])), angle, MOUTH_CROP / (MOUTH_CROP_WIDTHS * width)
    )
    matrix[:, 2] += MOUTH_CROP / 2 - centre
    crop = cv2.warpAffine(
        image, matrix, (MOUTH_CROP, MOUTH_CROP), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE
    )
    return crop.astype(np.float32)


def mouth_openness(image: np.ndarray, face: TrackedFace) -> float:
    """How open the mouth looks: darkness of the mouth region relative to the face, about 0 (closed) to 1.

    MTCNN gives only the mouth corners, not the lips, so the opening is read from the pixels: an open mouth
    shows the dark oral cavity between the lips. Mouth band: centred on the midpoint of the two corners,
    0.8 corner distances wide and 0.7 high; reference: the face box's middle (cheeks and nose, rows 30-60 %,
    columns 20-80 %). Value: ``1 - mean luminance(mouth band) / mean luminance(reference)``. Only its changes
    over time matter (it is correlated with the audio energy), not its absolute level.
    """
    left, right = face.landmarks[3], face.landmarks[4]
    width = float(np.hypot(*(right - left)))
    if width < 2:
        return float("nan")
    luminance = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    cx, cy = (left + right) / 2
    mouth = luminance[
        max(0, int(cy - 0.35 * width)) : max(0, int(cy + 0.35 * width)) + 1,
        max(0, int(cx - 0.4 * width)) : max(0, int(cx + 0.4 * width)) + 1,
    ]
    x, y, box_width, box_height = face.box
    cheeks = luminance[
        max(0, int(y + 0.3 * box_height)) : max(0, int(y + 0.6 * box_height)) + 1,
        max(0, int(x + 0.2 * box_width)) : max(0, int(x + 0.8 * box_width)) + 1,
    ]
    if mouth.size == 0 or cheeks.size == 0 or cheeks.mean() <= 0:
        return float("nan")
    return float(1.0 - mouth.mean() / cheeks.mean())
