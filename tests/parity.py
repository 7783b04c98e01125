"""Helpers shared by the parity tests: reading a fixture set's stage files and comparing against them."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file

from keyface.checkpoints import (
    load_autoguidance_network,
    load_interpolation_model,
    load_keyframe_model,
)

TOLERANCE = 1e-4  # fixture README: float32 outputs, max abs difference (sampler states: 1e-4 * max(1, sigma))


def stage_file(fixture_set: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(fixture_set / "stages" / f"{name}.safetensors")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual.float() - expected.float()).abs().max().item()


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE):
    error = max_error(actual, expected)
    print(f"{name}: max abs error {error:.2e}")
    assert error <= tolerance, f"{name}: max abs error {error:.2e} > {tolerance:.0e}"


@functools.cache
def stage_models(fixture_set: Path, suffix: str = ".safetensors"):
    """Keyframe model, interpolation model and autoguidance network of the set, from ``<name><suffix>``."""
    checkpoints = fixture_set / "checkpoints"
    return (
        load_keyframe_model(checkpoints / f"keyframe{suffix}"),
        load_interpolation_model(checkpoints / f"interpolation{suffix}"),
        load_autoguidance_network(checkpoints / f"interpolation_bad{suffix}"),
    )
