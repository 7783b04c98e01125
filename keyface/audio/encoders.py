"""Audio encoders as sequence models, and how long audio is encoded in windows with bounded memory.

An :class:`AudioEncoder` turns a 16 kHz mono waveform ``(samples,)`` into a sequence ``(N, dim)``. Output
index ``k`` is anchored at input sample ``k * 320`` (WavLM / wav2vec2: one vector per 20 ms; BEATs: token
``8 t + f`` of time patch ``t`` is anchored at ``2560 t``), and an output only depends on samples from its
anchor on, within the encoder's receptive field.

Long audio is cut into windows (:class:`WindowConfig`): each window is a core of ``window - 2 * context``
seconds plus ``context`` seconds on each side; only the outputs anchored in the core are kept. Window
boundaries are multiples of the encoder's ``alignment`` (its total stride), so every kept output sees the
same samples at the same positions as in a single pass. What does differ from a single pass:

* statistics over the whole clip (wav2vec2's waveform normalisation, the group norm of the first conv
  layer of WavLM / wav2vec2) - computed over the whole clip in a first streaming pass, so they are exact;
* self-attention, which is global: a kept output cannot attend to audio beyond the context. The
  positional convolution (128 taps, about +-1.3 s) is covered by any context of 2 s or more.

A clip that fits in one window is encoded in a single pass: the original's numbers, up to float rounding.
"""

from __future__ import annotations

import abc
import ctypes
import functools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..constants import ENCODER_SAMPLE_RATE
from ..errors import InputError

STATISTICS_CHUNK_SAMPLES = 16_000 * 10  # first-pass chunk for clip-wide statistics (10 s)


@dataclass(frozen=True)
class WindowConfig:
    """How long audio is split for encoding.

    Attributes:
        window_seconds: longest input an encoder sees at once; a clip up to this long is encoded in one pass.
            Memory of one window grows with its square (self-attention).
        context_seconds: audio on each side of a window's kept core (``window - 2 * context`` seconds).
    """

    window_seconds: float = 60.0
    context_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not (self.context_seconds > 0 and self.window_seconds > 2 * self.context_seconds):
            raise InputError(
                f"window: window_seconds ({self.window_seconds}) must be more than twice context_seconds "
                f"({self.context_seconds}), and context_seconds must be positive"
            )


@dataclass(frozen=True)
class Window:
    """Encoder input samples ``[input_start, input_end)``, kept outputs anchored in ``[core_start, core_end)``."""

    input_start: int
    input_end: int
    core_start: int
    core_end: int


def plan_windows(num_samples: int, alignment: int, config: WindowConfig) -> list[Window]:
    """Split ``num_samples`` into windows whose boundaries are multiples of ``alignment`` samples."""
    if num_samples <= config.window_seconds * ENCODER_SAMPLE_RATE:
        return [Window(0, num_samples, 0, num_samples)]
    context = alignment * math.ceil(config.context_seconds * ENCODER_SAMPLE_RATE / alignment)
    core = alignment * max(
        1, int((config.window_seconds - 2 * config.context_seconds) * ENCODER_SAMPLE_RATE // alignment)
    )
    windows = []
    for core_start in range(0, num_samples, core):
        core_end = min(core_start + core, num_samples)
        windows.append(Window(max(0, core_start - context), min(num_samples, core_end + context), core_start, core_end))
    return windows


class AudioEncoder(abc.ABC):
    """A pretrained encoder from a 16 kHz waveform to a sequence of vectors (one per 20 ms anchor).

    Attributes:
        name: ``"wavlm"``, ``"beats"`` or ``"wav2vec2"``.
        module: the torch module (its dtype and device are the encoder's).
        dim: width of each output vector (from the checkpoint's config).
        identity: what identifies the weights (file path, size, mtime) for the feature cache.
        alignment: window boundaries must be multiples of this many samples.
    """

    name: str
    module: torch.nn.Module
    dim: int
    identity: str
    alignment: int

    @property
    @abc.abstractmethod
    def min_samples(self) -> int:
        """Shortest input that gives at least one output vector."""

    @abc.abstractmethod
    def sequence_length(self, num_samples: int) -> int:
        """Length ``N`` of the output sequence for an input of ``num_samples`` samples."""

    @abc.abstractmethod
    def first_index_at(self, sample: int) -> int:
        """The first output index anchored at or after ``sample``."""

    def clip_statistics(self, waveform: torch.Tensor, num_valid: int) -> object:
        """Clip-wide values an encoder needs in every window (module doc); ``None`` when it needs none."""
        return None

    @abc.abstractmethod
    def encode_window(self, waveform: torch.Tensor, start: int, statistics: object) -> torch.Tensor:
        """Encode ``waveform`` (a window starting at clip sample ``start``) -> ``(n, dim)`` float32 on the CPU."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AudioEncoder:
        self.module.to(device=device, dtype=dtype)
        return self

    def encode(
        self,
        waveform: torch.Tensor,
        num_valid: int | None = None,
        window: WindowConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Encode a whole clip -> ``(N, dim)`` float32 (kept in memory; for long clips see :func:`encode_blocks`)."""
        blocks = [block for _, block in encode_blocks(self, waveform, num_valid, window, progress)]
        return torch.cat(blocks) if blocks else torch.zeros(0, self.dim)


def encode_blocks(
    encoder: AudioEncoder,
    waveform: torch.Tensor,
    num_valid: int | None = None,
    window: WindowConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Encode ``waveform`` ``(samples,)`` window by window.

    Args:
        encoder: the encoder.
        waveform: the 16 kHz input exactly as the encoder sees it (already padded): a ``(samples,)`` tensor or
            a :class:`~keyface.audio.io.WaveformFile` (only sliced, a window or statistics chunk at a time).
        num_valid: samples of real audio before the zero padding (for clip statistics); default all.
        window: window sizes; default :class:`WindowConfig()`.
        progress: called ``progress(done, total)`` after each window; it may raise to stop the work.

    Yields:
        ``(first_index, block)`` with ``block`` of shape ``(n, dim)``: consecutive parts of the sequence
        a single pass would give, in order, covering indices ``0 .. N-1`` exactly once.
    """
    window = window or WindowConfig()
    num_samples = int(waveform.shape[-1])
    num_valid = num_samples if num_valid is None else num_valid
    windows = plan_windows(num_samples, encoder.alignment, window)
    statistics = encoder.clip_statistics(waveform, num_valid)
    total = encoder.sequence_length(num_samples)
    for done, item in enumerate(windows, start=1):
        offset = encoder.first_index_at(item.input_start)
        keep_start = encoder.first_index_at(item.core_start)
        keep_end = total if item.core_end == num_samples else min(total, encoder.first_index_at(item.core_end))
        if keep_end > keep_start:
            out = encoder.encode_window(waveform[item.input_start : item.input_end], item.input_start, statistics)
            if keep_end - offset > out.shape[0]:
                raise RuntimeError(f"{encoder.name}: window {item} too short for its core (context below one stride)")
            yield keep_start, out[keep_start - offset : keep_end - offset]
            release_free_heap()
        if progress is not None:
            progress(done, len(windows))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (AttributeError, OSError):
        return None


def release_free_heap() -> None:
    """Give the pages that freed tensors leave in the C heap back to the system (glibc ``malloc_trim``; a no-op
    without glibc).

    glibc keeps freed blocks below its (sliding, up to 32 MB) mmap threshold in the heap for reuse, and the
    temporaries of one window fragment it differently each time, so without this the resident size creeps up
    over an hour of windows although the live tensors do not. One call takes a few milliseconds (7 ms with
    0.8 GB of small live blocks in the heap).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
