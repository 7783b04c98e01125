"""Evaluating a generated video: identity drift, lip-sync confidence, mouth/audio correlation, emotion curve.

See ``docs/evaluation.md``. Entry points: :func:`evaluate_file`, :func:`evaluate_frames`, :func:`write_report`
(and ``python -m keyface evaluate``). Importing this package loads no network and needs no matplotlib.
"""

from .report import EvaluationOptions, EvaluationReport, evaluate_file, evaluate_frames

__all__ = ["EvaluationOptions", "EvaluationReport", "evaluate_file", "evaluate_frames"]
