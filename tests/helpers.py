"""Small builders shared by several test files (import as ``from helpers import ...``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from keyface import face
from keyface.errors import KeyFaceError
from keyface.pipeline import Conditioning

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_PACK_NAME = "keyface_node_pack"  # any name works: ComfyUI uses the custom_nodes folder's name


def load_node_pack():
    """The repository imported as ComfyUI imports a custom-node pack: a package named after its folder, from its
    ``__init__.py`` (its node modules are ``<name>.nodes.*``); imported once per session."""
    if NODE_PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            NODE_PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[NODE_PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[NODE_PACK_NAME]


def execute_node(node, hidden: dict | None = None, **inputs):
    """Run a V3 node as ComfyUI's executor does: on a class clone carrying the hidden inputs (``{io.Hidden: value}``),
    through ``EXECUTE_NORMALIZED``; returns the :class:`io.NodeOutput` (values in ``.result``, ``.ui``)."""
    return node.PREPARE_CLASS_CLONE(hidden or {}).EXECUTE_NORMALIZED(**inputs)


def validate_inputs_of(node, hidden: dict | None = None):
    """A V3 node's own ``validate_inputs``, bound to a class clone as ComfyUI's prompt validation calls it; None when
    the node defines none (ComfyUI then calls nothing)."""
    from comfy_api.v0_0_2 import io

    if node.validate_inputs.__func__ is io.ComfyNode.validate_inputs.__func__:
        return None
    return node.PREPARE_CLASS_CLONE(hidden or {}).validate_inputs


def random_conditioning(models, frames: int, seed: int = 3) -> Conditioning:
    """Random but fixed conditioning of ``frames`` frames for loaded ``models`` (no audio encoders needed)."""
    generator = torch.Generator().manual_seed(seed)
    return Conditioning(
        torch.randn(1, *models.latent_shape, generator=generator) * 0.2,
        torch.randn(frames, 2, models.keyframe.config.audio_feature_dim, generator=generator),
        torch.randn(frames, 2, models.interpolation.config.audio_feature_dim, generator=generator),
        torch.linspace(-0.5, 0.5, frames),
        torch.zeros(frames),
    )


NO_FACE_DETECTOR = f"face detector not installed ({face.DETECTOR_INSTALL_HINT})"


def face_detector_available() -> bool:
    """Whether the optional face detector loads. CI installs it, so there (``CI=true``) a missing detector
    raises instead: the tests that need it fail rather than skip."""
    try:
        face._networks()
    except KeyFaceError:
        if os.environ.get("CI") == "true":
            raise
        return False
    return True


def require_face_detector() -> None:
    """Skip the calling test without the face detector; fail in CI (see :func:`face_detector_available`)."""
    if not face_detector_available():
        pytest.skip(NO_FACE_DETECTOR)
