"""The sample inputs the example workflows name, put into ComfyUI's input folder when the pack loads.

``workflows/inputs/`` holds the demo's drawn portrait and 3 s of its synthetic speech (both made from numbers
by ``workflows/make_sample_inputs.py``: no photo or recording of anyone). The long clip of the emotion and
long-form examples is made from the speech while installing (the short clip several times, with pauses), so
the repository stays small. A file already in the input folder is never replaced (it may be the artist's own),
and a folder that cannot be written costs one log line: the pack still loads.
"""

from __future__ import annotations

import logging
import shutil
import wave
from pathlib import Path

from keyface.errors import KeyFaceError
from keyface.files import atomic_write

from . import host

logger = logging.getLogger(__name__)

SAMPLES_FOLDER = Path(__file__).resolve().parent.parent / "workflows" / "inputs"
SAMPLE_PORTRAIT = "keyface_sample_portrait.png"
SAMPLE_SPEECH = "keyface_sample_speech.wav"
SAMPLE_SPEECH_LONG = "keyface_sample_speech_long.wav"
LONG_SPEECH_REPEATS = 5  # 5 x 3 s + pauses: 17.4 s, long enough for the emotion example's curve
LONG_SPEECH_PAUSE = 0.6  # seconds of silence between the repeats


def write_long_speech(short: Path, out: Path) -> None:
    """``short`` (a PCM wav) :data:`LONG_SPEECH_REPEATS` times, :data:`LONG_SPEECH_PAUSE` s of silence between."""
    with wave.open(str(short), "rb") as source:
        params = source.getparams()
        samples = source.readframes(params.nframes)
    silence = b"\0" * (round(LONG_SPEECH_PAUSE * params.framerate) * params.sampwidth * params.nchannels)
    with wave.open(str(out), "wb") as target:
        target.setparams(params)
        target.writeframes(silence.join([samples] * LONG_SPEECH_REPEATS))


def install_sample_inputs(folder: Path) -> list[str]:
    """Put the samples missing from ``folder`` there; returns the names written (none when all were present).

    A folder that cannot be written is logged once and skipped (the examples then need the artist's own files).
    """
    copies = {SAMPLE_PORTRAIT: SAMPLES_FOLDER / SAMPLE_PORTRAIT, SAMPLE_SPEECH: SAMPLES_FOLDER / SAMPLE_SPEECH}
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in (SAMPLE_PORTRAIT, SAMPLE_SPEECH, SAMPLE_SPEECH_LONG):
            target = folder / name
            if target.exists():
                continue
            with atomic_write(target, "sample input") as temp:
                if name in copies:
                    shutil.copyfile(copies[name], temp)
                else:
                    write_long_speech(SAMPLES_FOLDER / SAMPLE_SPEECH, temp)
            written.append(name)
    except (OSError, KeyFaceError) as error:
        logger.warning(
            "KeyFace: the example workflows' sample inputs were not put into %s (%s); copy them from %s if you "
            "want to run the examples unchanged",
            folder,
            error,
            SAMPLES_FOLDER,
        )
    if written:
        logger.info("KeyFace: sample inputs for the example workflows added to %s: %s", folder, ", ".join(written))
    return written


def install_into_comfyui() -> None:
    """At pack import inside ComfyUI: the samples into its input folder (nothing happens outside ComfyUI)."""
    if host.in_comfyui():
        install_sample_inputs(host.input_dir())
