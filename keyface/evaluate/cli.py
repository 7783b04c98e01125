"""``python -m keyface evaluate VIDEO [--reference-image IMG] [--ground-truth VIDEO] --out report/``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to the ``python -m keyface`` sub-command parsers."""
    from .report import EvaluationOptions

    defaults = EvaluationOptions()
    parser = subparsers.add_parser(
        "evaluate", help="measure a generated video: identity drift, lip sync; writes report.json + report.png"
    )
    parser.add_argument("video", type=Path, help="the generated video (25 fps, with its audio)")
    parser.add_argument("--reference-image", type=Path, default=None, help="the portrait it was made from")
    parser.add_argument("--ground-truth", type=Path, default=None, help="the real video of the same speech (LipScore)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.png")
    parser.add_argument(
        "--weights",
        type=Path,
        default=defaults.weights,
        help=f"folder with the evaluation weights, e.g. arcface_r50.pth, syncnet_v2.model (default {defaults.weights})",
    )
    parser.add_argument(
        "--detect-every",
        type=int,
        default=defaults.detect_every,
        help=f"run the face detector every n-th frame (default {defaults.detect_every})",
    )
    parser.add_argument(
        "--lipscore-blocks",
        type=int,
        default=None,
        help="use only the first N conformer blocks of the VSR encoder (default: all; faster, less faithful)",
    )
    parser.add_argument("--device", default=defaults.device, help=f"torch device (default {defaults.device})")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Evaluate, write the report, print where it is and what was skipped."""
    from .plot import write_report
    from .report import EvaluationOptions, evaluate_file

    options = EvaluationOptions(
        weights=args.weights, detect_every=args.detect_every, lipscore_blocks=args.lipscore_blocks, device=args.device
    )
    report = evaluate_file(
        args.video, reference_image=args.reference_image, ground_truth=args.ground_truth, options=options
    )
    json_path, png_path = write_report(report, args.out)
    for part, reason in report.skipped.items():
        print(f"skipped {part}: {reason}")
    print(json_path)
    print(png_path)
