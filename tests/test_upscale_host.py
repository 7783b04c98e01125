"""The upscale branch users hit: KeyFace Video Combine -> ``nodes/host.py`` -> ComfyUI's ImageUpscaleWithModel.

ComfyUI is not installed for the tests, so a stand-in ``comfy_extras.nodes_upscale_model`` is installed with the
real node's API surface, in each form the pack supports (``requires-comfyui >= 0.3.64``):

* ComfyUI 0.3.64, a classic node: ``FUNCTION = "upscale"``, instance method ``upscale(self, upscale_model, image)``
  returning the tuple ``(IMAGE,)``;
* ComfyUI 0.3.65 and later, a V3 ``io.ComfyNode``: ``@classmethod execute(cls, upscale_model, image)`` returning an
  ``io.NodeOutput`` (not a tuple; ``output[0]`` is the IMAGE), with the alias ``upscale = execute`` marked for
  removal, so also without it.

Like the real node, the stand-in reads from the ``UPSCALE_MODEL`` (a spandrel ``ImageModelDescriptor``) its
``.model`` (parameter size, for the memory estimate) and ``.scale`` (the tiled output size), moves it with
``.to(device)`` and calls it on (batch, 3, height, width) pixels; the IMAGE arrives and leaves as
(batch, height, width, 3) in [0, 1].
"""

from __future__ import annotations

import importlib
import sys
import types

import av
import numpy as np
import pytest
import torch
from helpers import execute_node

from keyface.demo import draw_portrait

SCALE = 2
SIDE = 48
FRAMES = 3


class NegativeUpscaler(torch.nn.Module):
    """``scale`` x nearest-neighbour, then the colour negative: an output no plain resize gives."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.level = torch.nn.Parameter(torch.ones(()))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 3, h, w) -> (batch, 3, h x scale, w x scale)."""
        return self.level - torch.nn.functional.interpolate(pixels, scale_factor=self.scale, mode="nearest")


class UpscaleModel:
    """The surface of a spandrel ``ImageModelDescriptor`` that ImageUpscaleWithModel uses."""

    def __init__(self, scale: int = SCALE):
        self.scale = scale
        self.model = NegativeUpscaler(scale)
        self.devices: list[str] = []

    def to(self, device) -> UpscaleModel:
        self.devices.append(str(device))
        self.model.to(device)
        return self

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


class NodeOutput:
    """``comfy_api.latest.io.NodeOutput``: the outputs in ``args``, indexable; not a tuple."""

    def __init__(self, *args):
        self.args = args

    def __getitem__(self, index):
        return self.args[index]


def upscale_as_comfyui_does(upscale_model, image: torch.Tensor, calls: list) -> torch.Tensor:
    """What the real node does with its inputs, without its tiling (one tile holds these small frames)."""
    assert image.ndim == 4 and image.shape[-1] == 3 and image.dtype == torch.float32, image.shape  # an IMAGE
    calls.append(tuple(image.shape))
    assert sum(p.numel() * p.element_size() for p in upscale_model.model.parameters()) > 0
    upscale_model.to("cpu")  # model_management.get_torch_device() on a machine without a GPU
    pixels = image.movedim(-1, -3)
    upscaled = upscale_model(pixels)
    assert upscaled.shape[-2:] == (pixels.shape[-2] * upscale_model.scale, pixels.shape[-1] * upscale_model.scale)
    upscale_model.to("cpu")
    return upscaled.movedim(-3, -1).clamp(0.0, 1.0)


def classic_node(calls: list) -> type:
    class ImageUpscaleWithModel:
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "upscale"
        CATEGORY = "image/upscaling"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}}

        def upscale(self, upscale_model, image):
            return (upscale_as_comfyui_does(upscale_model, image, calls),)

    return ImageUpscaleWithModel


def v3_node(calls: list, with_alias: bool) -> type:
    class ImageUpscaleWithModel:  # an io.ComfyNode subclass in ComfyUI
        @classmethod
        def execute(cls, upscale_model, image) -> NodeOutput:
            return NodeOutput(upscale_as_comfyui_does(upscale_model, image, calls))

        if with_alias:
            upscale = execute

    return ImageUpscaleWithModel


NODE_FORMS = {
    "comfyui-0.3.64-classic": lambda calls: classic_node(calls),
    "comfyui-0.3.65-v3": lambda calls: v3_node(calls, with_alias=True),
    "v3-without-upscale-alias": lambda calls: v3_node(calls, with_alias=False),
}


@pytest.fixture
def host(node_pack):
    return importlib.import_module(f"{node_pack.__name__}.nodes.host")


@pytest.fixture(params=list(NODE_FORMS))
def comfy_upscale_node(request, host, monkeypatch) -> list:
    """Install ``comfy_extras.nodes_upscale_model`` with the node in the requested form; returns the list of the
    IMAGE shapes it was called with."""
    calls: list = []
    package = types.ModuleType("comfy_extras")
    package.__path__ = []
    module = types.ModuleType("comfy_extras.nodes_upscale_model")
    module.ImageUpscaleWithModel = NODE_FORMS[request.param](calls)
    package.nodes_upscale_model = module
    monkeypatch.setitem(sys.modules, "comfy_extras", package)
    monkeypatch.setitem(sys.modules, "comfy_extras.nodes_upscale_model", module)
    host._comfy.cache_clear()  # the host caches which ComfyUI modules exist
    yield calls
    host._comfy.cache_clear()


def portrait_frames() -> torch.Tensor:
    """An IMAGE batch (FRAMES, SIDE, SIDE, 3): the drawn portrait, shifted a little from frame to frame."""
    face = torch.from_numpy(np.array(draw_portrait(SIDE))).float() / 255
    return torch.stack([torch.roll(face, shifts=2 * index, dims=1) for index in range(FRAMES)])


def test_host_takes_the_comfyui_branch(comfy_upscale_node, host):
    image = portrait_frames()[:1]
    model = UpscaleModel()
    upscaled = host.upscale_image(model, image)
    assert comfy_upscale_node == [(1, SIDE, SIDE, 3)]
    assert isinstance(upscaled, torch.Tensor) and upscaled.shape == (1, SIDE * SCALE, SIDE * SCALE, 3)
    assert torch.equal(upscaled, upscale_as_comfyui_does(model, image, []))
    assert "cpu" in model.devices


def decoded_frames(path) -> torch.Tensor:
    """Every frame of a video file as (frames, height, width, 3) float in [0, 1]."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255)


def test_video_combine_upscales_through_comfyui(comfy_upscale_node, host, node_pack, tmp_path):
    images = portrait_frames()
    model = UpscaleModel()
    host.configure(output=tmp_path)
    try:
        combine = node_pack.NODE_CLASS_MAPPINGS["KeyFaceVideoCombine"]
        output = execute_node(
            combine, fps=25.0, crf=0, filename_prefix="upscaled/KeyFace", images=images, upscale_model=model
        )
    finally:
        host.configure(output=None)
    (shown,) = output.ui.as_dict()["images"]
    written = decoded_frames(tmp_path / shown["subfolder"] / shown["filename"])
    assert written.shape == (FRAMES, SIDE * SCALE, SIDE * SCALE, 3)
    assert comfy_upscale_node == [(1, SIDE, SIDE, 3)] * FRAMES  # one frame at a time, through the ComfyUI node
    expected = 1.0 - torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=SCALE).movedim(1, -1)
    resized = torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=SCALE, mode="bilinear")
    assert (written - expected).abs().mean() < 0.03  # the model's frames (yuv420p chroma subsampling aside)
    assert (written - resized.movedim(1, -1)).abs().mean() > 0.2  # not a plain resize
