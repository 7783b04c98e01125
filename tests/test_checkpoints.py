"""Checkpoint reading, key mapping, config inference and the errors a user sees for bad files."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keyface.checkpoints import (
    AUDIO_PROJECTION_KEY,
    CONFIG_METADATA_KEY,
    DECODER_PREFIX,
    LEARNED_MASK_KEY,
    UNET_PREFIX,
    convert_any,
    convert_checkpoint,
    decoder_key,
    infer_stage_config,
    load_autoguidance_network,
    load_frame_decoder,
    load_identity_encoder,
    load_interpolation_model,
    load_keyframe_model,
    official_key_names,
    official_state_dict,
    read_checkpoint,
    read_stage_config,
    save_stage_checkpoint,
    unet_key,
)
from keyface.config import StageConfig
from keyface.errors import CheckpointError, InputError, MissingWeightsError
from keyface.models.stages import InterpolationModel, InterpolationNetwork, KeyframeModel
from keyface.models.vae import FrameDecoder

STAGE_FILES = ("keyframe", "interpolation", "interpolation_bad")


def checkpoint_path(fixture_set: Path, name: str, suffix: str = ".pt") -> Path:
    return fixture_set / "checkpoints" / f"{name}{suffix}"


def fixture_config(fixture_set: Path, kind: str) -> StageConfig:
    return StageConfig.from_fixture_config(fixture_set / "config.json", kind)


def copy_alone(fixture_set: Path, name: str, suffix: str, folder: Path) -> Path:
    """A checkpoint copied where no config JSON can be found."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}{suffix}"
    shutil.copyfile(checkpoint_path(fixture_set, name, suffix), target)
    return target


# ---- key mapping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original, expected",
    [
        ("time_embed.0.weight", "time_embedding.linear_1.weight"),
        ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("out.2.weight", "conv_out.weight"),
        ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight"),
        (
            "input_blocks.5.0.time_stack.emb_layers.1.bias",
            "down_blocks.1.resnets.1.temporal_res_block.time_emb_proj.bias",
        ),
        (
            "input_blocks.7.1.time_stack.0.attn2.to_k.weight",
            "down_blocks.2.attentions.0.temporal_transformer_blocks.0.attn2.to_k.weight",
        ),
        ("input_blocks.8.1.time_pos_embed.2.weight", "down_blocks.2.attentions.1.time_pos_embed.linear_2.weight"),
        (
            "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        ),
        ("middle_block.2.time_mixer.mix_factor", "mid_block.resnets.1.time_mixer.mix_factor"),
        ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
        ("output_blocks.9.1.proj_in.weight", "up_blocks.3.attentions.0.proj_in.weight"),
        ("output_blocks.11.0.in_layers.0.weight", "up_blocks.3.resnets.2.spatial_res_block.norm1.weight"),
    ],
)
def test_official_unet_keys_map_as_in_the_spec(original, expected):
    assert unet_key(original, layers_per_block=2) == expected


