"""Per-step residency (keyface.models.bundle): during each pipeline step only the parts it uses are on the
compute device, and the frames do not depend on the offload mode.

The compute device here is a stand-in: the residency's load/unload hooks record what would move instead of
moving it (this machine has one device), so the test counts residency, not memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import random_conditioning

from keyface.errors import InputError
from keyface.loading import find_model_files, load_models
from keyface.models.bundle import MODEL_PARTS, STEP_PARTS, Residency
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.video import FrameListSink


class RecordingResidency(Residency):
    """A Residency whose moves are recorded; ``during`` maps each step to the parts resident inside it."""

    def __init__(self, mode: str):
        super().__init__(
            torch.device("cuda"), torch.device("cpu"), mode, load=self._load_hook, unload=self._unload_hook
        )
        self.moves: list[tuple[str, str]] = []
        self.during: dict[str, set[frozenset[str]]] = {}

    def _load_hook(self, parts):
        self.moves += [("load", name) for name in parts if name not in self.resident]

    def _unload_hook(self, parts):
        self.moves += [("unload", name) for name in parts]

    def step(self, models, names):
        context = super().step(models, names)

        class Recorded:
            def __enter__(inner):
                context.__enter__()
                step = next(step for step, parts in STEP_PARTS.items() if parts == names)
                self.during.setdefault(step, set()).add(frozenset(self.resident))

            def __exit__(inner, *exc):
                return context.__exit__(*exc)

        return Recorded()


@pytest.fixture(scope="module")
def loaded(demo_models):
    return load_models(find_model_files(demo_models))


def run_job(models, folder) -> np.ndarray:
    sink = FrameListSink()
    TalkingHeadJob(models, random_conditioning(models, 30, seed=5), GenerationSettings(), job_folder=folder).run(sink)
    return sink.stack()


@pytest.mark.parametrize("mode", ["stage", "sequential"])
def test_each_step_holds_only_its_own_parts(loaded, tmp_path, mode):
    residency = RecordingResidency(mode)
    models = dataclasses.replace(loaded, residency=residency)
    image = np.full((64, 64, 3), 128, np.uint8)
    models.encode_image(image)
    run_job(models, tmp_path / "job")
    assert set(residency.during) >= {"identity", "keyframes", "segments", "decode"}
    for step, seen in residency.during.items():
        assert seen == {frozenset(models.parts(STEP_PARTS[step]))}, step
    # stage: the last step's parts (the decoder) stay until another step needs the room; sequential: nothing stays
    expected = set(models.parts(STEP_PARTS["decode"])) if mode == "stage" else set()
    assert residency.resident == expected
    # every load is matched by an unload, except what is still resident; nothing moves twice in a row
    loads, unloads = ([name for kind, name in residency.moves if kind == wanted] for wanted in ("load", "unload"))
    assert sorted(loads) == sorted(unloads + sorted(expected))
    for name in models.parts():
        kinds = [kind for kind, moved in residency.moves if moved == name]
        assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)), (name, kinds)


def test_offload_modes_give_identical_frames(loaded, tmp_path):
    plain = run_job(loaded, tmp_path / "plain")
    for mode in ("none", "stage", "sequential"):
        models = dataclasses.replace(loaded, residency=RecordingResidency(mode))
        assert np.array_equal(run_job(models, tmp_path / mode), plain), mode


def test_an_unknown_offload_mode_is_refused():
    with pytest.raises(InputError, match="offload must be one of none, stage, sequential"):
        Residency(torch.device("cpu"), torch.device("cpu"), "everything")
    assert set(MODEL_PARTS) >= {part for parts in STEP_PARTS.values() for part in parts}
