"""The report figure: every curve of an :class:`~keyface.evaluate.report.EvaluationReport` on one time axis.

matplotlib (Agg backend, no display) is imported only here, when a figure is drawn: ``pip install matplotlib``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..errors import KeyFaceError
from ..files import atomic_write
from .report import EvaluationReport

MATPLOTLIB_HINT = "pip install matplotlib"
FIGURE_WIDTH_INCHES, PANEL_HEIGHT_INCHES, DPI = 10.0, 1.8, 100


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise KeyFaceError(
            f"the evaluation figure needs matplotlib, which is not installed: {MATPLOTLIB_HINT}"
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _standardised(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if len(finite) < 2 or finite.std() == 0:
        return values - (finite.mean() if len(finite) else 0)
    return (values - finite.mean()) / finite.std()


def render_png(report: EvaluationReport) -> bytes:
    """The figure as PNG bytes: identity, mouth vs audio, sync measures, emotion (panels with data only)."""
    plt = _pyplot()
    data = report.to_dict()
    seconds = np.arange(report.num_frames) / report.fps
    panels = ["mouth"]
    if report.identity is not None:
        panels.insert(0, "identity")
    if data["mouth_audio_correlation"]:
        panels.append("correlation")
    if data["syncnet"]:
        panels.append("syncnet")
    if data["lipscore"]:
        panels.append("lipscore")
    if report.emotion:
        panels.append("emotion")
    figure, axes = plt.subplots(
        len(panels), 1, sharex=True, figsize=(FIGURE_WIDTH_INCHES, PANEL_HEIGHT_INCHES * len(panels)), squeeze=False
    )
    axes = dict(zip(panels, axes[:, 0], strict=True))
    if "identity" in axes:
        ax = axes["identity"]
        keep = np.isfinite(report.identity)
        ax.plot(seconds[keep], report.identity[keep], ".", markersize=2, alpha=0.4, label="detected frames")
        per_second = np.array([np.nan if v is None else v for v in data["identity"]["per_second"]])
        ax.plot(np.arange(len(per_second)) + 0.5, per_second, "-", label="per second")
        slope = data["identity"]["slope_per_minute"]
        ax.set_title(f"identity similarity to the {report.identity_reference} (slope {slope} / min)", fontsize=9)
        ax.set_ylabel("cosine")
        ax.legend(fontsize=7, loc="lower left")
    ax = axes["mouth"]
    ax.plot(seconds, _standardised(report.mouth_open), label="mouth open")
    if report.audio_energy is not None:
        ax.plot(
            seconds[: len(report.audio_energy)], _standardised(report.audio_energy), alpha=0.7, label="audio energy"
        )
    ax.set_ylabel("z-score")
    ax.set_title("mouth openness and audio energy", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    if "correlation" in axes:
        ax = axes["correlation"]
        correlation = data["mouth_audio_correlation"]
        centres = [w["start_s"] + report.correlation_window / report.fps / 2 for w in correlation["windows"]]
        ax.plot(centres, [w["correlation"] for w in correlation["windows"]], "o-", label="correlation")
        lags = ax.twinx()
        lags.plot(centres, [w["lag_frames"] for w in correlation["windows"]], "x--", color="tab:red", label="lag")
        lags.set_ylabel("best lag (frames)")
        ax.set_ylabel("correlation")
        ax.set_title(
            f"mouth / audio-energy correlation per window (whole video: {correlation['correlation']} "
            f"at lag {correlation['lag_frames']} frames)",
            fontsize=9,
        )
    if "syncnet" in axes:
        ax = axes["syncnet"]
        windows = data["syncnet"]["windows"]
        centres = [w["start_s"] + w["frames"] / report.fps / 2 for w in windows]
        ax.plot(centres, [w["lse_c"] for w in windows], "o-", label="LSE-C")
        ax.set_ylabel("LSE-C")
        distance = ax.twinx()
        distance.plot(centres, [w["lse_d"] for w in windows], "s--", color="tab:green", label="LSE-D")
        distance.set_ylabel("LSE-D")
        ax.set_title(
            f"SyncNet per window: LSE-C {data['syncnet']['lse_c']}, LSE-D {data['syncnet']['lse_d']}, "
            f"offset {data['syncnet']['offset_frames']} frames",
            fontsize=9,
        )
    if "lipscore" in axes:
        ax = axes["lipscore"]
        per_second = [np.nan if v is None else v for v in data["lipscore"]["per_second"]]
        ax.plot(seconds, report.lipscore, alpha=0.4, label="per frame")
        ax.plot(np.arange(len(per_second)) + 0.5, per_second, "-", label="per second")
        ax.set_ylabel("cosine")
        ax.set_title(f"LipScore against the ground truth (mean {data['lipscore']['mean']})", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    if "emotion" in axes:
        ax = axes["emotion"]
        for name, values in report.emotion.items():
            ax.plot(np.arange(len(values)), values, label=name)
        ax.set_title("emotion curve (from the video's metadata)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    axes[panels[-1]].set_xlabel("time (s)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def render_image(report: EvaluationReport) -> np.ndarray:
    """The figure as a uint8 RGB array ``(height, width, 3)`` (what the node outputs as an IMAGE)."""
    from PIL import Image

    with Image.open(io.BytesIO(render_png(report))) as image:
        return np.asarray(image.convert("RGB")).copy()


def write_report(report: EvaluationReport, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``folder`` (created), each atomically."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    png = render_png(report)
    json_path, png_path = folder / "report.json", folder / "report.png"
    with atomic_write(json_path, "evaluation report", (".json",)) as temp:
        temp.write_text(report.to_json() + "\n", encoding="utf-8")
    with atomic_write(png_path, "evaluation figure", (".png",)) as temp:
        temp.write_bytes(png)
    return json_path, png_path
