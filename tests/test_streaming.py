"""Device discipline: block-by-block streaming of a network under a small device budget (only the running block's
weights resident, frames unchanged), a sampler loop that never waits for the device, and the half-precision-on-CPU
warning.

The device moves are stand-ins on this one-device machine: a moved-out block's weights are replaced by NaN, so any
weight used while "off the device" poisons the frames, and every move is recorded and counted.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_model_management import comfy  # noqa: F401  (the stand-in ComfyUI fixture)
from torch.overrides import TorchFunctionMode

from keyface.loading import resolve_dtype
from keyface.sampling import ays_sigmas, sample_euler


class HostReads(TorchFunctionMode):
    """Records the tensor methods that copy a value back to the host (and so wait for the device)."""

    READS = {"__bool__", "item", "tolist", "__float__", "__int__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_the_sampler_loop_never_reads_a_tensor_back_on_the_host():
    sigmas = ays_sigmas(10)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return x / (1 + sigma[:, None, None, None] ** 2)

    expected = sample_euler(denoise, noise, sigmas)
    with HostReads() as mode:
        result = sample_euler(denoise, noise, sigmas)
    # the one read is the schedule itself, before the first step
    assert mode.reads == ["tolist"]
    assert torch.equal(result, expected)
    assert len(calls) == 2 * (len(sigmas) - 1)
    # the last step returns the denoised estimate (sigma 0), the others an Euler step
    last = noise.float() * torch.sqrt(1 + sigmas[0] ** 2)
    for sigma, next_sigma in zip(sigmas[:-2], sigmas[1:-1], strict=True):
        last = last + (next_sigma - sigma) * ((last - denoise(last, sigma.expand(2))) / sigma)
    assert torch.equal(result, denoise(last, sigmas[-2].expand(2)))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_the_cpu_warns_in_one_line(precision):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = resolve_dtype(precision, torch.device("cpu"))
    assert dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and f"precision {precision} on the CPU" in message and "auto or fp32" in message
    assert caught[0].filename == __file__  # reported at the caller, which the node path shows to the artist


def test_auto_precision_never_picks_half_on_the_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


# ------------------------------------------------------------------------------------------------ streaming

OFF = torch.device("meta")  # stands for the offload device: nothing is moved there, the weights are poisoned


class PoisonMoves:
    """A streaming move that keeps every weight on the CPU: a module moved "out" (to :data:`OFF`) has its floating
    weights replaced by NaN (the real ones kept), moving it in puts them back. ``in_now`` counts the blocks moved
    in (``recurse``) and not yet out; ``most_in`` the most at once."""

    def __init__(self):
        self.kept: dict[tuple[int, str], torch.Tensor] = {}
        self.in_now = self.most_in = self.block_moves = 0

    def poison(self, module: torch.nn.Module) -> None:
        self(module, OFF)
        self.in_now = self.block_moves = 0

    def __call__(self, module, device, *, recurse=True, non_blocking=False):
        for owner in module.modules() if recurse else (module,):
            for name, param in owner.named_parameters(recurse=False):
                param.data = self._swap(owner, name, param.data, device)
            for name, buffer in owner.named_buffers(recurse=False):
                setattr(owner, name, self._swap(owner, name, buffer, device))
        if recurse:
            self.block_moves += 1
            self.in_now += 1 if device != OFF else -1
            self.most_in = max(self.most_in, self.in_now)

    def _swap(self, owner, name, tensor, device):
        key = (id(owner), name)
        if device != OFF:
            return self.kept.pop(key)
        if not tensor.is_floating_point():
            self.kept[key] = tensor
            return tensor
        self.kept[key] = tensor
        return torch.full_like(tensor, float("nan"))


@pytest.fixture
def fresh(demo_models):
    from keyface.loading import find_model_files, load_models

    return load_models(find_model_files(demo_models))


def run_job(models, folder):
    from helpers import random_conditioning

    from keyface.pipeline import GenerationSettings, TalkingHeadJob
    from keyface.video import FrameListSink

    sink = FrameListSink()
    TalkingHeadJob(models, random_conditioning(models, 30, seed=5), GenerationSettings(), job_folder=folder).run(sink)
    return sink.stack()


def test_stream_layout_cuts_big_modules_and_covers_every_weight_once(fresh):
    from keyface.models.streaming import stream_layout

    unet = fresh.interpolation
    layout = stream_layout([unet], max_block_elements=4000)
    assert len(layout.blocks) > 20
    for block in layout.blocks:
        size = sum(t.numel() for t in (*block.parameters(), *block.buffers()))
        assert size <= 4000 or not any(True for _ in block.children()), type(block).__name__
    owned = [id(t) for block in layout.blocks for t in (*block.parameters(), *block.buffers())]
    owned += [id(t) for module in layout.rest for t in (*module.parameters(False), *module.buffers(False))]
    assert sorted(owned) == sorted(id(t) for t in (*unet.parameters(), *unet.buffers()))
    assert layout.largest_block_elements < sum(t.numel() for t in unet.parameters()) / 10
    # one block for a limit above the whole network
    assert stream_layout([unet], max_block_elements=10**12).blocks == [unet]


@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_holds_one_block_and_gives_identical_frames(fresh, tmp_path, prefetch):
    import dataclasses

    import numpy as np

    from keyface.models.bundle import Residency

    plain = run_job(fresh, tmp_path / "plain")
    moves = PoisonMoves()
    for module in fresh.parts().values():
        moves.poison(module)
    residency = Residency(
        torch.device("cpu"), OFF, "stream", block_elements=4000, prefetch=prefetch, move=moves, make_room=None
    )
    streamed = run_job(dataclasses.replace(fresh, residency=residency), tmp_path / "streamed")
    # every weight the networks used was moved in first: a poisoned (NaN) one would change the frames
    assert np.array_equal(streamed, plain)
    assert moves.most_in == (2 if prefetch else 1)
    assert moves.in_now == 0 and residency.resident == set()
    assert moves.block_moves > 1000
    assert all(torch.isnan(p).all() for p in fresh.interpolation.parameters())  # all back "off the device"


def test_stream_mode_asks_the_host_for_room_for_each_step(fresh, tmp_path):
    import dataclasses

    from keyface.models.bundle import Residency
    from keyface.models.streaming import stream_layout

    rooms = []
    moves = PoisonMoves()
    for module in fresh.parts().values():
        moves.poison(module)
    residency = Residency(torch.device("cpu"), OFF, "stream", block_elements=4000, move=moves, make_room=rooms.append)
    run_job(dataclasses.replace(fresh, residency=residency), tmp_path / "job")
    for module in fresh.parts().values():
        moves(module, torch.device("cpu"))
    segments = stream_layout([fresh.interpolation, fresh.autoguidance], 4000).peak_bytes()
    assert segments in rooms and all(0 < room < fresh.size_bytes() / 5 for room in rooms)


def test_comfyui_lowvram_streams_the_networks_after_freeing_their_room(comfy, monkeypatch):  # noqa: F811
    import enum

    from test_model_management import FakeModelManagement, install_fake_comfy
    from test_nodes import host, run

    from keyface.models.streaming import stream_layout

    management = FakeModelManagement()
    management.VRAMState = enum.Enum("VRAMState", "DISABLED NO_VRAM LOW_VRAM NORMAL_VRAM HIGH_VRAM SHARED")
    management.vram_state = management.VRAMState.NORMAL_VRAM
    install_fake_comfy(comfy, management)
    assert not host.streams_layers()
    for state in ("LOW_VRAM", "NO_VRAM"):
        management.vram_state = management.VRAMState[state]
        assert host.streams_layers(), state
    rooms = []
    monkeypatch.setattr(host, "free_memory", lambda size, device: rooms.append(size))
    (bundle,) = run("KeyFaceModelLoader")
    with bundle.on_device() as models:
        assert models.residency.mode == "stream"
        with models.step("segments"):
            pass
    assert rooms == [stream_layout([models.interpolation, models.autoguidance]).peak_bytes()]
    assert management.loads == []  # nothing loaded whole through load_models_gpu
    assert models.residency is None


class FakePinning:
    """Stands in for CUDA on this machine: ``Tensor.to("cuda")`` returns a copy that stays on the CPU, and
    ``pin_memory`` / ``is_pinned`` record which host tensors were asked to be page-locked."""

    def __init__(self, monkeypatch):
        self.requests: list[tuple[int, ...]] = []
        self.pinned: set[int] = set()
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if target is not None and torch.device(target).type == "cuda":
                return tensor.clone()
            return real_to(tensor, *args, **kwargs)

        def pin_memory(tensor, *args):
            self.requests.append(tuple(tensor.shape))
            copy = tensor.clone()
            self.pinned.add(copy.data_ptr())
            return copy

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor, *args: tensor.data_ptr() in self.pinned)


def test_streamed_host_weights_are_pinned_once_and_only_for_a_cuda_device(monkeypatch):
    from keyface.models.streaming import KeptWeights

    pinning = FakePinning(monkeypatch)
    block = torch.nn.Linear(3, 2)
    weight, bias = block.weight.detach().clone(), block.bias.detach().clone()
    shapes = sorted([(2, 3), (2,)])
    moves = KeptWeights()
    for _ in range(2):  # the CPU path never asks for page-locked memory
        moves(block, torch.device("cpu"))
        moves(block, torch.device("cpu"))
    assert pinning.requests == []
    moves = KeptWeights()
    for _ in range(3):
        moves(block, torch.device("cuda"), non_blocking=True)
        assert block.weight.data_ptr() not in pinning.pinned  # the block computes on its device copy
        moves(block, torch.device("cpu"))
        assert {block.weight.data_ptr(), block.bias.data_ptr()} <= pinning.pinned  # the kept offload tensors
    assert sorted(pinning.requests) == shapes  # pinned on the first move in, reused after
    assert torch.equal(block.weight, weight) and torch.equal(block.bias, bias)
