"""Block-by-block streaming of networks too big for the device budget: only the running block's weights there.

A part is cut into blocks (:func:`stream_layout`): a submodule holding at most ``max_block_elements`` parameter
and buffer elements (or one without children) is one block; a bigger one, or a ModuleList / ModuleDict (they are
never called, so their hooks would never run), is cut into its children, and the
weights it holds itself (e.g. a learned mask) are its ``rest``, on the device for the whole step (they are small).

:class:`LayerStreamer` gives every block a forward pre-hook that moves it in and a forward hook that moves it
out, so at most one block is resident, plus the next one when ``prefetch``: on CUDA the next block (in the order
the blocks ran before) is copied on a side stream while the current one computes, from host memory pinned on
the first move (:func:`host_copy`; only for a CUDA device, so CPU behaviour is unchanged). Moving changes where the
weights are, never their values, so the frames equal those of whole-model residency. Code that places inputs
asks :func:`compute_device`, not the weights, where a streamed network computes.

Shapes: nothing here looks at activations; the blocks' inputs and outputs stay where the network puts them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Largest block streamed whole: 64 Mi elements (128 MB in bf16); the official UNets' biggest block is smaller.
STREAM_BLOCK_ELEMENTS = 64 * 2**20
# Modules of the networks being streamed now -> their compute device (see compute_device).
_STREAMED: weakref.WeakKeyDictionary[nn.Module, torch.device] = weakref.WeakKeyDictionary()


def _own_elements(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


def _bytes(*tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for group in tensors for t in group)


def _elements(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


@dataclass
class StreamLayout:
    """The blocks of one or more parts, in registration order, and the modules whose own weights stay resident."""

    blocks: list[nn.Module]
    rest: list[nn.Module]

    @property
    def largest_block_elements(self) -> int:
        return max((_elements(block) for block in self.blocks), default=0)

    @property
    def rest_elements(self) -> int:
        return sum(_own_elements(module) for module in self.rest)

    def peak_elements(self, prefetch: bool = True) -> int:
        """Weight elements on the device at most while streaming: the rest and the largest block (with prefetch,
        the two largest: the running one and the next)."""
        sizes = sorted((_elements(block) for block in self.blocks), reverse=True)
        return self.rest_elements + sum(sizes[: 2 if prefetch else 1])

    def peak_bytes(self, prefetch: bool = True) -> int:
        """:meth:`peak_elements` in bytes, at the weights' own dtypes."""
        sizes = sorted((_bytes(block.parameters(), block.buffers()) for block in self.blocks), reverse=True)
        rest = sum(_bytes(module.parameters(recurse=False), module.buffers(recurse=False)) for module in self.rest)
        return rest + sum(sizes[: 2 if prefetch else 1])


def stream_layout(modules: Iterable[nn.Module], max_block_elements: int = STREAM_BLOCK_ELEMENTS) -> StreamLayout:
    """The blocks of ``modules`` (see the module docstring): each at most ``max_block_elements`` elements unless
    it has no children."""
    layout = StreamLayout([], [])

    def cut(module: nn.Module) -> None:
        children = [child for child in module.children() if _elements(child)]
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict))  # never called itself: no hooks would run
        if not container and (_elements(module) <= max_block_elements or not children):
            layout.blocks.append(module)
            return
        if _own_elements(module):
            layout.rest.append(module)
        for child in children:
            cut(child)

    for module in modules:
        cut(module)
    return layout


def host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The offload tensor kept while ``tensor``'s copy is on ``device``: for a CUDA device a CPU tensor is pinned
    (page-locked) once, so every later copy in is an asynchronous DMA that the side stream overlaps with compute
    (a pageable source makes the copy synchronous); anything else is kept as it is."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


class KeptWeights:
    """The default move of a :class:`LayerStreamer`: moving a module in copies its weights to the device and keeps
    the offload tensors (pinned for CUDA: :func:`host_copy`); moving it out puts those back, so nothing is copied
    back (streamed weights never change) and the host never waits for the device there."""

    def __init__(self):
        self._kept: dict[tuple[int, str], torch.Tensor] = {}  # (id(owner), name) -> offload tensor

    def __call__(self, module: nn.Module, device: torch.device, *, recurse: bool = True, non_blocking: bool = False):
        for owner in module.modules() if recurse else (module,):
            for name, param in owner.named_parameters(recurse=False):
                param.data = self._swap(owner, name, param.data, device, non_blocking)
            for name, buffer in owner.named_buffers(recurse=False):
                setattr(owner, name, self._swap(owner, name, buffer, device, non_blocking))

    def _swap(self, owner, name, tensor, device, non_blocking) -> torch.Tensor:
        key = (id(owner), name)
        if key in self._kept:
            return self._kept.pop(key)
        self._kept[key] = tensor = host_copy(tensor, device)
        return tensor.to(device, non_blocking=non_blocking)


def compute_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its streaming device while a :class:`LayerStreamer` runs it, else the device of
    its first parameter."""
    device = _STREAMED.get(module)
    return device if device is not None else next(module.parameters()).device


Move = Callable[..., None]


class LayerStreamer:
    """Streams the blocks of ``layout`` through ``device`` while the ``with`` block runs (see the module docstring).

    ``move(module, device, recurse=..., non_blocking=...)`` moves weights (default :class:`KeptWeights`; tests
    pass a recording one). ``resident`` holds the blocks on the device now; ``most_resident`` the most at once.
    """

    def __init__(
        self,
        layout: StreamLayout,
        roots: Iterable[nn.Module],
        device: torch.device,
        offload_device: torch.device,
        *,
        prefetch: bool = True,
        move: Move | None = None,
    ):
        self.layout, self.roots = layout, list(roots)
        self.device, self.offload_device = device, offload_device
        self.prefetch, self.move = prefetch, KeptWeights() if move is None else move
        self.resident: list[nn.Module] = []
        self.most_resident = 0
        self._next: dict[int, nn.Module] = {}  # id(block) -> the block that ran after it last time
        self._previous: nn.Module | None = None
        self._handles: list = []
        self._side = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None

    def __enter__(self) -> LayerStreamer:
        for module in self.layout.rest:
            self.move(module, self.device, recurse=False)
        for block in self.layout.blocks:
            self._handles.append(block.register_forward_pre_hook(self._before))
            self._handles.append(block.register_forward_hook(self._after))
        for root in self.roots:
            for module in root.modules():
                _STREAMED[module] = self.device
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        for block in self.resident:
            self.move(block, self.offload_device)
        self.resident.clear()
        for module in self.layout.rest:
            self.move(module, self.offload_device, recurse=False)
        for root in self.roots:
            for module in root.modules():
                _STREAMED.pop(module, None)

    def _load(self, block: nn.Module, *, ahead: bool = False) -> None:
        if any(block is held for held in self.resident):
            return
        if ahead and self._side is not None:
            # the copy waits for the work queued so far, so it never overwrites memory a running kernel reads
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self.move(block, self.device, non_blocking=True)
        else:
            self.move(block, self.device)
        self.resident.append(block)
        self.most_resident = max(self.most_resident, len(self.resident))

    def _before(self, block: nn.Module, args) -> None:
        if self._previous is not None:
            self._next[id(self._previous)] = block
        self._previous = block
        self._load(block)
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        following = self._next.get(id(block))
        if self.prefetch and following is not None and following is not block:
            self._load(following, ahead=True)

    def _after(self, block: nn.Module, args, output) -> None:
        self.move(block, self.offload_device)
        self.resident = [held for held in self.resident if held is not block]
