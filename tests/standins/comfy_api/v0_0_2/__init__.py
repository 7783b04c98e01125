"""The pinned V3 API version the nodes import (``from comfy_api.v0_0_2 import io, ui, ComfyExtension``)."""

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui
from ._video import (
    AudioInput,
    ImageInput,
    LatentInput,
    MaskInput,
    VideoComponents,
    VideoFromComponents,
    VideoFromFile,
    VideoInput,
)


class ComfyExtension(ABC):
    """What a node pack's ``comfy_entrypoint()`` returns; ComfyUI awaits ``on_load`` then ``get_node_list``."""

    async def on_load(self) -> None:
        """Called once when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The V3 node classes the extension provides."""


class Input:
    Image = ImageInput
    Audio = AudioInput
    Mask = MaskInput
    Latent = LatentInput
    Video = VideoInput


class InputImpl:
    VideoFromFile = VideoFromFile
    VideoFromComponents = VideoFromComponents


class Types:
    VideoComponents = VideoComponents


__all__ = ["ComfyExtension", "Input", "InputImpl", "Types", "io", "ui"]
