"""Peak memory of a short vs a long clip, and wall time per stage; not part of the test suite.

Each length runs in a fresh child process (cold feature cache, own job folder) whose peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at its end) is therefore its own. Two scopes:

* ``--scope parts`` (default): the parts whose memory grows with the length, on the demo's tiny random weights
  (:mod:`keyface.demo`) and synthetic speech-like 44.1 kHz stereo WAV of each length (hour-long generation is
  too slow on a CPU even with the demo weights): ``load_models``; ``audio_features`` = decoding, downmix and
  resampling to 16 kHz and the three encoders, streamed from the file
  (``AudioFeatureExtractor.extract(path)``); ``bookkeeping`` = a ``TalkingHeadJob`` built, not run (schedule,
  seeded noise, conditioning digests, job folder); ``mux`` = ``Mp4Writer`` with the file's track streamed
  (``StreamedAudioTrack``) and one 16x16 black frame per output frame (x264 ultrafast). No sampling, no VAE.
* ``--scope generate``: ``keyface.generate.generate_video`` - what ``python -m keyface generate`` runs, writing a
  real mp4 with the audio - on the demo weights, a drawn portrait and synthetic 16 kHz speech. Time is
  attributed to phases: ``setup`` (argument checks, the crop), ``load_models``, ``audio_features``,
  ``identity`` (VAE encoding of the portrait), then by ``ProgressEvent.stage`` while the job runs -
  ``keyframes``, ``interpolation``, ``frames`` (decoding + mp4 encoding of the frames) - and ``finalise``.

A background sampler records the largest RSS seen in each phase, to show what grows with the length.

stdout: one JSON object per line, e.g. ``{"metric": "pipeline_10s_mux_s", "value": 4.3, "peak_rss_mb": 902.2}``,
ending with ``{"metric": "peak_rss_ratio_3600s_vs_10s", "value": ..., "growth_mb": ...}`` (longest vs shortest,
after the longest vs each other length; ``growth_mb`` is the difference of the peaks, which unlike the ratio does not
depend on how much RSS importing torch takes on the machine); stderr: a table.

Clips up to the encoders' window (``WindowConfig.window_seconds``, 60 s) are encoded in one pass, longer ones a
window at a time: the peak steps up once, up to a full window, then should stay flat. Include 60 among the lengths
to tell that step (``..._vs_10s``) from growth with the length (``..._vs_60s``).

    python bench/pipeline.py --seconds 10 3600                       # parts, 10 s and one hour
    python bench/pipeline.py --scope generate --seconds 10 300 --segments-per-call 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHASES = ("setup", "load_models", "audio_features", "identity", "keyframes", "interpolation", "frames", "finalise")
# --scope parts: what grows with the length, without sampling (see the module doc)
PART_PHASES = ("setup", "load_models", "audio_features", "bookkeeping", "mux")
PARTS_SAMPLE_RATE = 44_100  # the synthetic track of --scope parts: 44.1 kHz stereo, as a typical input
RSS_SAMPLE_SECONDS = 0.2


def emit(metric: str, value: float, **extra) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 6), **extra}), flush=True)


class PhaseClock:
    """Charges the wall time since the previous charge to a phase; samples RSS in the background and keeps the
    largest value seen while each phase was running."""

    def __init__(self, phases=PHASES):
        self.last = time.perf_counter()
        self.seconds = dict.fromkeys(phases, 0.0)
        self.peak_rss = dict.fromkeys(phases, 0)
        self.running = "setup"
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def charge(self, phase: str, next_phase: str | None = None) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now
        self._note_rss(phase)
        self.running = next_phase or phase

    def wrap(self, owner, name: str, phase: str) -> None:
        """Charge the time of every call of ``owner.name`` to ``phase`` (what ran before it to ``setup``)."""
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            self.charge("setup", phase)
            try:
                return function(*args, **kwargs)
            finally:
                self.charge(phase, "setup")

        setattr(owner, name, timed)

    def stop(self) -> None:
        self._stop.set()
        self._sampler.join()

    def _note_rss(self, phase: str) -> None:
        try:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * self._page
        except OSError:  # not Linux: only ru_maxrss is reported
            return
        self.peak_rss[phase] = max(self.peak_rss[phase], rss)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._note_rss(self.running)


def child(args) -> None:
    """One generation, in this fresh process; prints its metrics as JSON lines."""
    clock = PhaseClock()
    import keyface.loading
    from keyface.audio.features import AudioFeatureExtractor
    from keyface.generate import GenerationRequest, generate_video
    from keyface.models.bundle import KeyFaceModels
    from keyface.pipeline import GenerationSettings

    clock.wrap(keyface.loading, "load_models", "load_models")
    clock.wrap(AudioFeatureExtractor, "extract", "audio_features")
    clock.wrap(KeyFaceModels, "encode_image", "identity")

    def on_progress(event) -> None:
        clock.charge(event.stage)

    clock.charge("setup")  # the imports above
    settings = GenerationSettings(segments_per_call=args.segments_per_call)
    request = GenerationRequest(args.image, args.audio, args.out, args.models, settings=settings, device=args.device)
    out = generate_video(request, progress=on_progress)
    clock.charge("finalise")
    clock.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
    from keyface.media import probe_media

    info = probe_media(out)
    video_seconds = info.video.num_frames / float(info.video.fps)
    tag = f"pipeline_{args.seconds[0]:g}s"
    emit(f"{tag}_frames", info.video.num_frames, audio_seconds=round(info.audio.duration, 3))
    for phase in PHASES:
        seconds = round(clock.seconds[phase], 3)
        emit(
            f"{tag}_{phase}_s_per_video_s",
            clock.seconds[phase] / video_seconds,
            seconds=seconds,
            peak_rss_mb=round(clock.peak_rss[phase] / 2**20, 1),
        )
    total = sum(clock.seconds.values())
    emit(
        f"{tag}_total_s_per_video_s",
        total / video_seconds,
        seconds=round(total, 3),
        segments_per_call=args.segments_per_call,
    )
    emit(f"{tag}_peak_rss_mb", peak / 2**20)


def parts_child(args) -> None:
    """The parts of a generation whose memory grows with the length, in this fresh process, on the demo
    weights: decoding + resampling + the three audio encoders (``extract`` of the file, streamed), the job's
    bookkeeping (schedule, seeded noise, conditioning digests, job folder: a ``TalkingHeadJob`` built, not
    run) and the mux (``Mp4Writer`` with the file's AAC track streamed, one 16x16 frame per audio frame)."""
    clock = PhaseClock(PART_PHASES)
    import numpy as np
    import torch

    from keyface.audio.features import AudioFeatureExtractor
    from keyface.emotion import parse_emotion
    from keyface.loading import find_model_files, load_models
    from keyface.pipeline import Conditioning, GenerationSettings, TalkingHeadJob
    from keyface.video import Mp4Writer, StreamedAudioTrack

    clock.charge("setup", "load_models")
    files = find_model_files(args.models)
    models = load_models(files, "cpu", torch.float32)
    clock.charge("load_models", "audio_features")
    features = AudioFeatureExtractor.from_folder(files.audio).extract(args.audio)
    clock.charge("audio_features", "bookkeeping")
    valence, arousal = parse_emotion("neutral").per_frame(features.num_frames)
    identity = torch.zeros(1, *models.latent_shape)
    conditioning = Conditioning(identity, features.keyframe, features.interpolation, valence, arousal)
    job = TalkingHeadJob(models, conditioning, GenerationSettings(), job_folder=Path(args.out).parent / "job")
    clock.charge("bookkeeping", "mux")
    frame = np.zeros((16, 16, 3), np.uint8)
    with Mp4Writer(args.out, audio=StreamedAudioTrack(args.audio), preset="ultrafast") as writer:
        for _ in range(job.schedule.n_output_frames):
            writer.write(frame)
    clock.charge("mux")
    clock.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tag = f"pipeline_{args.seconds[0]:g}s"
    emit(f"{tag}_frames", features.num_frames)
    for phase in PART_PHASES:
        emit(f"{tag}_{phase}_s", clock.seconds[phase], peak_rss_mb=round(clock.peak_rss[phase] / 2**20, 1))
    emit(f"{tag}_peak_rss_mb", peak / 2**20)


def write_parts_audio(path: Path, seconds: float) -> Path:
    """Speech-like 44.1 kHz stereo WAV of ``seconds``, written a minute at a time (the bench never holds it)."""
    import wave

    import numpy as np

    from keyface.demo import speech_like_waveform

    minute = speech_like_waveform(60.0, PARTS_SAMPLE_RATE)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(PARTS_SAMPLE_RATE)
        left = round(seconds * PARTS_SAMPLE_RATE)
        while left > 0:
            piece = minute[: min(left, minute.size)]
            stereo = np.stack([piece, 0.5 * piece[::-1]], axis=1)  # two different channels
            file.writeframes((np.clip(stereo, -1, 1) * 32767).astype("<i2").tobytes())
            left -= piece.size
    return path


def run_length(seconds: float, args, models: Path, work: Path) -> dict[str, dict]:
    from keyface.demo import write_demo_inputs

    folder = work / f"{seconds:g}s"
    image, audio = write_demo_inputs(folder, seconds if args.scope == "generate" else 1.0)
    if args.scope == "parts":
        audio = write_parts_audio(folder / "speech44k.wav", seconds)
    command = [
        sys.executable,
        __file__,
        "--child",
        "--seconds",
        str(seconds),
        "--image",
        str(image),
        "--audio",
        str(audio),
        "--models",
        str(models),
        "--out",
        str(folder / "out.mp4"),
        "--device",
        args.device,
        "--segments-per-call",
        str(args.segments_per_call),
        "--scope",
        args.scope,
    ]
    env = {**os.environ, "KEYFACE_CACHE_DIR": str(folder / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    metrics = {}
    for line in result.stdout.splitlines():
        print(line, flush=True)
        if line.startswith("{"):
            record = json.loads(line)
            metrics[record["metric"]] = record
    if result.returncode != 0:
        raise SystemExit(f"the {seconds:g} s run failed (status {result.returncode})")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", nargs="+", type=float, default=[10.0, 3600.0], help="lengths (default 10 3600)")
    parser.add_argument("--segments-per-call", type=int, default=2, help="interpolation segments per network call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="bytes; sets glibc's MALLOC_MMAP_THRESHOLD_ in the runs, as a user can: blocks this large get their own "
        "mapping, returned when freed (default: unset, glibc raises the threshold up to 32 MB and keeps freed "
        "window-sized tensors in its heap)",
    )
    parser.add_argument(
        "--scope",
        choices=("parts", "generate"),
        default="parts",
        help="parts: decode, features, bookkeeping, mux (no sampling; default); generate: the whole generation",
    )
    parser.add_argument("--models", type=Path, default=None, help="demo weights folder (default: the demo's cache)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--audio", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        (parts_child if args.scope == "parts" else child)(args)
        return
    from keyface.demo import default_demo_folder, write_demo_weights

    models = write_demo_weights(args.models or default_demo_folder())
    results = {}
    with tempfile.TemporaryDirectory(prefix="keyface-bench-") as work:
        for seconds in args.seconds:
            results[seconds] = run_length(seconds, args, models, Path(work))
    longest = max(results)
    peak = {s: results[s][f"pipeline_{s:g}s_peak_rss_mb"]["value"] for s in results}
    for seconds in sorted(results, reverse=True)[1:]:  # against each shorter length; the shortest last
        emit(
            f"peak_rss_ratio_{longest:g}s_vs_{seconds:g}s",
            peak[longest] / peak[seconds],
            growth_mb=round(peak[longest] - peak[seconds], 1),
        )
    if args.scope == "parts":
        print(f"\n{'phase':>16}" + "".join(f"{s:>12g} s" for s in results), file=sys.stderr)
        for phase in PART_PHASES:
            row = "".join(f"{results[s][f'pipeline_{s:g}s_{phase}_s']['peak_rss_mb']:>11.1f} MB" for s in results)
            print(f"{phase:>16}{row}", file=sys.stderr)
        print(f"{'peak RSS MB':>16}" + "".join(f"{peak[s]:>14.1f}" for s in results), file=sys.stderr)
        return
    print(
        f"\nseconds of wall time per second of video (tiny demo weights, {args.device}, "
        f"{args.segments_per_call} segments per call):",
        file=sys.stderr,
    )
    print(f"{'phase':>16}" + "".join(f"{s:>12g} s" for s in results), file=sys.stderr)
    for phase in (*PHASES, "total"):
        row = "".join(f"{results[s][f'pipeline_{s:g}s_{phase}_s_per_video_s']['value']:>14.3f}" for s in results)
        print(f"{phase:>16}{row}", file=sys.stderr)
    print(f"{'peak RSS MB':>16}" + "".join(f"{peak[s]:>14.1f}" for s in results), file=sys.stderr)


if __name__ == "__main__":
    main()
