"""pyproject.toml is ready for the Comfy Registry (docs.comfy.org/registry/specifications), and every install hint
in the code and docs names something that exists: an extra of this distribution, or exactly an extra's packages.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from keyface.evaluate.plot import MATPLOTLIB_HINT  # noqa: E402
from keyface.face import DETECTOR_INSTALL_HINT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
NAME = PROJECT["name"]
EXTRAS = PROJECT["optional-dependencies"]
# The Registry's rules for a node id: under 100 characters; letters, digits, '-', '_', '.'; starting with a
# letter; no two special characters in a row.
NODE_ID = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")
ICON_TYPES = (".svg", ".png", ".jpg", ".jpeg", ".gif")
ICON_MAX_SIZE = (800, 400)  # the Registry's largest icon, width x height
HINT_FOLDERS = ("keyface", "nodes", "scripts", "web", "docs", "workflows", ".ci")
HINT_SUFFIXES = {".py", ".md", ".sh", ".js", ".txt", ""}
# `pip install <target>[extra,...]`, the target this distribution's name or a path to it ('.', a folder)
EXTRA_HINT = re.compile(r"pip install (?:-\w+ )*(?:-e )?[\"']?([\w./-]*)\[([\w,-]+)\][\"']?")


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def hint_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "__init__.py", ROOT / "requirements.txt"]
    for folder in HINT_FOLDERS:
        files += [path for path in (ROOT / folder).rglob("*") if path.is_file() and path.suffix in HINT_SUFFIXES]
    return [path for path in files if "node_modules" not in path.parts]


def test_registry_node_id_follows_the_naming_rules():
    assert NODE_ID.fullmatch(NAME) and len(NAME) < 100, NAME
    assert "comfyui" not in NAME.lower(), f"the Registry asks for names without 'ComfyUI': {NAME}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]


def test_registry_fields_are_filled():
    assert PROJECT["urls"]["Repository"].startswith("https://github.com/")
    assert PROJECT["description"] and PROJECT["license"]
    assert COMFY["PublisherId"] and COMFY["DisplayName"]
    assert COMFY["requires-comfyui"].startswith(">=")
    assert {path.rstrip("/") for path in COMFY["includes"]} >= {"web", "workflows"}
    for path in COMFY["includes"]:
        assert (ROOT / path).is_dir(), f"includes names {path}, which is not a folder of the repository"


def test_registry_icon_is_a_url_to_a_file_of_this_repository():
    """The Registry takes the icon as a URL; ours is the raw GitHub address of ``docs/icon.png``."""
    from PIL import Image

    repository = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    icon = COMFY["Icon"]
    assert icon.startswith(prefix) and icon.lower().endswith(ICON_TYPES), icon
    path = ROOT / icon.removeprefix(prefix)
    assert path.is_file(), f"{path} (python scripts/make_thumbnails.py)"
    with Image.open(path) as image:
        image.load()
        assert image.width <= ICON_MAX_SIZE[0] and image.height <= ICON_MAX_SIZE[1], image.size


def test_every_extras_hint_names_an_extra_of_this_distribution():
    hints = []
    for path in hint_files():
        for target, extras in EXTRA_HINT.findall(path.read_text(errors="replace")):
            where = f"{path.relative_to(ROOT)}: pip install {target}[{extras}]"
            hints.append(where)
            looks_like_path = target.startswith((".", "/")) or target == ""
            assert looks_like_path or target.lower() == NAME.lower(), f"{where} does not name {NAME}"
            unknown = set(extras.split(",")) - set(EXTRAS)
            assert not unknown, f"{where}: no extra {sorted(unknown)} (extras: {sorted(EXTRAS)})"
    assert hints, "no install hint with extras found: the scan looks in the wrong places"


def test_package_hints_name_exactly_the_extras_packages():
    """The error messages that say which packages to install list the packages of the matching extra."""
    face = {requirement_name(requirement) for requirement in EXTRAS["face"]}
    assert set(DETECTOR_INSTALL_HINT.removeprefix("pip install ").split()) == face
    assert set(MATPLOTLIB_HINT.removeprefix("pip install ").split()) == {
        requirement_name(requirement) for requirement in EXTRAS["eval"]
    }


def test_requirements_txt_lists_the_runtime_dependencies():
    """requirements.txt (what a hand install into ComfyUI reads) has every runtime dependency of pyproject."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    listed = {requirement_name(line) for line in lines if line.strip() and not line.startswith("#")}
    assert {requirement_name(requirement) for requirement in PROJECT["dependencies"]} <= listed


def test_library_version_is_the_distribution_version():
    import keyface

    assert keyface.__version__ == PROJECT["version"]
