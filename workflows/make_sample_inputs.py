"""Writes the sample inputs the example workflows name into ``workflows/inputs/``: the demo's drawn portrait and
3 s of its synthetic speech (:func:`keyface.demo.write_demo_inputs`: made from numbers, no photo or recording
of anyone; the same files on every run).

    python workflows/make_sample_inputs.py

The pack's face detector (MTCNN, :mod:`keyface.face`) finds the drawn face (score 0.99), so the examples crop
it with ``auto``. The long clip of the emotion and long-form examples is made from the speech when the pack
installs the samples (``nodes/samples.py``), which keeps the repository small.
"""

from __future__ import annotations

import shutil
import tempfile

from build_workflows import SAMPLES

from keyface.demo import write_demo_inputs

SPEECH_SECONDS = 3.0  # 75 frames, six segments: the short examples stay quick on a CPU


def main() -> None:
    SAMPLES.SAMPLES_FOLDER.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        written = write_demo_inputs(temp, seconds=SPEECH_SECONDS)
        for path, name in zip(written, (SAMPLES.SAMPLE_PORTRAIT, SAMPLES.SAMPLE_SPEECH), strict=True):
            shutil.copyfile(path, SAMPLES.SAMPLES_FOLDER / name)
            print(f"wrote workflows/inputs/{name} ({(SAMPLES.SAMPLES_FOLDER / name).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
