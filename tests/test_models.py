"""KeyFace networks: configs, UNet, conditioning, denoisers and VAE against the original's golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import assert_close, stage_file, stage_models

from keyface.checkpoints import (
    load_frame_decoder,
    load_identity_encoder,
    load_keyframe_model,
)
from keyface.config import StageConfig, UNetConfig
from keyface.errors import InputError
from keyface.models.conditioning import interpolation_frames
from keyface.models.stages import VScalings
from keyface.models.unet import RESBLOCK_GROUPNORM_EPS, KeyFaceUNet
from keyface.models.vae import preprocess_image, to_pixels


def keyframe_conditioning(fixture_set: Path):
    keyframe = stage_models(fixture_set, ".pt")[0]
    inputs = stage_file(fixture_set, "kf_conditioner")
    return keyframe.condition(
        inputs["in_cond_frames"], inputs["in_audio_emb"], inputs["in_valence"], inputs["in_arousal"]
    )


def interpolation_conditioning(fixture_set: Path):
    interpolation = stage_models(fixture_set, ".pt")[1]
    inputs = stage_file(fixture_set, "it_conditioner")
    pairs = inputs["in_cond_frames"]
    return interpolation.condition(pairs[:, :, 0], pairs[:, :, 1], inputs["in_audio_emb"])


# ---- configs ---------------------------------------------------------------------------------------------------


def test_official_unet_config_gives_the_spec_diffusers_layout():
    kwargs = StageConfig.official("keyframe").unet.diffusers_kwargs()
    assert kwargs["num_attention_heads"] == (5, 10, 20, 20)
    assert kwargs["down_block_types"] == ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    assert kwargs["up_block_types"] == ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    assert kwargs["projection_class_embeddings_input_dim"] == 1536
    interpolation = StageConfig.official("interpolation").unet.diffusers_kwargs()
    assert interpolation["projection_class_embeddings_input_dim"] == 1024


@pytest.mark.parametrize("kind, parameters", [("keyframe", 1525.61e6), ("interpolation", 1524.95e6)])
def test_official_unet_has_the_original_parameter_count(kind, parameters):
    with torch.device("meta"):
        unet = KeyFaceUNet.from_unet_config(StageConfig.official(kind).unet)
    state = unet.state_dict()
    assert len(state) == 1428  # docs/models.md#unet: 1 428 tensors, bijective with the original
    assert round(sum(t.numel() for t in state.values()) / 1e4) * 1e4 == pytest.approx(parameters)


def test_stage_config_json_round_trip():
    config = StageConfig.official("interpolation")
    assert StageConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["format"] == "keyface-stage-config-v1"


def test_fixture_config_is_read_for_both_stages(fixture_set):
    data = json.loads((fixture_set / "config.json").read_text())
    for kind in ("keyframe", "interpolation"):
        config = StageConfig.from_fixture_config(fixture_set / "config.json", kind)
        assert config.unet.in_channels == data["unet"][kind]["in_channels"]
        assert config.unet.label_dim == data["unet"][kind]["label_emb_in_channels"]
        assert config.unet.num_attention_heads[: len(data["unet"]["common"]["heads_per_level"])] == tuple(
            data["unet"]["common"]["heads_per_level"]
        )
        assert config.image_size == data["image_size"]


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(InputError, match="num_head_channels"):
        UNetConfig(block_out_channels=(48, 96), attention_per_level=(True, True), num_head_channels=64)
    with pytest.raises(InputError, match="in_channels"):
        StageConfig(kind="interpolation", unet=UNetConfig(in_channels=8, emotion_embedding_dim=0))


def test_every_resblock_groupnorm_uses_the_original_eps():
    config = UNetConfig(
        block_out_channels=(32, 64),
        attention_per_level=(True, False),
        layers_per_block=1,
        num_head_channels=16,
        context_dim=32,
        emotion_embedding_dim=8,
    )
    with torch.device("meta"):
        # through diffusers' own config machinery, as from_pretrained would build it
        unet = KeyFaceUNet.from_config(KeyFaceUNet.from_unet_config(config).config)
    norms = {name: m.eps for name, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    resblock_norms = [eps for name, eps in norms.items() if "resnets" in name]
    attention_norms = [eps for name, eps in norms.items() if "attentions" in name]
    assert resblock_norms and all(eps == RESBLOCK_GROUPNORM_EPS for eps in resblock_norms)
    assert attention_norms and all(eps == 1e-6 for eps in attention_norms)


# ---- conditioning ----------------------------------------------------------------------------------------------


def test_keyframe_conditioner_matches_fixture(fixture_set):
    expected = stage_file(fixture_set, "kf_conditioner")
    cond = keyframe_conditioning(fixture_set)
    assert_close("kf c_concat", cond.identity, expected["c_concat"])
    assert_close("kf c_vector", cond.emotion, expected["c_vector"])
    assert_close("kf c_crossattn", cond.audio_tokens, expected["c_crossattn"])
    uncond = cond.unconditional()
    assert_close("kf uc_concat", uncond.identity, expected["uc_concat"])
    assert_close("kf uc_vector", uncond.emotion, expected["uc_vector"])
    assert_close("kf uc_crossattn", uncond.audio_tokens, expected["uc_crossattn"])


def test_interpolation_conditioner_matches_fixture(fixture_set):
    expected = stage_file(fixture_set, "it_conditioner")
    cond = interpolation_conditioning(fixture_set)
    assert_close("it c_concat", cond.keyframes, expected["c_concat"])
    assert_close("it c_crossattn", cond.audio_tokens, expected["c_crossattn"])
    uncond = cond.unconditional()
    assert_close("it uc_concat", uncond.keyframes, expected["uc_concat"])
    assert_close("it uc_crossattn", uncond.audio_tokens, expected["uc_crossattn"])


def test_interpolation_frames_layout():
    start, end = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), 2.0)
    mask = torch.full((3, 4, 4), 5.0)
    frames = interpolation_frames(torch.cat([start, end], dim=1), mask, frames=6).unflatten(0, (2, 6))
    assert frames.shape == (2, 6, 4, 4, 4)
    assert (frames[:, 0, :3] == 1).all() and (frames[:, -1, :3] == 2).all() and (frames[:, 1:-1, :3] == 5).all()
    assert (frames[:, [0, -1], 3] == 1).all() and (frames[:, 1:-1, 3] == 0).all()


# ---- UNet and denoisers ----------------------------------------------------------------------------------------


def test_keyframe_unet_forward_matches_fixture(fixture_set):
    keyframe = stage_models(fixture_set, ".pt")[0]
    data = stage_file(fixture_set, "kf_unet_forward")
    labels = []
    hook = keyframe.unet.add_embedding.register_forward_pre_hook(lambda _, args: labels.append(args[0]))
    try:
        with torch.no_grad():
            out = keyframe.unet(data["x"][None], data["timesteps"], data["context"], emotion_embedding=data["y"])
    finally:
        hook.remove()
    assert_close("kf label_emb input", labels[0], data["label_emb_input"])
    assert_close("kf unet out", out[0], data["out"])


def test_interpolation_unet_forward_matches_fixture(fixture_set):
    _, interpolation, bad = stage_models(fixture_set, ".pt")
    data = stage_file(fixture_set, "it_unet_forward")
    segments = data["context"].shape[0]
    with torch.no_grad():
        out = interpolation.unet(data["x"].unflatten(0, (segments, -1)), data["timesteps"], data["context"])
        bad_out = bad.unet(data["bad_x"].unflatten(0, (segments, -1)), data["timesteps"], data["context"])
    assert_close("it unet out", out.flatten(0, 1), data["out"])
    assert_close("it bad unet out", bad_out.flatten(0, 1), data["bad_out"])


def test_unet_requires_emotion_exactly_when_it_has_an_emotion_input(fixture_set):
    keyframe, interpolation, _ = stage_models(fixture_set, ".pt")
    data = stage_file(fixture_set, "kf_unet_forward")
    with pytest.raises(InputError, match="emotion_embedding"):
        keyframe.unet(data["x"][None], data["timesteps"], data["context"])
    with pytest.raises(InputError, match="emotion_embedding"):
        interpolation.unet(data["x"][None], data["timesteps"], data["context"], data["y"])


def assert_scalings(prefix: str, data: dict[str, torch.Tensor]):
    scalings = VScalings.from_sigma(data["sigma"])
    for name in ("c_skip", "c_out", "c_in", "c_noise"):
        assert_close(f"{prefix} {name}", getattr(scalings, name), data[name])


def test_keyframe_denoiser_matches_fixture(fixture_set):
    keyframe = stage_models(fixture_set, ".pt")[0]
    data = stage_file(fixture_set, "kf_denoiser")
    assert_scalings("kf", data)
    with torch.no_grad():
        denoised = keyframe.denoise(data["x"], data["sigma"], keyframe_conditioning(fixture_set))
    assert_close("kf denoised", denoised, data["denoised"])


def test_interpolation_denoisers_match_fixture(fixture_set):
    _, interpolation, bad = stage_models(fixture_set, ".pt")
    data = stage_file(fixture_set, "it_denoiser")
    assert_scalings("it", data)
    cond = interpolation_conditioning(fixture_set)
    with torch.no_grad():
        assert_close("it denoised good", interpolation.denoise(data["x"], data["sigma"], cond), data["denoised_good"])
        assert_close("it denoised bad", bad.denoise(data["x"], data["sigma"], cond), data["denoised_bad"])


def test_half_precision_weights_give_float32_close_to_fp32(fixture_set):
    keyframe = stage_models(fixture_set, ".pt")[0]
    half = load_keyframe_model(fixture_set / "checkpoints" / "keyframe.safetensors", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    data = stage_file(fixture_set, "kf_denoiser")
    cond = keyframe_conditioning(fixture_set)
    with torch.no_grad():
        reference = keyframe.denoise(data["x"], data["sigma"], cond)
        approx = half.denoise(data["x"], data["sigma"], cond)
    assert approx.dtype == torch.float32
    error = (approx - reference).abs().max().item() / reference.abs().max().item()
    print(f"bf16 keyframe denoiser: max error relative to output range {error:.2e}")
    assert 0 < error < 0.05


# ---- VAE -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, checkpoint", [("kf", "keyframe.pt"), ("it", "interpolation.pt")])
def test_frame_decoder_matches_fixture(fixture_set, prefix, checkpoint):
    decoder = load_frame_decoder(fixture_set / "checkpoints" / checkpoint)
    data = stage_file(fixture_set, f"{prefix}_vae_decode")
    with torch.no_grad():
        decoded = decoder.decode(data["z"])
    assert_close(f"{prefix} vae decoded", decoded, data["decoded"])
    pixels = to_pixels(decoded)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.min() < pixels.max()
    assert_close(f"{prefix} pixels", pixels, ((data["decoded"] + 1) / 2).clamp(0, 1))


def test_identity_encoder_matches_fixture(fixture_set):
    encoder = load_identity_encoder(fixture_set / "checkpoints" / "vae")
    data = stage_file(fixture_set, "vae_encode")
    size = data["vae_input"].shape[-1]
    pixels = preprocess_image(data["image_uint8"].numpy(), size)
    assert_close("vae input", pixels, data["vae_input"])
    with torch.no_grad():
        posterior = encoder.posterior(pixels)
        assert_close("posterior mean", posterior.mean, data["posterior_mean"])
        assert_close("posterior logvar", posterior.logvar, data["posterior_logvar"])
        assert_close("posterior std", posterior.std, data["posterior_std"])
        sampled = encoder.encode(pixels, noise=data["eps"])
        mean = encoder.encode(pixels)
    assert_close("identity latent (posterior sample)", sampled, data["latents"])
    assert_close("identity latent (posterior mean)", mean, data["posterior_mean"] * 0.18215)


def test_preprocess_accepts_float_images_and_rejects_bad_shapes(fixture_set):
    image = stage_file(fixture_set, "vae_encode")["image_uint8"]
    as_float = preprocess_image(image.float() / 255.0, 16)
    assert_close("float vs uint8 preprocessing", as_float, preprocess_image(image, 16), 1e-5)
    with pytest.raises(InputError, match="identity image"):
        preprocess_image(image.permute(2, 0, 1), 16)