@pytest.mark.parametrize(
    "original, expected",
    [
        ("norm_out.weight", "conv_norm_out.weight"),
        ("conv_out.time_mix_conv.weight", "time_conv_out.weight"),
        ("conv_out.bias", "conv_out.bias"),
        ("mid.block_2.time_stack.out_layers.3.weight", "mid_block.resnets.1.temporal_res_block.conv2.weight"),
        ("mid.attn_1.proj_out.weight", "mid_block.attentions.0.to_out.0.weight"),
        ("up.0.block.1.nin_shortcut.bias", "up_blocks.3.resnets.1.spatial_res_block.conv_shortcut.bias"),
        ("up.3.upsample.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("up.2.block.0.mix_factor", "up_blocks.1.resnets.0.time_mixer.mix_factor"),
    ],
)
def test_official_decoder_keys_map_as_in_the_spec(original, expected):
    assert decoder_key(original, num_levels=4) == expected


def test_unknown_keys_are_refused_by_the_mapping():
    for key in ("input_blocks.3.1.norm.weight", "output_blocks.0.3.conv.weight", "foo.bar"):
        with pytest.raises(KeyError):
            unet_key(key, layers_per_block=2)


# ---- reading and configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGE_FILES)
def test_pt_and_safetensors_hold_identical_tensors(fixture_set, name):
    from_pt = read_checkpoint(checkpoint_path(fixture_set, name, ".pt")).tensors
    from_safetensors = read_checkpoint(checkpoint_path(fixture_set, name, ".safetensors")).tensors
    assert from_pt.keys() == from_safetensors.keys()
    assert all(torch.equal(from_pt[key], from_safetensors[key]) for key in from_pt)
    assert not any(key.startswith("_forward_module.") for key in from_pt)


@pytest.mark.parametrize(
    "name, kind", [("keyframe", "keyframe"), ("interpolation", "interpolation"), ("interpolation_bad", "interpolation")]
)
def test_config_from_shapes_equals_the_fixture_config(fixture_set, name, kind):
    expected = fixture_config(fixture_set, kind)
    assert read_stage_config(checkpoint_path(fixture_set, name)) == expected
    assert read_stage_config(checkpoint_path(fixture_set, name, ".safetensors")) == expected
    # shapes alone (head width, frames and the keyframe latent size from the fallback)
    fallback = replace(
        StageConfig.official(kind).with_head_channels(expected.unet.num_head_channels), latent_size=expected.latent_size
    )
    shapes = read_checkpoint(checkpoint_path(fixture_set, name, ".safetensors")).shapes()
    assert infer_stage_config(shapes, fallback=fallback) == expected


def test_loaded_weights_are_upcast_float32_copies_of_the_file(fixture_set):
    path = checkpoint_path(fixture_set, "keyframe", ".safetensors")
    tensors = read_checkpoint(path).tensors
    model = load_keyframe_model(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    original = tensors["model.diffusion_model.input_blocks.0.0.weight"]
    assert original.dtype == torch.float16
    assert torch.equal(model.unet.conv_in.weight, original.float())
    assert torch.equal(
        model.audio_projection.linear.bias, next(v for k, v in tensors.items() if k.endswith("linear.bias")).float()
    )


def test_autoguidance_network_takes_only_unet_and_learned_mask(fixture_set):
    path = checkpoint_path(fixture_set, "interpolation_bad", ".safetensors")
    network = load_autoguidance_network(path)
    assert not hasattr(network, "audio_projection")
    assert torch.equal(network.learned_mask, read_checkpoint(path).tensors["model.learned_mask"].float())


def test_identity_encoder_loads_from_folder_and_single_file(fixture_set):
    folder = fixture_set / "checkpoints" / "vae"
    single = next(folder.glob("*.safetensors"))
    a, b = load_identity_encoder(folder), load_identity_encoder(single)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_head_width_comes_from_a_json_next_to_the_file(fixture_set, tmp_path):
    path = copy_alone(fixture_set, "interpolation", ".safetensors", tmp_path / "a" / "b")
    with pytest.raises(CheckpointError, match="config JSON") as error:
        load_interpolation_model(path)
    assert str(path) in str(error.value)
    path.with_suffix(".json").write_text(fixture_config(fixture_set, "interpolation").to_json())
    assert load_interpolation_model(path).config == fixture_config(fixture_set, "interpolation")


def test_converted_file_carries_its_config(fixture_set, tmp_path, capsys):
    target = tmp_path / "alone" / "deeper" / "keyframe.safetensors"
    target.parent.mkdir(parents=True)
    config = convert_checkpoint(checkpoint_path(fixture_set, "keyframe"), target)
    assert config == fixture_config(fixture_set, "keyframe")
    with safe_open(target, framework="pt") as handle:
        assert StageConfig.from_json(handle.metadata()[CONFIG_METADATA_KEY]) == config
    assert not list(target.parent.glob("*.partial"))
    assert capsys.readouterr().err == ""  # the safe loader sufficed: no pickle warning
    converted = load_keyframe_model(target)
    original = load_keyframe_model(checkpoint_path(fixture_set, "keyframe"))
    pairs = zip(converted.state_dict().values(), original.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_pickled_objects_are_refused_and_conversion_is_the_way_out(fixture_set, tmp_path, capsys):
    tensors = read_checkpoint(checkpoint_path(fixture_set, "keyframe")).tensors
    module = {"_forward_module." + key: value for key, value in tensors.items()}
    unsafe = tmp_path / "alone" / "x" / "keyframe.pt"
    unsafe.parent.mkdir(parents=True)
    torch.save({"module": module, "args": argparse.Namespace(lr=1.0)}, unsafe)
    with pytest.raises(CheckpointError, match="python -m keyface convert") as error:
        load_keyframe_model(unsafe, config=fixture_config(fixture_set, "keyframe"))
    assert str(unsafe) in str(error.value)
    target = unsafe.with_name("converted.safetensors")
    unsafe.with_suffix(".json").write_text(fixture_config(fixture_set, "keyframe").to_json())
    convert_checkpoint(unsafe, target)
    assert "unpickling it in full" in capsys.readouterr().err
    assert load_keyframe_model(target).config == fixture_config(fixture_set, "keyframe")


def test_extra_top_level_entries_and_ckpt_and_bin_layouts_are_accepted(fixture_set, tmp_path):
    tensors = read_checkpoint(checkpoint_path(fixture_set, "interpolation")).tensors
    config = fixture_config(fixture_set, "interpolation")
    pt = tmp_path / "interpolation.pt"
    module = {"_forward_module." + key: value for key, value in tensors.items()}
    torch.save({"module": module, "global_steps": 7, "dp_world_size": 1}, pt)
    ckpt = tmp_path / "interpolation.ckpt"
    torch.save({"state_dict": tensors, "epoch": 3}, ckpt)
    flat = tmp_path / "interpolation.bin"
    torch.save(tensors, flat)
    for path in (pt, ckpt, flat):
        assert load_interpolation_model(path, config=config).config == config


# ---- errors ----------------------------------------------------------------------------------------------------


def test_missing_files_name_the_file_and_where_it_comes_from(tmp_path):
    missing = tmp_path / "keyframe.pt"
    with pytest.raises(MissingWeightsError, match="toninio19/keyface") as error:
        load_keyframe_model(missing)
    assert str(missing) in str(error.value)
    with pytest.raises(MissingWeightsError, match="stable-video-diffusion-img2vid"):
        load_identity_encoder(tmp_path / "vae")
    (tmp_path / "empty_vae").mkdir()
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model"):
        load_identity_encoder(tmp_path / "empty_vae")


@pytest.mark.parametrize(
    "name, content",
    [("weights.txt", b"hello"), ("weights.pt", b"not a checkpoint at all"), ("weights.safetensors", b"\x00" * 64)],
)
def test_wrong_file_types_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_keyframe_model(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files_are_refused(fixture_set, tmp_path, suffix):
    data = checkpoint_path(fixture_set, "keyframe", suffix).read_bytes()
    path = tmp_path / f"keyframe{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_keyframe_model(path)
    assert str(path) in str(error.value)


def test_a_non_stage_file_is_refused(fixture_set):
    path = next((fixture_set / "checkpoints" / "vae").glob("*.safetensors"))
    with pytest.raises(CheckpointError, match="no KeyFace stage network"):
        load_keyframe_model(path)
    with pytest.raises(CheckpointError, match="no VAE decoder"):
        load_frame_decoder(path)


def test_the_other_stage_is_refused(fixture_set):
    keyframe, interpolation = checkpoint_path(fixture_set, "keyframe"), checkpoint_path(fixture_set, "interpolation")
    with pytest.raises(CheckpointError, match="holds the keyframe stage") as error:
        load_interpolation_model(keyframe)
    assert str(keyframe) in str(error.value)
    with pytest.raises(CheckpointError, match="holds the keyframe stage"):
        load_autoguidance_network(keyframe)
    with pytest.raises(CheckpointError, match="holds the interpolation stage"):
        load_keyframe_model(interpolation)


def test_size_mismatch_with_an_explicit_config(fixture_set):
    path = checkpoint_path(fixture_set, "keyframe")
    config = fixture_config(fixture_set, "keyframe")
    wider = replace(config, unet=replace(config.unet, context_dim=config.unet.context_dim * 2))
    with pytest.raises(CheckpointError, match="size mismatch.*context_dim") as error:
        load_keyframe_model(path, config=wider)
    assert str(path) in str(error.value)
    widths = tuple(3 * w for w in config.unet.block_out_channels)  # other widths, other head width
    other = replace(config, unet=replace(config.unet, block_out_channels=widths, num_head_channels=widths[0]))
    with pytest.raises(CheckpointError, match="size mismatch.*block_out_channels"):
        load_keyframe_model(path, config=other)
    with pytest.raises(CheckpointError, match="describes the interpolation stage"):
        load_keyframe_model(path, config=fixture_config(fixture_set, "interpolation"))


def test_missing_and_unexpected_tensors_are_reported(fixture_set, tmp_path, caplog):
    tensors = read_checkpoint(checkpoint_path(fixture_set, "keyframe")).tensors
    config = fixture_config(fixture_set, "keyframe")
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith("time_mixer.mix_factor")}, missing)
    with pytest.raises(CheckpointError, match="missing tensors") as error:
        load_keyframe_model(missing, config=config)
    assert str(missing) in str(error.value)
    unexpected = tmp_path / "unexpected.safetensors"
    save_file({**tensors, "model.diffusion_model.extra_block.weight": torch.ones(2)}, unexpected)
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra_block"):
        load_keyframe_model(unexpected, config=config)
    ignored = tmp_path / "ignored.safetensors"
    extras = {"model_ema.decay": torch.ones(1), "first_stage_model.encoder.conv_in.weight": torch.ones(2)}
    save_file({**tensors, **extras}, ignored)
    with caplog.at_level("WARNING", logger="keyface.checkpoints"):
        load_keyframe_model(ignored, config=config)
    assert not caplog.records  # known unused tensors are skipped silently
    foreign = tmp_path / "foreign.safetensors"
    save_file({**tensors, "loss_fn.lpips.scale": torch.ones(3)}, foreign)
    with caplog.at_level("WARNING", logger="keyface.checkpoints"):
        load_keyframe_model(foreign, config=config)
    assert "loss_fn.lpips.scale" in caplog.text  # tensors outside the networks: ignored with a warning


# ---- writing checkpoints: the inverse key mapping ------------------------------------------------------------

# docs/checkpoints.md#key-layout: 1,428 UNet tensors per stage, 266 VAE decoder tensors.
OFFICIAL_UNET_TENSORS = 1428
OFFICIAL_DECODER_TENSORS = 266


def _loader_name(original: str, config: StageConfig) -> str:
    """The loaders' forward map, spelled out with the public key functions."""
    if original.startswith(UNET_PREFIX):
        return "unet." + unet_key(original[len(UNET_PREFIX) :], config.unet.layers_per_block)
    if original.startswith(DECODER_PREFIX):
        return "decoder." + decoder_key(original[len(DECODER_PREFIX) :], len(config.decoder.block_out_channels))
    if original == LEARNED_MASK_KEY:
        return "learned_mask"
    match = AUDIO_PROJECTION_KEY.fullmatch(original)
    assert match is not None, original
    return f"audio_projection.linear.{match.group(2)}"


@pytest.mark.parametrize(
    "kind, module_class, audio_keys",
    [
        ("keyframe", KeyframeModel, {"conditioner.embedders.3.linear.weight", "conditioner.embedders.3.linear.bias"}),
        (
            "interpolation",
            InterpolationModel,
            {"conditioner.embedders.1.linear.weight", "conditioner.embedders.1.linear.bias", "model.learned_mask"},
        ),
        ("interpolation", InterpolationNetwork, {"model.learned_mask"}),
    ],
)
def test_official_names_invert_the_loader_mapping_at_full_size(kind, module_class, audio_keys):
    config = StageConfig.official(kind)
    with torch.device("meta"):
        model, decoder = module_class(config), FrameDecoder(config.decoder)
    names = official_key_names(model, decoder)
    ours = set(model.state_dict()) | set(decoder.state_dict())
    assert set(names) == ours
    assert len(set(names.values())) == len(names)
    assert all(_loader_name(original, config) == key for key, original in names.items())
    originals = set(names.values())
    assert sum(name.startswith(UNET_PREFIX) for name in originals) == OFFICIAL_UNET_TENSORS
    assert sum(name.startswith(DECODER_PREFIX) for name in originals) == OFFICIAL_DECODER_TENSORS
    assert originals - {n for n in originals if n.startswith((UNET_PREFIX, DECODER_PREFIX))} == audio_keys
    state = official_state_dict(model, decoder)  # meta tensors: shapes only
    attention_conv = DECODER_PREFIX + "mid.attn_1.q.weight"
    assert state[attention_conv].shape == (*decoder.decoder.mid_block.attentions[0].to_q.weight.shape, 1, 1)


@pytest.mark.parametrize(
    "name, loader, with_decoder",
    [
        ("keyframe", load_keyframe_model, True),
        ("interpolation", load_interpolation_model, True),
        ("interpolation_bad", load_autoguidance_network, False),
    ],
)
def test_official_state_dict_reproduces_the_fixture_files(fixture_set, name, loader, with_decoder):
    path = checkpoint_path(fixture_set, name, ".safetensors")
    original = read_checkpoint(path).tensors
    model = loader(path)
    state = official_state_dict(model, load_frame_decoder(path) if with_decoder else None)
    if not with_decoder:  # the bad network keeps only its UNet and learned mask
        original = {k: v for k, v in original.items() if k.startswith(UNET_PREFIX) or k == LEARNED_MASK_KEY}
    assert state.keys() == original.keys()
    assert all(state[k].shape == original[k].shape and torch.equal(state[k], original[k].float()) for k in state)


def _random_stage(kind: str, module_class, seed: int):
    from keyface.demo import TINY, randomise_

    return randomise_(module_class(TINY.stage_config(kind)), seed)


@pytest.mark.parametrize(
    "kind, module_class, loader",
    [
        ("keyframe", KeyframeModel, load_keyframe_model),
        ("interpolation", InterpolationModel, load_interpolation_model),
        ("interpolation", InterpolationNetwork, load_autoguidance_network),
    ],
)
def test_saved_stage_checkpoint_loads_back_identically_without_a_config_file(tmp_path, kind, module_class, loader):
    from keyface.demo import TINY, randomise_

    model = _random_stage(kind, module_class, seed=1)
    decoder = randomise_(FrameDecoder(TINY.decoder_config()), 2)
    path = save_stage_checkpoint(tmp_path / "stage.safetensors", model, decoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.safetensors"]  # nothing else: no JSON, no partial
    # 16 channels per head cannot be read from shapes (the fallback is 64): the stored config is what makes it load
    assert model.config.unet.num_head_channels != StageConfig.official(kind).unet.num_head_channels
    loaded = loader(path)
    assert loaded.config == model.config
    for saved_module, loaded_module in ((model, loaded), (decoder, load_frame_decoder(path))):
        saved, read_back = saved_module.state_dict(), loaded_module.state_dict()
        assert read_back.keys() == saved.keys()
        assert all(torch.equal(read_back[k], v) for k, v in saved.items())
    with safe_open(path, framework="pt") as handle:
        assert StageConfig.from_json(handle.metadata()[CONFIG_METADATA_KEY]) == model.config


def test_save_stage_checkpoint_checks_its_arguments(tmp_path):
    from keyface.demo import TINY

    model = _random_stage("keyframe", KeyframeModel, seed=1)
    with pytest.raises(InputError, match=r"\.safetensors"):
        save_stage_checkpoint(tmp_path / "stage.pt", model)
    with pytest.raises(InputError, match="does not exist"):
        save_stage_checkpoint(tmp_path / "missing" / "stage.safetensors", model)
    other = FrameDecoder(replace(TINY.decoder_config(), layers_per_block=1))
    with pytest.raises(InputError, match="decoder"):
        save_stage_checkpoint(tmp_path / "stage.safetensors", model, other)
    assert not list(tmp_path.iterdir())


def test_convert_any_refuses_what_it_cannot_convert(tmp_path):
    tensors_only = tmp_path / "tensors.pt"
    torch.save({"weight": torch.ones(2)}, tensors_only)
    with pytest.raises(CheckpointError, match="neither a KeyFace stage checkpoint.*nor an original unilm") as error:
        convert_any(tensors_only, tmp_path / "out.safetensors")
    assert str(tensors_only) in str(error.value)
    other_unilm = tmp_path / "hubert.pt"
    torch.save({"cfg": {"label_rate": 50}, "model": {"weight": torch.ones(2)}}, other_unilm)
    with pytest.raises(CheckpointError, match="neither WavLM nor BEATs"):
        convert_any(other_unilm, tmp_path / "out.safetensors")
    with pytest.raises(InputError, match="is a folder"):
        convert_any(tmp_path, tmp_path / "out.safetensors")
    with pytest.raises(InputError, match=r"must end in \.safetensors"):
        convert_any(tensors_only, tmp_path / "out.pt")
    assert not list(tmp_path.glob("out*"))
