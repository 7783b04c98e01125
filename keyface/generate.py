"""One call from files to a finished video: what ``python -m keyface generate`` runs.

Cheap checks come first (output path, inputs readable, settings valid, weights present, face found), the
heavy work after: loading models, audio features, then the resumable :class:`~keyface.pipeline.TalkingHeadJob`
streaming into the mp4 writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .constants import EMOTION_METADATA_KEY, RELEASED_IMAGE_SIZE, VIDEO_FPS
from .errors import InputError
from .pipeline import Conditioning, GenerationSettings, TalkingHeadJob
from .progress import AUDIO_FEATURES, ProgressCallback, counting, terminal_progress_bar
from .schedule import REFERENCE

logger = logging.getLogger(__name__)


def read_emotion_argument(value: str) -> str:
    """``--emotion`` may name a JSON/text file holding the curve; otherwise it is the curve itself."""
    path = Path(value).expanduser()
    if value.strip().startswith("{"):
        return value
    if path.suffix.lower() in (".json", ".txt") and not path.is_file():
        raise InputError(f"--emotion file {path} not found; give an existing file, a name (happy) or a timed list")
    if not path.suffix or not path.is_file():
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


def audio_feature_mode(schedule: str) -> str:
    """Which audio features a schedule samples with: the reference schedule uses the original's channel
    arithmetic ("reference"), every other schedule the aligned one ("default")."""
    return "reference" if schedule == REFERENCE else "default"


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one :func:`generate_video` call needs: the files, how to sample, where to run, what to write.

    ``names`` maps an input to what the user calls it in error messages (the CLI: ``--steps`` for ``num_steps``).
    """

    image: Path
    audio: Path
    out: Path
    models_folder: Path
    emotion: str = "neutral"
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    device: str = "auto"
    precision: str = "auto"
    offload: str = "auto"
    compile: bool = False
    channels_last: bool = False
    crop: str = "center"
    face_index: int | None = None
    paste_back: bool = False
    crf: int = 18
    fps: float = VIDEO_FPS
    job_dir: Path | None = None
    keep_job: bool = False
    devices: str | None = None  # "cuda:0,cuda:1": one model copy per device in this process (DevicesBackend)
    ray_address: str | None = None  # join this Ray cluster (RayBackend)
    workers: int | None = None  # Ray actors (a local Ray cluster without ray_address); None: one per GPU


def generate_video(request: GenerationRequest, progress: ProgressCallback | None = None) -> Path:
    """Portrait + audio -> talking-head mp4 with the original audio; returns the output path.

    ``progress`` receives every :class:`~keyface.progress.ProgressEvent` (audio features, then keyframes,
    interpolation and frames). An interrupted run (Ctrl-C, crash) leaves no file under ``request.out``; running it
    again with the same inputs and settings resumes from the job folder (default ``.<out name>.keyface-job``
    next to the output).
    """
    from .audio.features import AudioFeatureExtractor
    from .audio.io import AudioFileStream
    from .emotion import parse_emotion
    from .face import PasteBack, crop_face, parse_crop
    from .identity import load_identity_image
    from .loading import find_model_files, load_models, resolve_device, resolve_dtype
    from .scheduling import make_backend
    from .video import MapSink, Mp4Writer, StreamedAudioTrack

    settings = request.settings
    check_frame_rate(request.fps)
    check_offload(request.offload)
    curve = parse_emotion(read_emotion_argument(request.emotion))
    crop_request = parse_crop(request.crop)
    files = find_model_files(request.models_folder, autoguidance=settings.autoguidance_scale != 1.0)
    torch_device = resolve_device(request.device)
    dtype = resolve_dtype(request.precision, torch_device)
    audio = AudioFileStream(request.audio)  # streamed: an hour of audio is never held whole
    audio.check()
    picture = load_identity_image(request.image, name="--image")  # file messages add the path
    face = crop_face(
        picture, crop_request, size=RELEASED_IMAGE_SIZE, face_index=request.face_index, name=f"--image {request.image}"
    )
    out = Path(request.out).expanduser()
    audio_track = StreamedAudioTrack(request.audio)
    metadata = {EMOTION_METADATA_KEY: curve.to_json()}  # read back by python -m keyface evaluate
    writer = Mp4Writer(out, fps=round(request.fps), audio=audio_track, crf=request.crf, metadata=metadata)
    with writer:
        models = load_models(files, "cpu", dtype)  # place_models moves them (all, or per step)
        place_models(models, torch_device, request.offload)
        if request.compile or request.channels_last:
            from .models.speed import apply_speed_options

            apply_speed_options(models, compile=request.compile, channels_last=request.channels_last)
        extractor = AudioFeatureExtractor.from_folder(files.audio, device=torch_device)
        features = extractor.extract(
            audio, mode=audio_feature_mode(settings.schedule), progress=counting(progress, AUDIO_FEATURES)
        )
        del extractor  # its audio encoders leave the device before the UNets need it
        valence, arousal = curve.per_frame(features.num_frames)
        conditioning = Conditioning(
            models.encode_image(face.image), features.keyframe, features.interpolation, valence, arousal
        )
        folder = (
            Path(request.job_dir).expanduser()
            if request.job_dir is not None
            else out.parent / f".{out.name}.keyface-job"
        )
        backend = make_backend(
            devices=request.devices,
            ray_address=request.ray_address,
            workers=request.workers,
            files=files,
            precision=request.precision,
        )
        with backend:
            job = TalkingHeadJob(models, conditioning, settings, job_folder=folder, progress=progress, backend=backend)
            sink = MapSink(PasteBack(picture, face.info), writer) if request.paste_back else writer
            job.run(sink)
    if not request.keep_job:
        job.folder.remove()
    return out


