"""One call from files to a finished video: what ``python -m keyface generate`` runs.

Cheap checks come first (output path, inputs readable, settings valid, weights present, face found), the
heavy work after: loading models, audio features, then the resumable :class:`~keyface.pipeline.TalkingHeadJob`
streaming into the mp4 writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .constants import RELEASED_IMAGE_SIZE, VIDEO_FPS
from .errors import InputError
from .pipeline import Conditioning, GenerationSettings, ProgressCallback, TalkingHeadJob
from .schedule import REFERENCE

logger = logging.getLogger(__name__)

# The image size of the released models (spec §4); crops are made at this size and resized to the model's.


def read_emotion_argument(value: str) -> str:
    """``--emotion`` may name a JSON/text file holding the curve; otherwise it is the curve itself."""
    path = Path(value).expanduser()
    if value.strip().startswith("{") or not path.suffix or not path.is_file():
        return value
    try:
        return path.read_text()
    except OSError as error:
        raise InputError(f"--emotion file {path}: cannot be read ({error.strerror})") from error


def check_frame_rate(fps: float) -> None:
    """The networks were trained on 25-fps clips (13 frames between keyframes = 0.52 s): refuse other rates."""
    if fps != VIDEO_FPS:
        raise InputError(
            f"fps={fps:g}: the KeyFace models are trained at {VIDEO_FPS} fps (keyframes 0.52 s apart); "
            f"generate at {VIDEO_FPS} fps and retime the video afterwards if you need another rate"
        )


def generate_video(
    image: str | os.PathLike,
    audio: str | os.PathLike,
    out: str | os.PathLike,
    models_folder: str | os.PathLike,
    *,
    emotion: str = "neutral",
    settings: GenerationSettings = GenerationSettings(),
    device: str = "auto",
    precision: str = "auto",
    crop: str = "center",
    paste_back: bool = False,
    crf: int = 18,
    fps: float = VIDEO_FPS,
    job_dir: str | os.PathLike | None = None,
    keep_job: bool = False,
    progress: ProgressCallback | None = None,
    audio_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Portrait + audio -> talking-head mp4 with the original audio; returns the output path.

    An interrupted run (Ctrl-C, crash) leaves no file under ``out``; running it again with the same inputs
    and settings resumes from the job folder (default ``.<out name>.keyface-job`` next to ``out``).
    """
    from .audio.features import AudioFeatureExtractor
    from .audio.io import load_audio
    from .emotion import parse_emotion
    from .face import PasteBack, crop_face, parse_crop
    from .identity import load_identity_image
    from .loading import find_model_files, load_models, resolve_device, resolve_dtype
    from .video import AudioTrack, MapSink, Mp4Writer

    check_frame_rate(fps)
    curve = parse_emotion(read_emotion_argument(emotion))
    crop_request = parse_crop(crop)
    files = find_model_files(models_folder, autoguidance=settings.autoguidance_scale != 1.0)
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    clip = load_audio(audio)
    picture = load_identity_image(image, name=f"--image {image}")
    face = crop_face(picture, crop_request, size=RELEASED_IMAGE_SIZE)
    out = Path(out).expanduser()
    writer = Mp4Writer(out, fps=round(fps), audio=AudioTrack.muxable(clip.waveform, clip.sample_rate), crf=crf)
    with writer:
        models = load_models(files, torch_device, dtype)
        extractor = AudioFeatureExtractor.from_folder(files.audio, device=torch_device)
        features = extractor.extract(
            clip, mode="reference" if settings.schedule == REFERENCE else "default", progress=audio_progress
        )
        valence, arousal = curve.per_frame(features.num_frames)
        conditioning = Conditioning(
            models.encode_image(face.image), features.keyframe, features.interpolation, valence, arousal
        )
        folder = Path(job_dir).expanduser() if job_dir is not None else out.parent / f".{out.name}.keyface-job"
        job = TalkingHeadJob(models, conditioning, settings, job_folder=folder, progress=progress)
        sink = MapSink(PasteBack(picture, face.info), writer) if paste_back else writer
        job.run(sink)
    if not keep_job:
        job.folder.remove()
    return out


@contextmanager
def progress_bar() -> Iterator[tuple[ProgressCallback, Callable[[int, int], None]]]:
    """A tqdm bar on the terminal for :func:`generate_video`: yields its ``(progress, audio_progress)`` callbacks
    (audio windows first, then the stage, segment and step of every sampler step and output frame, with ETA).

    The bar appears with the first report, so an input error found before any work prints nothing but itself.
    """
    from tqdm import tqdm

    bar = None

    def shown(description: str):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=0, unit="step", dynamic_ncols=True, desc=description)
        return bar

    def on_audio(done: int, total: int) -> None:
        audio_bar = shown("audio features")
        audio_bar.total = total
        audio_bar.n = done
        audio_bar.refresh()

    def on_progress(event) -> None:
        stage_bar = shown(event.stage)
        if stage_bar.total != event.total:
            stage_bar.reset(total=event.total)
        stage_bar.set_description(event.stage, refresh=False)
        stage_bar.set_postfix_str(event.detail, refresh=False)
        stage_bar.update(event.completed - stage_bar.n)

    try:
        yield on_progress, on_audio
    finally:
        if bar is not None:
            bar.close()


def generate_from_files(args) -> Path:
    """``python -m keyface generate``: parsed arguments -> :func:`generate_video` with a tqdm progress bar."""
    settings = GenerationSettings(
        num_steps=args.steps,
        audio_scale=args.audio_scale,
        identity_scale=args.identity_scale,
        autoguidance_scale=args.autoguidance_scale,
        seed=args.seed,
        schedule=args.schedule,
        segments_per_call=args.segments_per_call,
    )
    with progress_bar() as (on_progress, on_audio):
        out = generate_video(
            args.image,
            args.audio,
            args.out,
            args.models,
            emotion=args.emotion,
            settings=settings,
            device=args.device,
            precision=args.precision,
            crop=args.crop,
            paste_back=args.paste_back,
            crf=args.crf,
            fps=args.fps,
            job_dir=args.job_dir,
            keep_job=args.keep_job,
            progress=on_progress,
            audio_progress=on_audio,
        )
    print(f"wrote {out}")
    return out
