"""``python -m keyface convert``: the one opt-in path that unpickles, and the loaders that must never do so."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from keyface.audio.beats import load_beats
from keyface.audio.wavlm import load_wavlm
from keyface.checkpoints import (
    convert_any,
    load_frame_decoder,
    load_identity_encoder,
    load_keyframe_model,
    read_checkpoint,
    read_stage_config,
    save_stage_checkpoint,
)
from keyface.demo import TinySizes, write_demo_weights
from keyface.errors import CheckpointError
from keyface.models.stages import KeyframeModel

REFUSED = "holds objects the safe loader refuses"


class TrainerState:
    """Stands for the optimizer / scheduler objects a DeepSpeed model-state file pickles next to the weights."""

    def __init__(self):
        self.step = 7


class Payload:
    """A pickle that creates a marker file when unpickled (what a malicious checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_weights(tmp_path_factory.mktemp("demo") / "models")


def _deepspeed_file(demo, path):
    """The demo keyframe weights as a DeepSpeed model-state file, with their config as a sidecar JSON."""
    tensors = read_checkpoint(demo / "keyframe.safetensors").tensors
    module = {"_forward_module." + key: tensor for key, tensor in tensors.items()}
    torch.save({"module": module, "some_state": TrainerState()}, path)
    path.with_suffix(".json").write_text(read_stage_config(demo / "keyframe.safetensors").to_json())
    return tensors


def test_convert_reads_a_deepspeed_file_with_refused_objects_after_a_warning(demo, tmp_path, capsys):
    source = tmp_path / "keyframe.pt"
    tensors = _deepspeed_file(demo, source)
    with pytest.raises(CheckpointError, match=REFUSED) as error:
        load_keyframe_model(source)
    assert "python -m keyface convert" in str(error.value) and str(source) in str(error.value)
    assert "download it again" not in str(error.value)
    target = tmp_path / "keyframe.safetensors"
    summary = convert_any(source, target)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("WARNING:") and REFUSED in warning[0]
    assert "keyframe stage" in summary
    written = load_file(target)
    assert written.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(written[key], tensor), key
    assert torch.equal(
        load_keyframe_model(target).unet.conv_in.weight,
        load_keyframe_model(demo / "keyframe.safetensors").unet.conv_in.weight,
    )


def test_a_malicious_pickle_runs_only_under_convert(demo, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "keyframe.pt"
    torch.save({"module": {}, "payload": Payload(marker)}, evil)
    loaders = (load_keyframe_model, load_frame_decoder, read_checkpoint, read_stage_config, load_wavlm, load_beats)
    for loader in loaders:
        with pytest.raises(CheckpointError, match=REFUSED) as error:
            loader(evil)
        assert "python -m keyface convert" in str(error.value), loader.__name__
        assert not marker.exists(), f"{loader.__name__} ran the pickle"
    with pytest.raises(CheckpointError):  # no tensors in it: nothing to convert, but it was unpickled
        convert_any(evil, tmp_path / "out.safetensors")
    assert REFUSED in capsys.readouterr().err
    assert marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("damage", ["text", "truncated"])
@pytest.mark.parametrize("name", ["WavLM-Base+.pt", "keyframe.safetensors", "vae", "keyframe.pt"])
def test_damaged_files_get_one_line_naming_them(demo, tmp_path, name, damage):
    if name == "keyframe.pt":
        original = tmp_path / "original.pt"
        tensors = _deepspeed_file(demo, original)
        torch.save({"_forward_module." + key: value for key, value in tensors.items()}, original)  # loadable .pt
    elif name == "vae":
        original = demo / "vae" / "diffusion_pytorch_model.safetensors"
    else:
        original = demo / "audio" / name if (demo / "audio" / name).exists() else next(demo.rglob(name))
    path = tmp_path / ("vae.safetensors" if name == "vae" else name)
    data = original.read_bytes()
    path.write_bytes(b"this is not a checkpoint\n" if damage == "text" else data[: len(data) // 2])
    loader = {"WavLM-Base+.pt": load_wavlm, "vae": load_identity_encoder}.get(name, load_keyframe_model)
    with pytest.raises(CheckpointError) as error:
        loader(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "download it again" in message and REFUSED not in message


def test_a_lone_checkpoint_warns_once_that_the_head_width_was_assumed(demo, tmp_path, caplog):
    sizes = TinySizes(unet_widths=(64, 64), head_channels=64)  # widths the official head width divides
    stored = save_stage_checkpoint(tmp_path / "stored.safetensors", KeyframeModel(sizes.stage_config("keyframe")))
    source = tmp_path / "keyframe.pt"
    torch.save({"module": {"_forward_module." + k: v for k, v in load_file(stored).items()}}, source)
    with caplog.at_level(logging.WARNING, logger="keyface"):
        model = load_keyframe_model(source)
    notes = [r.getMessage() for r in caplog.records if "official" in r.getMessage()]
    assert len(notes) == 1 and str(source.with_suffix(".json")) in notes[0] and "convert" in notes[0]
    assert model.config.unet.num_head_channels == 64
    target = tmp_path / "out.safetensors"
    assert "official 64 channels per head were assumed" in convert_any(source, target)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keyface"):
        assert load_keyframe_model(target).config == model.config  # the config stored by convert: no warning
    assert not [r for r in caplog.records if "official" in r.getMessage()]
