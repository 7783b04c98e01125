"""The KeyFace ComfyUI nodes: thin adapters from ComfyUI's node contract to the ``keyface`` library.

Every node is a V3 node (``comfy_api.v0_0_2``: ``io.ComfyNode`` with ``define_schema`` / ``execute``). ComfyUI
0.3.64 registers a pack from ``NODE_CLASS_MAPPINGS`` when it has one (V3 classes work there) and from
``comfy_entrypoint()`` otherwise; both list the same classes. Importing this package is cheap (no torch, no model
files): the node modules import the library where they use it, and ComfyUI itself only through :mod:`.host`.
"""

from comfy_api.v0_0_2 import ComfyExtension, io

from .audio import KeyFaceLoadAudio
from .emotion import KeyFaceEmotionCurve
from .evaluate import KeyFaceEvaluate
from .face import KeyFaceCropFace, KeyFacePasteBack
from .frame_batches import KeyFaceCollect, KeyFaceFrameBatches
from .generate import KeyFaceKeyframeInterpolator, KeyFaceKeyframeSampler
from .host import register_model_folders
from .loader import KeyFaceModelLoader
from .video import KeyFaceVideoCombine, KeyFaceVideoToImages

NODE_DISPLAY_NAME_MAPPINGS = {
    "KeyFaceModelLoader": "KeyFace Model Loader",
    "KeyFaceLoadAudio": "KeyFace Load Audio",
    "KeyFaceEmotionCurve": "KeyFace Emotion Curve",
    "KeyFaceCropFace": "KeyFace Crop Face",
    "KeyFaceKeyframeSampler": "KeyFace Keyframe Sampler",
    "KeyFaceKeyframeInterpolator": "KeyFace Keyframe Interpolator",
    "KeyFaceVideoCombine": "KeyFace Video Combine",
    "KeyFaceVideoToImages": "KeyFace Video to Images",
    "KeyFacePasteBack": "KeyFace Paste Back",
    "KeyFaceEvaluate": "KeyFace Evaluate",
    "KeyFaceFrameBatches": "KeyFace Frame Batches",
    "KeyFaceCollect": "KeyFace Collect",
}

NODE_CLASS_MAPPINGS = {
    node.__name__: node
    for node in (
        KeyFaceModelLoader,
        KeyFaceLoadAudio,
        KeyFaceEmotionCurve,
        KeyFaceCropFace,
        KeyFaceKeyframeSampler,
        KeyFaceKeyframeInterpolator,
        KeyFaceVideoCombine,
        KeyFaceVideoToImages,
        KeyFacePasteBack,
        KeyFaceEvaluate,
        KeyFaceFrameBatches,
        KeyFaceCollect,
    )
}


class KeyFaceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASS_MAPPINGS.values())


async def comfy_entrypoint() -> KeyFaceExtension:
    return KeyFaceExtension()


register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
