"""A small stand-in for ComfyUI's ``comfy_api`` package, for the tests only (ComfyUI is not installable here).

It mirrors the behaviour of ComfyUI 0.3.64's ``comfy_api.v0_0_2`` (= ``comfy_api.latest`` of that release) in the
parts the KeyFace nodes and tests use: the V3 node schema (``io``), the UI outputs (``ui``), ``ComfyExtension`` and
the core VIDEO type (``InputImpl.VideoFromFile`` / ``VideoFromComponents``). Written from the facts of that API, not
copied from it. ``tests/conftest.py`` puts the folder holding it on ``sys.path`` only when a real ``comfy_api`` is
not importable, so inside ComfyUI (or with its tree on the path) the real one is used.
"""