def check_offload(offload: str) -> None:
    from .models.bundle import OFFLOAD_MODES

    if offload != "auto" and offload not in OFFLOAD_MODES:
        raise InputError(f"--offload must be auto or one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")


def place_models(models, device, offload: str = "auto") -> str:
    """Install the residency of ``models`` (loaded on the CPU) for compute ``device``; returns the offload mode.

    ``offload`` ``"auto"``: ``none`` on a CPU; on a GPU ``none`` when every part fits in free memory with the
    margin, ``stage`` when the largest step does, else ``sequential`` (:meth:`MemoryEstimate.offload_mode`).
    With ``none`` every part moves to ``device`` now; otherwise each step moves what it uses.
    """
    import torch

    from .memory import MemoryEstimate, free_device_memory
    from .models.bundle import Residency

    device = torch.device(device)
    check_offload(offload)
    if offload == "auto":
        offload = MemoryEstimate.for_models(models).offload_mode(free_device_memory(device))  # CPU: none
        logger.info("offload: %s", offload)
    if offload == "none":
        for module in models.parts().values():
            module.to(device)
    models.residency = Residency(device, torch.device("cpu"), offload)
    return offload


# GenerationSettings fields -> the CLI flag that sets them, for messages about a value the user typed.
CLI_FLAGS = {
    "num_steps": "--steps",
    "audio_scale": "--audio-scale",
    "identity_scale": "--identity-scale",
    "autoguidance_scale": "--autoguidance-scale",
    "seed": "--seed",
    "schedule": "--schedule",
    "segments_per_call": "--segments-per-call",
}
# ... and the GenerationRequest fields whose checks name them.
REQUEST_FLAGS = {
    "emotion": "--emotion",
    "face_index": "--face-index",
    "crf": "--crf",
    "devices": "--devices",
    "workers": "--workers",
}


def settings_from_arguments(args) -> GenerationSettings:
    """The CLI's sampling flags as :class:`GenerationSettings`; a refused value is named by its flag."""
    values = {name: getattr(args, flag.removeprefix("--").replace("-", "_")) for name, flag in CLI_FLAGS.items()}
    try:
        return GenerationSettings(**values)
    except InputError as error:
        raise error.naming(CLI_FLAGS) from None


def generate_from_files(args) -> Path:
    """``python -m keyface generate``: parsed arguments -> :func:`generate_video` with a tqdm progress bar."""
    request = GenerationRequest(
        image=args.image,
        audio=args.audio,
        out=args.out,
        models_folder=args.models,
        emotion=args.emotion,
        settings=settings_from_arguments(args),
        device=args.device,
        precision=args.precision,
        offload=args.offload,
        compile=args.compile,
        channels_last=args.channels_last,
        crop=args.crop,
        face_index=args.face_index,
        paste_back=args.paste_back,
        crf=args.crf,
        fps=args.fps,
        job_dir=args.job_dir,
        keep_job=args.keep_job,
        devices=args.devices,
        ray_address=args.ray_address,
        workers=args.workers,
    )
    try:
        with terminal_progress_bar() as on_event:
            out = generate_video(request, progress=on_event)
    except InputError as error:
        raise error.naming({**CLI_FLAGS, **REQUEST_FLAGS}) from None
    print(f"wrote {out}")
    return out
