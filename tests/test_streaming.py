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
