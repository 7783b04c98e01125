"""The frozen node interface: every node's ID, inputs (name, type, default, order) and outputs.

Saved workflows store widget values by position and links by input name, so any change here can break the
workflows users have saved. A deliberate change is recorded by rewriting the snapshot::

    KEYFACE_UPDATE_INTERFACE=1 python -m pytest tests/test_node_interface.py

and then reviewed in the diff of ``tests/snapshots/node_interface.json``: new inputs go at the end (optional),
nothing is renamed, reordered or removed. An input's type may only widen: to a multi-type (``"IMAGE,VIDEO"``,
``io.MultiType``) that still contains the recorded one, so every link a saved workflow holds stays valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_nodes import NODES

SNAPSHOT = Path(__file__).parent / "snapshots" / "node_interface.json"
UPDATE_ENV = "KEYFACE_UPDATE_INTERFACE"


def _input_entry(name: str, spec: tuple) -> dict:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    # A combo's choices list the user's files (models, inputs): only that it is a combo is part of the interface.
    entry = {"name": name, "type": "COMBO" if isinstance(kind, (list, tuple)) else kind}
    if "default" in options:
        entry["default"] = options["default"]
    for bound in ("min", "max"):
        if bound in options:
            entry[bound] = options[bound]
    return entry


def node_interface(node_class: type) -> dict:
    """What a saved workflow depends on: inputs per section in declaration order, and the outputs."""
    declared = node_class.INPUT_TYPES()
    return {
        "inputs": {
            section: [_input_entry(name, spec) for name, spec in declared[section].items()]
            for section in ("required", "optional", "hidden")
            if declared.get(section)
        },
        "outputs": list(node_class.RETURN_TYPES),
        "output_names": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
        "function": node_class.FUNCTION,
        "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
    }


def current_interface() -> dict:
    return {node_id: node_interface(NODES[node_id]) for node_id in sorted(NODES)}


def test_node_interface_matches_the_snapshot():
    interface = current_interface()
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.write_text(json.dumps(interface, indent=1) + "\n")
    recorded = json.loads(SNAPSHOT.read_text())
    changed = sorted(
        node_id for node_id in set(recorded) | set(interface) if recorded.get(node_id) != interface.get(node_id)
    )
    assert not changed, (
        f"the interface of {', '.join(changed)} changed; saved workflows depend on it. If the change is deliberate "
        f"(inputs appended at the end, nothing renamed or reordered), record it with {UPDATE_ENV}=1 and review the diff"
    )


def type_kept(recorded: str, now: str) -> bool:
    """True when an input of type ``recorded`` may now have type ``now``: the same, or a comma-joined multi-type
    holding every recorded type (what 0.3.64's executor accepts for a link of the recorded type)."""
    return recorded == now or set(recorded.split(",")) <= set(now.split(","))


def test_an_input_type_may_only_widen():
    assert type_kept("IMAGE", "IMAGE") and type_kept("IMAGE", "IMAGE,VIDEO") and type_kept("IMAGE", "VIDEO,IMAGE")
    assert type_kept("IMAGE,VIDEO", "IMAGE,VIDEO,MASK")
    assert not type_kept("IMAGE", "VIDEO")  # another type
    assert not type_kept("IMAGE,VIDEO", "IMAGE")  # narrowed: a saved VIDEO link would break
    assert not type_kept("IMAGE", "IMAGES")  # not a prefix test
    assert not type_kept("INT", "FLOAT") and not type_kept("COMBO", "STRING")


def test_recorded_inputs_only_grow_at_the_end():
    """Against the snapshot: an existing node keeps every recorded input, in the recorded place, with its
    recorded type or a wider one (:func:`type_kept`)."""
    interface = current_interface()
    recorded = json.loads(SNAPSHOT.read_text())
    for node_id, before in recorded.items():
        assert node_id in interface, f"node {node_id} was removed; saved workflows name it"
        for section, inputs in before["inputs"].items():
            now = interface[node_id]["inputs"].get(section, [])
            names_before = [entry["name"] for entry in inputs]
            assert [entry["name"] for entry in now[: len(inputs)]] == names_before, (node_id, section)
            for entry_before, entry_now in zip(inputs, now):
                assert type_kept(entry_before["type"], entry_now["type"]), (node_id, entry_before, entry_now)
        assert interface[node_id]["outputs"][: len(before["outputs"])] == before["outputs"], node_id


def test_model_folders_are_registered_through_add_model_folder_path(monkeypatch, tmp_path):
    """The public ``folder_paths`` call (0.3.64's signature), never its internals; a path the user configured in
    extra_model_paths.yaml stays first."""
    import sys
    import types

    from test_nodes import host

    calls = []
    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(tmp_path / "models")
    fake.folder_names_and_paths = types.MappingProxyType({})  # read-only: editing it would raise

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        calls.append((folder_name, full_folder_path, is_default))

    fake.add_model_folder_path = add_model_folder_path
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    host._comfy.cache_clear()
    try:
        host.register_model_folders()
    finally:
        host._comfy.cache_clear()
    keyface_folder = tmp_path / "models" / "keyface"
    assert calls == [("keyface", str(keyface_folder), False), ("keyface_audio", str(keyface_folder / "audio"), False)]
