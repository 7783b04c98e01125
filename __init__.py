"""ComfyUI-KeyFace: long, expressive, audio-driven talking-head video (arXiv 2503.01715) as ComfyUI nodes.

ComfyUI imports this folder as a package (``custom_nodes/<folder>/__init__.py``) without putting the folder on
``sys.path``; the ``keyface`` library next to this file is made importable here (appended, so an installed
``keyface`` package wins), then the nodes are exported and, inside ComfyUI, the example workflows' sample inputs
are put into its input folder if missing (``nodes/samples.py``). Importing is cheap: no model or torch work happens
here.
"""

import importlib.util
import os
import sys

_PACK_FOLDER = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("keyface") is None:
    sys.path.append(_PACK_FOLDER)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint  # noqa: E402 (the pack folder goes on sys.path first)
from .nodes.samples import install_into_comfyui  # noqa: E402

install_into_comfyui()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "comfy_entrypoint"]
