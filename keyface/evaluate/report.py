"""Evaluate a generated talking-head video: one streamed pass over its frames, then the report.

:func:`evaluate_file` (a video file) and :func:`evaluate_frames` (frames + audio, e.g. from ComfyUI) return
an :class:`EvaluationReport`: plain per-second / per-window numbers (JSON-ready) and the list of what was
skipped and why. Per frame only scalars are kept (mouth openness, identity similarity); frames, crops and
network features live only for one SyncNet window (``sync_window`` frames), LipScore's mouth-crop window
(:mod:`keyface.evaluate.mouth`) and encoder chunk, so memory does not grow with the length of the video. The audio track is decoded whole (16 kHz mono: 3.8 MB per minute).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import EMOTION_METADATA_KEY, VIDEO_FPS
from ..errors import InputError, KeyFaceError
from . import signals
from .tracking import (
    DEFAULT_DETECT_EVERY,
    TrackedFace,
    arcface_crop,
    mouth_openness,
    syncnet_crop,
    track_faces,
)
from .weights import DEFAULT_EVAL_FOLDER

logger = logging.getLogger(__name__)

SECONDS_PER_MINUTE = 60
IDENTITY_BATCH = 16
# Metadata entry holding the emotion curve JSON the video was generated with (keyface.emotion.EmotionCurve).
LIPSCORE_NEEDS_GROUND_TRUTH = "no ground-truth video given (--ground-truth)"


@dataclass(frozen=True)
class EvaluationOptions:
    """How the video is measured.

    Attributes:
        weights: folder with the evaluation networks (``arcface_r50.pth``, ``syncnet_v2.model``, ...).
        detect_every: run the face detector (and, for LipScore, FAN) on every n-th frame, interpolate in between.
        sync_window: frames per SyncNet window (LSE-C / LSE-D over time).
        correlation_window: frames per window of the mouth-open / audio-energy correlation.
        max_offset: frames searched on each side for the best audio offset (both sync measures).
        lipscore_blocks: conformer blocks of the VSR encoder to use (None: all of the file's).
        device: torch device of the networks.
    """

    weights: Path = DEFAULT_EVAL_FOLDER
    detect_every: int = DEFAULT_DETECT_EVERY
    sync_window: int = 2 * VIDEO_FPS
    correlation_window: int = 5 * VIDEO_FPS
    max_offset: int = 15
    lipscore_blocks: int | None = None
    device: str = "cpu"


@dataclass
class EvaluationReport:
    """What :func:`evaluate_frames` measured; :meth:`to_dict` is the JSON report."""

    num_frames: int
    fps: float
    frames_with_face: int
    detect_every: int
    mouth_open: np.ndarray  # (frames,)
    audio_energy: np.ndarray | None  # (frames,) log RMS, None without audio
    identity: np.ndarray | None  # (frames,) cosine similarity on detected frames, NaN elsewhere
    identity_reference: str | None
    correlation: signals.LaggedCorrelation | None
    correlation_windows: list[signals.LaggedCorrelation]
    correlation_window: int
    sync_windows: list[Any]  # syncnet.SyncScore
    emotion: dict[str, list[float]] | None  # per second: "valence", "arousal"
    lipscore: np.ndarray | None = None  # (frames,) cosine similarity to the ground truth, NaN where not compared
    lipscore_blocks: int | None = None
    lipscore_mouth_crop: str | None = None  # keyface.evaluate.mouth.MEAN_FACE_CROP or FIVE_LANDMARK_CROP
    lipscore_mouth_crop_fallback: str | None = None  # why the five-landmark crop was used
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def identity_summary(self) -> dict[str, Any] | None:
        if self.identity is None:
            return None
        per_second = signals.per_period(self.identity, round(self.fps))
        return {
            "reference": self.identity_reference,
            "mean": _number(np.nanmean(self.identity)) if np.isfinite(self.identity).any() else None,
            "per_second": _numbers(per_second),
            "per_minute": _numbers(signals.per_period(self.identity, round(self.fps) * SECONDS_PER_MINUTE)),
            "slope_per_minute": _number(signals.slope_per_minute(self.identity, self.fps)),
        }

    def lipscore_summary(self) -> dict[str, Any] | None:
        if self.lipscore is None:
            return None
        compared = np.isfinite(self.lipscore)
        return {
            "mean": _number(np.mean(self.lipscore[compared])) if compared.any() else None,
            "frames_compared": int(compared.sum()),
            "encoder_blocks": self.lipscore_blocks,
            "mouth_crop": self.lipscore_mouth_crop,
            "mouth_crop_fallback": self.lipscore_mouth_crop_fallback,
            "per_second": _numbers(signals.per_period(self.lipscore, round(self.fps))),
        }

    def to_dict(self) -> dict[str, Any]:
        """Every number of the report (NaN -> null), ready for ``json.dumps``."""
        window_seconds = self.correlation_window / self.fps
        correlation = None
        if self.correlation is not None:
            correlation = {
                "correlation": _number(self.correlation.correlation),
                "lag_frames": _lag(self.correlation),
                "window_frames": self.correlation_window,
                "windows": [
                    {"start_s": i * window_seconds, "correlation": _number(w.correlation), "lag_frames": _lag(w)}
                    for i, w in enumerate(self.correlation_windows)
                ],
            }
        syncnet = None
        if self.sync_windows:
            syncnet = {
                "lse_d": _number(np.mean([w.lse_d for w in self.sync_windows])),
                "lse_c": _number(np.mean([w.lse_c for w in self.sync_windows])),
                "offset_frames": int(np.median([w.offset for w in self.sync_windows])),
                "windows": [
                    {
                        "start_s": w.start_frame / self.fps,
                        "frames": w.num_frames,
                        "lse_d": _number(w.lse_d),
                        "lse_c": _number(w.lse_c),
                        "offset_frames": w.offset,
                    }
                    for w in self.sync_windows
                ],
            }
        return {
            "source": self.source,
            "frames": self.num_frames,
            "fps": self.fps,
            "duration_s": self.duration,
            "face": {"detect_every": self.detect_every, "frames_with_face": self.frames_with_face},
            "identity": self.identity_summary(),
            "mouth_audio_correlation": correlation,
            "syncnet": syncnet,
            "lipscore": self.lipscore_summary(),
            "emotion": self.emotion,
            "signals_per_second": {
                "mouth_open": _numbers(signals.per_period(self.mouth_open, round(self.fps))),
                "audio_energy": None
                if self.audio_energy is None
                else _numbers(signals.per_period(self.audio_energy, round(self.fps))),
            },
            "skipped": dict(self.skipped),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


def _number(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _lag(correlation: signals.LaggedCorrelation) -> int | None:
    """The best lag, or None where no correlation could be computed (no face, silent audio)."""
    return correlation.lag if math.isfinite(correlation.correlation) else None


def _numbers(values: Iterable[float]) -> list[float | None]:
    return [_number(v) for v in values]


def _load_networks(options: EvaluationOptions, skipped: dict[str, str]):
    """The identity embedder and the SyncNet scorer, each None (with the reason in ``skipped``) if unavailable."""
    from .arcface import IdentityEmbedder
    from .syncnet import SyncScorer

    loaded = []
    for name, loader in (("identity", IdentityEmbedder), ("syncnet", SyncScorer)):
        try:
            loaded.append(loader.from_folder(options.weights, options.device))
        except KeyFaceError as error:
            skipped[name] = str(error)
            loaded.append(None)
    return loaded


def _reference_embedding(embedder, reference_image) -> np.ndarray | None:
    from ..face import detect_faces
    from ..identity import load_identity_image

    image = load_identity_image(reference_image, name="reference image")
    faces = detect_faces(image)
    if not faces:
        raise InputError("reference image: no face found; pass a portrait where the face is clearly visible")
    return embedder.embed([arcface_crop(image, TrackedFace.from_detection(faces[0]))])[0]


class _IdentityCurve:
    """Identity similarity of every detected frame's face to the reference, embedded ``IDENTITY_BATCH`` at a
    time; the first detected face is the reference when none is given."""

    def __init__(self, embedder, reference: np.ndarray | None, reference_name: str | None) -> None:
        self.embedder, self.reference, self.reference_name = embedder, reference, reference_name
        self.similarity: dict[int, float] = {}
        self._frames: list[int] = []
        self._crops: list[np.ndarray] = []

    def add(self, tracked) -> None:
        if tracked.face is None or not tracked.face.detected:
            return
        self._frames.append(tracked.index)
        self._crops.append(arcface_crop(tracked.image, tracked.face))
        if len(self._crops) == IDENTITY_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._crops:
            return
        embeddings = self.embedder.embed(self._crops)
        if self.reference is None:
            self.reference, self.reference_name = embeddings[0], "first detected face"
        self.similarity.update(zip(self._frames, (embeddings @ self.reference).tolist(), strict=True))
        self._frames.clear()
        self._crops.clear()

    def values(self, num_frames: int) -> np.ndarray:
        """``(num_frames,)``: the similarity on detected frames, NaN elsewhere."""
        values = np.full(num_frames, np.nan)
        for index, value in self.similarity.items():
            values[index] = value
        return values


class _SyncWindows:
    """SyncNet scores of consecutive windows of ``options.sync_window`` frames; a window never spans a frame
    without a face (it is cut there)."""

    def __init__(self, scorer, mfcc: np.ndarray, options: EvaluationOptions) -> None:
        self.scorer, self.mfcc, self.options = scorer, mfcc, options
        self.windows: list[Any] = []
        self._crops: list[np.ndarray] = []
        self._start = 0

    def add(self, tracked) -> None:
        if tracked.face is None:
            self.flush()
            self._start = tracked.index + 1
            return
        self._crops.append(syncnet_crop(tracked.image, tracked.face))
        if len(self._crops) == self.options.sync_window:
            self.flush()
            self._start = tracked.index + 1

    def flush(self) -> None:
        from .syncnet import SYNCNET_FRAMES

        if len(self._crops) >= SYNCNET_FRAMES:
            crops = np.stack(self._crops)
            self.windows.append(self.scorer.score(crops, self._start, self.mfcc, self.options.max_offset))
        self._crops.clear()


class _LipScorePairs:
    """The generated and the ground-truth video's mouth squares, paired by frame index as their two croppers
    release them (each a few frames late, :mod:`keyface.evaluate.mouth`), scored by ``scorer``. A square waits
    only until the other video's cropper has released the same index or the other video has ended."""

    def __init__(self, scorer, make_cropper) -> None:
        self.scorer = scorer
        self.croppers = (make_cropper(), make_cropper())  # generated, ground truth
        self._waiting: tuple[dict[int, Any], dict[int, Any]] = ({}, {})
        self._ended = [False, False]

    def add(self, tracked, real) -> None:
        """One generated frame and the ground truth's frame of the same index (None once it has ended)."""
        if real is None:
            self._end(1)
        else:
            self._take(1, self.croppers[1].push(real))
        if not self._ended[1] or self._waiting[1]:  # else nothing is left to compare with (no landmarks to run)
            self._take(0, self.croppers[0].push(tracked))

    def finish(self) -> None:
        self._end(1)
        self._end(0)
        self.scorer.flush()

    def _end(self, side: int) -> None:
        if not self._ended[side]:
            self._take(side, self.croppers[side].finish())
            self._ended[side] = True
            self._waiting[1 - side].clear()

    def _take(self, side: int, released) -> None:
        waiting, other = self._waiting[side], self._waiting[1 - side]
        for index, square in released:
            if index in other:
                match = other.pop(index)
                if square is not None and match is not None:
                    generated, real = (square, match) if side == 0 else (match, square)
                    self.scorer.add(index, generated, real)
            elif not self._ended[1 - side]:
                waiting[index] = square


def _ground_truth(ground_truth: Any, options: EvaluationOptions, skipped: dict[str, str]):
    """The LipScore pairs (scorer and mouth croppers), the tracked ground-truth frames and the mouth-crop
    fallback reason, or ``(None, None, None)`` (reason in ``skipped``).

    ``ground_truth``: a video file (25 fps) or an iterable of uint8 RGB frames."""
    if ground_truth is None:
        skipped["lipscore"] = LIPSCORE_NEEDS_GROUND_TRUTH
        return None, None, None
    from .lipscore import LipScorer, load_vsr_encoder
    from .mouth import load_mouth_cropper

    try:
        scorer = LipScorer(load_vsr_encoder(options.weights, options.lipscore_blocks), options.device)
    except KeyFaceError as error:
        skipped["lipscore"] = str(error)
        return None, None, None
    make_cropper, fallback = load_mouth_cropper(options.weights, options.device)
    if fallback is None:
        logger.info("LipScore mouth crop: 68 FAN landmarks warped to the auto_avsr mean face (the paper's)")
    else:
        logger.warning("LipScore mouth crop: five MTCNN landmarks (not the paper's) because %s", fallback)
    if isinstance(ground_truth, (str, os.PathLike)):
        from ..media import iter_video_frames

        _check_fps(ground_truth, "ground truth")
        ground_truth = iter_video_frames(ground_truth)
    return _LipScorePairs(scorer, make_cropper), track_faces(ground_truth, options.detect_every), fallback


def _check_fps(path: str | os.PathLike, name: str):
    from ..media import probe_media

    info = probe_media(path)
    if info.video is None:
        raise InputError(f"{name}: {path} has no video stream")
    if abs(float(info.video.fps) - VIDEO_FPS) > 0.01:
        raise InputError(
            f"{name}: {path} runs at {float(info.video.fps):g} fps; the evaluation expects KeyFace's "
            f"{VIDEO_FPS} fps (re-encode it at {VIDEO_FPS} fps)"
        )
    return info


def emotion_from_metadata(metadata: dict[str, str], num_frames: int, fps: float) -> dict[str, list[float]] | None:
    """Per-second valence / arousal of the curve stored in a video's tags, or None when it carries none.

    Read from the ``keyface_emotion`` tag (an EmotionCurve JSON), else from the ComfyUI workflow tag
    ``prompt`` (the text input of its KeyFace Emotion Curve node).
    """
    from ..emotion import parse_emotion

    lowered = {key.lower(): value for key, value in metadata.items()}
    value = lowered.get(EMOTION_METADATA_KEY)
    if value is None and "prompt" in lowered:
        try:
            prompt = json.loads(lowered["prompt"])
        except ValueError:
            prompt = {}
        for node in prompt.values() if isinstance(prompt, dict) else ():
            emotion = node.get("inputs", {}).get("emotion") if isinstance(node, dict) else None
            if node.get("class_type") == "KeyFaceEmotionCurve" and isinstance(emotion, str):
                value = emotion
                break
    if value is None:
        return None
    curve = parse_emotion(value)
    times = np.arange(math.ceil(num_frames / fps), dtype=np.float64)
    valence, arousal = curve.values_at(times)
    return {"valence": _numbers(valence), "arousal": _numbers(arousal)}


def evaluate_frames(
    frames: Iterable[np.ndarray],
    waveform_16k: np.ndarray | None,
    *,
    reference_image: Any = None,
    ground_truth: Any = None,
    metadata: dict[str, str] | None = None,
    options: EvaluationOptions = EvaluationOptions(),
    source: str = "frames",
) -> EvaluationReport:
    """Measure a video given as uint8 RGB frames ``(H, W, 3)`` at 25 fps and its 16 kHz mono audio ``(samples,)``.

    ``reference_image``: the portrait the video was made from (path, array, ...); without it the identity
    curve compares every face with the first detected one. ``ground_truth``: the real video for LipScore.
    """
    fps = float(VIDEO_FPS)
    skipped: dict[str, str] = {}
    embedder, scorer = _load_networks(options, skipped)
    lip_pairs, real_frames, mouth_crop_fallback = _ground_truth(ground_truth, options, skipped)
    mfcc = None
    if waveform_16k is None:
        for name in ("mouth_audio_correlation", "syncnet"):
            skipped[name] = "the video has no audio"
        scorer = None
    else:
        mfcc = signals.mfcc(waveform_16k) if scorer is not None else None
    reference = reference_name = None
    if embedder is not None and reference_image is not None:
        reference = _reference_embedding(embedder, reference_image)
        reference_name = "reference image"

    identity = _IdentityCurve(embedder, reference, reference_name) if embedder is not None else None
    sync = _SyncWindows(scorer, mfcc, options) if scorer is not None else None
    mouth: list[float] = []
    frames_with_face = 0
    for tracked in track_faces(frames, options.detect_every):
        face, image = tracked.face, tracked.image
        if lip_pairs is not None:
            lip_pairs.add(tracked, next(real_frames, None))
        mouth.append(mouth_openness(image, face) if face is not None else float("nan"))
        frames_with_face += face is not None
        if identity is not None:
            identity.add(tracked)
        if sync is not None:
            sync.add(tracked)
    if identity is not None:
        identity.flush()
    if sync is not None:
        sync.flush()
    lipscore = lip_scorer = None
    if lip_pairs is not None:
        lip_pairs.finish()
        lip_scorer = lip_pairs.scorer
        lipscore = np.full(len(mouth), np.nan)
        for index, value in lip_scorer.scores.items():
            lipscore[index] = value
        if real_frames is not None and next(real_frames, None) is not None:
            skipped["lipscore_frames"] = "the ground-truth video is longer; its extra frames were not compared"
        elif len(lip_scorer.scores) < len(mouth) and frames_with_face == len(mouth):
            skipped["lipscore_frames"] = (
                "the ground-truth video is shorter (or lost its face); compared where both have one"
            )

    num_frames = len(mouth)
    if num_frames == 0:
        raise InputError(f"{source}: the video has no frames")
    if frames_with_face == 0:
        skipped["face"] = "no face found in any frame: nothing to measure but the audio"
    mouth_open = np.array(mouth)
    energy = correlation = None
    windows: list[signals.LaggedCorrelation] = []
    if waveform_16k is not None:
        energy = signals.frame_energy(waveform_16k)[:num_frames]
        correlation = signals.lagged_correlation(mouth_open, energy, options.max_offset)
        windows = signals.windowed_correlation(mouth_open, energy, options.correlation_window, options.max_offset)
    emotion = emotion_from_metadata(metadata or {}, num_frames, fps)
    if emotion is None:
        skipped["emotion"] = "the video carries no KeyFace emotion metadata"
    return EvaluationReport(
        num_frames=num_frames,
        fps=fps,
        frames_with_face=frames_with_face,
        detect_every=options.detect_every,
        mouth_open=mouth_open,
        audio_energy=energy,
        identity=None if identity is None else identity.values(num_frames),
        identity_reference=None if identity is None else identity.reference_name,
        correlation=correlation,
        correlation_windows=windows,
        correlation_window=options.correlation_window,
        sync_windows=[] if sync is None else sync.windows,
        emotion=emotion,
        lipscore=lipscore,
        lipscore_blocks=None if lip_scorer is None else lip_scorer.encoder.config.blocks,
        lipscore_mouth_crop=None if lip_pairs is None else lip_pairs.croppers[0].method,
        lipscore_mouth_crop_fallback=mouth_crop_fallback,
        skipped=skipped,
        source=source,
    )


def evaluate_file(
    video: str | os.PathLike,
    *,
    reference_image: Any = None,
    ground_truth: str | os.PathLike | None = None,
    options: EvaluationOptions = EvaluationOptions(),
) -> EvaluationReport:
    """Measure a video file (25 fps, with its audio track); frames are decoded one at a time."""
    from ..audio.io import load_audio, to_encoder_waveform
    from ..media import iter_video_frames

    info = _check_fps(video, "video")
    waveform = None
    if info.audio is not None:
        waveform = to_encoder_waveform(load_audio(video)).numpy()
    return evaluate_frames(
        iter_video_frames(video),
        waveform,
        reference_image=reference_image,
        ground_truth=ground_truth,
        metadata=info.metadata,
        options=options,
        source=str(video),
    )
