"""Where the pipeline's initial noise comes from, in the original's draw order (docs/schedule.md#noise-draws).

The original seeds once per video and then draws, per chunk: for every keyframe batch a ``(1, C, h, w)`` tensor
(``randn_like`` of the identity latent, multiplied by ``cond_aug = 0`` and so without effect) and the batch's
``(14, C, h, w)`` start noise; then one ``(14 * segments, C, h, w)`` tensor for all of the chunk's segments.
:func:`noise_draws` lists those draws for a :class:`~keyface.schedule.Schedule`; a :class:`NoiseSource` hands
out draw ``i`` on request, in any order, so that a resumed or partial run (a frame range, keyframes only)
gets exactly the noise of an uninterrupted run.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .schedule import Schedule

# `torch.manual_seed(23)` of the original pipeline (docs/schedule.md#noise-draws).
DEFAULT_SEED = 23


class DrawKind(str, enum.Enum):
    IDENTITY_AUGMENTATION = "identity_augmentation"  # drawn and discarded (cond_aug = 0)
    KEYFRAMES = "keyframes"  # start noise of one keyframe batch
    SEGMENTS = "segments"  # start noise of all segments of one chunk


@dataclass(frozen=True)
class NoiseDraw:
    """One draw: its kind, the batch (keyframe kinds) or chunk (segments) it belongs to, and its shape."""

    kind: DrawKind
    unit: int
    shape: tuple[int, ...]


def noise_draws(schedule: Schedule, latent_shape: tuple[int, int, int]) -> list[NoiseDraw]:
    """The original's draws for ``schedule``, in order; ``latent_shape`` = ``(C, h, w)``."""
    frames = schedule.frames_per_clip
    draws = []
    for chunk in schedule.chunks:
        for batch in chunk.batches:
            draws.append(NoiseDraw(DrawKind.IDENTITY_AUGMENTATION, batch, (1, *latent_shape)))
            draws.append(NoiseDraw(DrawKind.KEYFRAMES, batch, (frames, *latent_shape)))
        if len(chunk.segments):
            draws.append(NoiseDraw(DrawKind.SEGMENTS, chunk.index, (frames * len(chunk.segments), *latent_shape)))
    return draws


class NoiseSource(abc.ABC):
    """Hands out the draws of :func:`noise_draws` by position, as float32 CPU tensors."""

    def __init__(self, schedule: Schedule, latent_shape: tuple[int, int, int]):
        self.draws = noise_draws(schedule, latent_shape)
        self._position = {(draw.kind, draw.unit): index for index, draw in enumerate(self.draws)}

    def keyframes(self, batch: int) -> torch.Tensor:
        """Start noise ``(14, C, h, w)`` of keyframe batch ``batch``."""
        return self.draw(self._position[DrawKind.KEYFRAMES, batch])

    def segments(self, chunk: int) -> torch.Tensor:
        """Start noise ``(14 * segments, C, h, w)`` of all segments of chunk ``chunk``."""
        return self.draw(self._position[DrawKind.SEGMENTS, chunk])

    @abc.abstractmethod
    def draw(self, index: int) -> torch.Tensor:
        """Draw number ``index`` of :attr:`draws`."""


class _ReplayStream:
    """Draws of given shapes from one seeded CPU generator, in any order: the generator state is remembered at
    every draw already reached, so going back costs nothing and going forward costs the draws in between."""

    def __init__(self, seed: int, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.states = {0: self.generator.get_state()}
        self.next = 0

    def draw(self, index: int) -> torch.Tensor:
        if index != self.next:
            reached = max(i for i in self.states if i <= index)
            self.generator.set_state(self.states[reached])
            self.next = reached
        while True:
            noise = torch.randn(self.shapes[self.next], generator=self.generator)
            self.next += 1
            self.states[self.next] = self.generator.get_state()
            if self.next - 1 == index:
                return noise


class SeededNoise(NoiseSource):
    """Draws from a CPU ``torch.Generator`` seeded once, like the original's ``torch.manual_seed(seed)`` (the
    original drew on the GPU, so the values differ from an official GPU run but not between our runs).

    ``segment_seed``: when given, the segments' draws come from a second generator seeded with it (so stage 2
    can be re-rolled without touching the keyframes); by default all draws share one stream, in the original
    order.
    """

    def __init__(
        self,
        schedule: Schedule,
        latent_shape: tuple[int, int, int],
        seed: int = DEFAULT_SEED,
        segment_seed: int | None = None,
    ):
        super().__init__(schedule, latent_shape)
        for name, value in (("seed", seed), ("segment_seed", segment_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64):
                raise InputError(f"{name} must be an integer in [0, 2**64), got {value!r}")
        if segment_seed is None:
            groups = [list(range(len(self.draws)))]
            seeds = [seed]
        else:
            separate = [i for i, draw in enumerate(self.draws) if draw.kind is DrawKind.SEGMENTS]
            shared = sorted(set(range(len(self.draws))) - set(separate))
            groups = [shared, separate]
            seeds = [seed, segment_seed]
        self._streams = [_ReplayStream(s, [self.draws[i].shape for i in group]) for s, group in zip(seeds, groups)]
        self._where = {
            index: (stream, local) for stream, group in enumerate(groups) for local, index in enumerate(group)
        }

    def draw(self, index: int) -> torch.Tensor:
        stream, local = self._where[index]
        return self._streams[stream].draw(local)


class InjectedNoise(NoiseSource):
    """Draws given in advance, e.g. the noise an official run recorded (parity checks)."""

    def __init__(self, schedule: Schedule, latent_shape: tuple[int, int, int], tensors: Sequence[torch.Tensor]):
        super().__init__(schedule, latent_shape)
        if len(tensors) != len(self.draws):
            raise InputError(f"injected noise has {len(tensors)} tensors; this schedule draws {len(self.draws)}")
        for index, (tensor, draw) in enumerate(zip(tensors, self.draws)):
            if tuple(tensor.shape) != draw.shape:
                raise InputError(
                    f"injected noise tensor {index} ({draw.kind.value} of unit {draw.unit}) has shape "
                    f"{tuple(tensor.shape)}; expected {draw.shape}"
                )
        self._tensors = [tensor.float().cpu() for tensor in tensors]

    def draw(self, index: int) -> torch.Tensor:
        return self._tensors[index]
