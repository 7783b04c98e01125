"""The one progress protocol of the library: :class:`ProgressEvent` sent to a :data:`ProgressCallback`.

Every long call (audio features, keyframes, interpolation, frame decoding) reports through it; the CLI's tqdm
bar (:func:`terminal_progress_bar`), the ComfyUI nodes' progress bar and the benchmarks all consume it. A
callback may raise to stop the work (ComfyUI's Cancel does): finished work is kept in the job folder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

AUDIO_FEATURES = "audio features"
KEYFRAMES = "keyframes"
INTERPOLATION = "interpolation"
FRAMES = "frames"
# Not a stage: a one-off note, e.g. how long a run on the CPU will take (``detail``: the sentence to show;
# ``completed`` / ``total``: the current stage's, so a consumer that treats it like any event keeps its bar).
ESTIMATE = "estimate"


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of one stage: ``completed`` of ``total`` units (an audio window; one sampler step of one keyframe
    batch or one segment; one decoded output frame). ``preview``: a finished keyframe, uint8 (H, W, 3)."""

    stage: str
    completed: int
    total: int
    detail: str = ""
    preview: np.ndarray | None = None


ProgressCallback = Callable[[ProgressEvent], None]


class ProgressCounter:
    """Counts the units of one stage and sends an event for every advance (nothing when ``callback`` is None)."""

    def __init__(self, total: int, callback: ProgressCallback | None):
        self.total, self.completed, self.callback = total, 0, callback

    def advance(self, units: int, stage: str, detail: str, preview: np.ndarray | None = None) -> None:
        self.completed = min(self.completed + units, self.total)
        if self.callback is not None:
            self.callback(ProgressEvent(stage, self.completed, self.total, detail, preview))


def counting(callback: ProgressCallback | None, stage: str) -> Callable[[int, int], None] | None:
    """A ``(done, total)`` counter callback (what :mod:`keyface.audio.features` reports) as events of ``stage``."""
    if callback is None:
        return None
    return lambda done, total: callback(ProgressEvent(stage, done, total))


def format_duration(seconds: float) -> str:
    """``"3 h 05 min"``, ``"12 min"``, ``"40 s"``."""
    minutes = round(seconds / 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{max(round(seconds), 1)} s"


def cpu_estimate_event(seconds: float, calls: int, completed: int, total: int) -> ProgressEvent:
    """The :data:`ESTIMATE` event of a run on the CPU: ``seconds`` for ``calls`` network calls."""
    detail = (
        f"running on the CPU: sampling will take about {format_duration(seconds)} ({calls} network calls; an "
        "estimate from the time of the first call). KeyFace is meant for a GPU, where this takes a small "
        "fraction of that"
    )
    return ProgressEvent(ESTIMATE, completed, total, detail)


@contextmanager
def terminal_progress_bar() -> Iterator[ProgressCallback]:
    """A tqdm bar on the terminal, fed by progress events: stage, detail and ETA of the current stage.

    The bar appears with the first event, so an input error found before any work prints nothing but itself.
    A new stage (or a new total) restarts the bar under the new stage's name in one redraw.
    """
    from tqdm import tqdm

    bar = None

    def on_event(event: ProgressEvent) -> None:
        nonlocal bar
        if event.stage == ESTIMATE:
            tqdm.write(f"note: {event.detail}", file=sys.stderr)
            return
        if bar is None:
            bar = tqdm(total=event.total, unit="step", dynamic_ncols=True, desc=event.stage)
        if bar.total != event.total or bar.desc != event.stage:
            # Name first, then reset (which redraws): never the old stage's name with the new count.
            bar.set_description_str(event.stage, refresh=False)
            bar.reset(total=event.total)
        bar.set_postfix_str(event.detail, refresh=False)
        bar.update(event.completed - bar.n)

    try:
        yield on_event
    finally:
        if bar is not None:
            bar.close()
