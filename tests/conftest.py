"""Shared test setup: where the golden fixture sets and the test media are found.

Fixture sets (outputs of the original KeyFace code on tiny random weights) are discovered, never named:
every folder holding a ``config.json`` directly under ``<repo>/../shared/fixtures/`` and under each
directory listed in ``KEYFACE_FIXTURES`` (``os.pathsep``-separated; an entry may also be a set folder
itself). A test that takes the ``fixture_set`` argument runs once per set, with the set's folder name in
its test ID; with no set found it is skipped with a message saying where sets are looked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# Idle OpenMP threads sleep instead of spinning: with torch's default (active) policy, a 2-core machine that is
# also running anything else makes small CPU ops tens of times slower. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest

# ComfyUI's V3 API (comfy_api) is not installable: outside ComfyUI the nodes run on the stand-in in tests/standins/
if importlib.util.find_spec("comfy_api") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "standins"))

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE_ROOT = REPO_ROOT.parent / "shared" / "fixtures"
DEFAULT_MEDIA_ROOT = REPO_ROOT.parent / "shared" / "media"


def _is_fixture_set(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format", "").startswith("keyface-fixture-config")
    except (OSError, ValueError):
        return False


def fixture_search_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("KEYFACE_FIXTURES", "").split(os.pathsep) if p.strip()]
    return roots + [DEFAULT_FIXTURE_ROOT]


def discover_fixture_sets() -> list[Path]:
    found: dict[Path, None] = {}
    for root in fixture_search_roots():
        if not root.is_dir():
            continue
        candidates = [root] if _is_fixture_set(root) else sorted(p for p in root.iterdir() if p.is_dir())
        for folder in candidates:
            if _is_fixture_set(folder):
                found[folder.resolve()] = None
    return list(found)


FIXTURE_SETS = discover_fixture_sets()
NO_FIXTURES_MESSAGE = (
    "no KeyFace fixture set found; looked in "
    + ", ".join(str(p) for p in fixture_search_roots())
    + " (set KEYFACE_FIXTURES to a folder of fixture sets)"
)


def pytest_generate_tests(metafunc):
    if "fixture_set" in metafunc.fixturenames:
        if FIXTURE_SETS:
            metafunc.parametrize("fixture_set", FIXTURE_SETS, ids=[p.name for p in FIXTURE_SETS])
        else:
            metafunc.parametrize(
                "fixture_set",
                [pytest.param(None, marks=pytest.mark.skip(reason=NO_FIXTURES_MESSAGE))],
                ids=["no-fixtures"],
            )


@pytest.fixture(scope="session")
def portrait_path(tmp_path_factory) -> Path:
    """A real portrait photo (NASA's public-domain astronaut): the shared media copy, else scikit-image's."""
    shared = Path(os.environ.get("KEYFACE_MEDIA", DEFAULT_MEDIA_ROOT)) / "portrait_astronaut.png"
    if shared.is_file():
        return shared
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the sample portrait")
    from PIL import Image

    path = tmp_path_factory.mktemp("media") / "portrait_astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_keyface_cache(tmp_path_factory):
    """Feature cache and job folders of the whole test session go to a temporary folder, not ~/.cache."""
    previous = os.environ.get("KEYFACE_CACHE_DIR")
    os.environ["KEYFACE_CACHE_DIR"] = str(tmp_path_factory.mktemp("keyface-cache"))
    yield
    if previous is None:
        os.environ.pop("KEYFACE_CACHE_DIR", None)
    else:
        os.environ["KEYFACE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def demo_models(isolated_keyface_cache) -> Path:
    """A complete models folder of tiny random-weight networks (the demo's, in the release layout), written once
    per test session into the session's KeyFace cache. Tests that need working models but no golden numbers use
    it, so they run without any fixture set."""
    from keyface.demo import default_demo_folder, write_demo_weights

    return write_demo_weights(default_demo_folder())


@pytest.fixture(scope="session")
def node_pack():
    """The repository imported as ComfyUI imports a custom-node pack (:func:`helpers.load_node_pack`)."""
    from helpers import load_node_pack

    return load_node_pack()
