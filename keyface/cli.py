"""Command line: ``python -m keyface <command>`` (also installed as ``keyface``).

Commands:
    generate   portrait + audio -> talking-head mp4 (any length; resumable; progress with ETA)
    plan       what a generation will do and need (frames, network calls, memory, disk), without weights
    demo       the whole pipeline on tiny random weights and generated inputs, to see it run in a minute
    crop       find the face in an image, write the square crop, print the box as one JSON line
    convert    rewrite an original .pt checkpoint (KeyFace stage or audio encoder) as .safetensors
    download   fetch the released weights from the Hugging Face Hub into a models folder (the only network use)
    evaluate   measure a generated video (identity drift, lip sync): report.json + report.png

Errors the user can act on are printed as one line (no traceback) with exit status 2; Ctrl-C exits with
status 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import KeyFaceError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    from .models.bundle import OFFLOAD_MODES
    from .noise import DEFAULT_SEED
    from .pipeline import DEFAULT_SEGMENTS_PER_CALL
    from .sampling import AUTOGUIDANCE_SCALE, DEFAULT_NUM_STEPS, KEYFRAME_AUDIO_SCALE, KEYFRAME_IDENTITY_SCALE

    group = parser.add_argument_group("generation")
    group.add_argument(
        "--emotion",
        default="neutral",
        help="a name (happy), a timed list ('neutral at 0 s, happy at 4 s') or emotion JSON (a file "
        "path works too); default neutral",
    )
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    group.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_NUM_STEPS,
        help=f"sampler steps setting, >= 10 (default {DEFAULT_NUM_STEPS} = 11 network evaluations)",
    )
    group.add_argument(
        "--audio-scale",
        type=float,
        default=KEYFRAME_AUDIO_SCALE,
        help=f"keyframe audio guidance (default {KEYFRAME_AUDIO_SCALE})",
    )
    group.add_argument(
        "--identity-scale",
        type=float,
        default=KEYFRAME_IDENTITY_SCALE,
        help=f"keyframe identity guidance (default {KEYFRAME_IDENTITY_SCALE})",
    )
    group.add_argument(
        "--autoguidance-scale",
        type=float,
        default=AUTOGUIDANCE_SCALE,
        help=f"interpolation autoguidance (default {AUTOGUIDANCE_SCALE}; 1 = no bad model needed)",
    )
    group.add_argument(
        "--schedule",
        choices=("aligned", "reference"),
        default="aligned",
        help="aligned (default): every frame gets its own audio; reference: the original's arithmetic, quirks included",
    )
    group.add_argument(
        "--segments-per-call",
        type=_segments_per_call,
        default=None,
        metavar="auto|N",
        help="interpolation segments per network call (default auto: as many as fit in free GPU memory; "
        f"{DEFAULT_SEGMENTS_PER_CALL} on a CPU). Changes the frames only by float rounding",
    )
    group.add_argument("--fps", type=float, default=25.0, help="output frame rate; the models are trained at 25")
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    group.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="network precision (auto: bf16/fp16 on GPU, fp32 on CPU)",
    )
    group.add_argument(
        "--crop",
        default="center",
        help="identity crop: center (default), auto (face detection) or x,y,size in source pixels",
    )
    group.add_argument(
        "--face-index", type=int, default=None, help="which face when there are several (0 = the largest, default)"
    )
    group.add_argument(
        "--paste-back", action="store_true", help="paste the animated face back into the full original picture"
    )
    group.add_argument(
        "--offload",
        choices=("auto", *OFFLOAD_MODES),
        default="auto",
        help="which parts stay on the GPU: none (all, fastest), stage (only the running step's), sequential "
        "(also nothing between steps), stream (one block of a network at a time, slowest); auto (default) picks "
        "from free memory and the plan's estimate",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the networks (slow first call)")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format for the networks")
    group.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better; default 18)")
    group.add_argument(
        "--job-dir",
        type=Path,
        default=None,
        help="where finished work is kept so that an interrupted run resumes "
        "(default: .<output name>.keyface-job next to the output)",
    )
    group.add_argument("--keep-job", action="store_true", help="keep the job folder after success")


def _add_scale_out_options(parser: argparse.ArgumentParser) -> None:
    """``generate``'s flags for running on several devices or a Ray cluster (keyface.scheduling)."""
    scale = parser.add_argument_group("several GPUs or machines (README: 'Several GPUs and Ray clusters')")
    scale.add_argument(
        "--devices", default=None, help="one model copy per listed device in this process, e.g. cuda:0,cuda:1"
    )
    scale.add_argument(
        "--workers", type=int, default=None, help="Ray workers (a local Ray cluster unless --ray-address); needs [ray]"
    )
    scale.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (e.g. auto, or ray://head:10001); needs [ray]"
    )


