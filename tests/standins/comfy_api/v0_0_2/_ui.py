"""UI outputs a node returns as ``io.NodeOutput(..., ui=...)``; the executor sends ``ui.as_dict()`` to the
frontend. Behaviour of ComfyUI 0.3.64's ``comfy_api/latest/_ui.py`` (the classes the KeyFace nodes use)."""

from __future__ import annotations

from ._io import FolderType, _UIOutput


class SavedResult(dict):
    """One file in one of ComfyUI's folders, as the frontend addresses it."""

    def __init__(self, filename: str, subfolder: str, type: FolderType):
        super().__init__(filename=filename, subfolder=subfolder, type=FolderType(type).value)

    @property
    def filename(self) -> str:
        return self["filename"]

    @property
    def subfolder(self) -> str:
        return self["subfolder"]

    @property
    def type(self) -> FolderType:
        return FolderType(self["type"])


class SavedImages(_UIOutput):
    """Saved image file(s) shown on the node; ``is_animated``: an animation (animated WebP / PNG)."""

    def __init__(self, results: list[SavedResult], is_animated: bool = False):
        self.results = results
        self.is_animated = is_animated

    def as_dict(self) -> dict:
        data = {"images": self.results}
        if self.is_animated:
            data["animated"] = (True,)
        return data


class PreviewVideo(_UIOutput):
    """Saved video file(s) shown on the node (the frontend's animated ``images`` preview)."""

    def __init__(self, values: list[SavedResult | dict], **kwargs):
        self.values = values

    def as_dict(self) -> dict:
        return {"images": self.values, "animated": (True,)}


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)}