def _segments_per_call(value: str) -> int | None:
    """``--segments-per-call``: ``auto`` (None) or an integer >= 1."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 1, got {value!r}")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyface", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (and show tracebacks)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="portrait + audio -> talking-head mp4")
    generate.add_argument("--image", required=True, type=Path, help="portrait image (or a video: its first frame)")
    generate.add_argument("--audio", required=True, type=Path, help="audio file (wav/mp3/flac/m4a/ogg or a video)")
    generate.add_argument("--out", required=True, type=Path, help="output .mp4")
    generate.add_argument(
        "--models",
        type=Path,
        default=Path("models/keyface"),
        help="KeyFace models folder (default models/keyface; see README 'Weights')",
    )
    _add_generation_options(generate)
    _add_scale_out_options(generate)

    plan = commands.add_parser(
        "plan", help="frames, network calls, memory per step and disk use of a generation, without weights"
    )
    plan.add_argument("--image", required=True, type=Path, help="portrait image (only checked)")
    plan.add_argument("--audio", required=True, type=Path, help="audio file")
    plan.add_argument(
        "--models", type=Path, default=None, help="read the sizes from these checkpoints (default: the official sizes)"
    )
    plan.add_argument("--size", type=int, default=None, help="frame size in pixels (default: the models', 512)")
    plan.add_argument("--vram", type=float, default=None, help="plan for a GPU with this many GB free")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    _add_generation_options(plan)

    demo = commands.add_parser("demo", help="run everything on tiny random weights (the result is noise)")
    demo.add_argument("--out", type=Path, default=Path("keyface_demo.mp4"), help="output .mp4")
    demo.add_argument("--seconds", type=float, default=3.0, help="length of the generated speech-like audio")
    demo.add_argument(
        "--models",
        type=Path,
        default=None,
        help="where to write the tiny demo weights (default: a folder in the KeyFace cache); a new or "
        "empty folder, e.g. ComfyUI/models/keyface to try the example workflows",
    )
    demo.add_argument("--weights-only", action="store_true", help="only write the demo weights, make no video")

    crop = commands.add_parser("crop", help="write the square face crop of an image; print its box as JSON")
    crop.add_argument("image", type=Path)
    crop.add_argument("out", type=Path, help="output image (.png, .jpg, .webp)")
    crop.add_argument("--crop", default="auto", help="auto (default), center, or x,y,size")
    crop.add_argument("--size", type=int, default=512, help="output size in pixels (default 512)")
    crop.add_argument("--margin", type=float, default=None, help="space around the face (default 0.6)")
    crop.add_argument("--face-index", type=int, default=None, help="which face when there are several (0 = largest)")

    convert = commands.add_parser(
        "convert", help="rewrite an original .pt checkpoint as .safetensors (unpickles the input: trusted files only)"
    )
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path)

    download = commands.add_parser("download", help="fetch the released weights from the Hugging Face Hub")
    download.add_argument(
        "--models",
        type=Path,
        default=Path("models/keyface"),
        help="models folder to fill (default models/keyface; ComfyUI: ComfyUI/models/keyface)",
    )
    download.add_argument("--token", default=None, help="Hugging Face token (default: your login or HF_TOKEN)")
    download.add_argument("--dry-run", action="store_true", help="list what would be fetched from where")
    from .evaluate.cli import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr: what happened and what to do, without Python's source location."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    with warnings.catch_warnings():
        if not args.verbose:
            warnings.showwarning = _print_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "generate":
            from .generate import generate_from_files

            generate_from_files(args)
        elif args.command == "plan":
            from .plan import plan_command

            plan_command(args)
        elif args.command == "demo":
            from .demo import install_demo_weights, run_demo

            if args.weights_only:
                install_demo_weights(args.models)
            else:
                run_demo(args.out, seconds=args.seconds, models_folder=args.models)
        elif args.command == "crop":
            from .face import crop_face_to_file, parse_crop

            options = {k: v for k, v in (("margin", args.margin), ("face_index", args.face_index)) if v is not None}
            box = crop_face_to_file(args.image, args.out, crop=parse_crop(args.crop), size=args.size, **options)
            print(json.dumps(box))
        elif args.command == "convert":
            from .checkpoints import convert_any

            print(convert_any(args.source, args.target))
        elif args.command == "evaluate":
            args.handler(args)
        elif args.command == "download":
            from .download import download_command

            download_command(args.models, token=args.token, dry_run=args.dry_run)
    except KeyFaceError as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
