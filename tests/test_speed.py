"""keyface.models.speed: channels-last gives the same numbers up to float rounding; --compile wires
torch.compile onto every UNet and VAE piece (not run here: compiling takes minutes on a CPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import random_conditioning

from keyface.loading import find_model_files, load_models
from keyface.models.speed import apply_speed_options, speed_modules
from keyface.pipeline import GenerationSettings, TalkingHeadJob
from keyface.video import FrameListSink

FRAMES = 20


def decoded_frames(models, folder) -> np.ndarray:
    """The uint8 frames of a short job, ``(frames, H, W, 3)``."""
    job = TalkingHeadJob(models, random_conditioning(models, FRAMES), GenerationSettings(), job_folder=folder)
    sink = FrameListSink()
    job.run(sink)
    return sink.stack()


def test_speed_modules_are_every_unet_and_vae_piece(demo_models):
    models = load_models(find_model_files(demo_models))
    assert set(speed_modules(models)) == {
        "keyframe.unet",
        "interpolation.unet",
        "autoguidance.unet",
        "decoder.decoder",
        "keyframe_decoder.decoder",
        "identity_encoder.encoder",
    }


def test_channels_last_gives_the_same_frames(demo_models, tmp_path):
    plain = load_models(find_model_files(demo_models))
    fast = load_models(find_model_files(demo_models))
    apply_speed_options(fast, channels_last=True)
    convs = [m for module in speed_modules(fast).values() for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)  # 1x1 kernels are both; the 3x3 ones are not

    latents = torch.randn(3, *plain.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fast.decoder.decode(latents), plain.decoder.decode(latents), atol=1e-4, rtol=1e-4)
    reference, frames = decoded_frames(plain, tmp_path / "plain"), decoded_frames(fast, tmp_path / "fast")
    assert frames.shape == reference.shape and frames.shape[0] == FRAMES
    assert np.abs(frames.astype(int) - reference.astype(int)).max() <= 1  # uint8 frames: rounding at most


def test_compile_is_wired_lazily_onto_each_module(demo_models):
    models = load_models(find_model_files(demo_models))
    apply_speed_options(models, compile=True)
    for name, module in speed_modules(models).items():
        assert module._compiled_call_impl is not None, name  # nn.Module.compile: compiled at the first call


def test_compile_without_torch_compile_warns_once_and_changes_nothing(demo_models, monkeypatch, caplog):
    models = load_models(find_model_files(demo_models))
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="keyface.models.speed"):
        apply_speed_options(models, compile=True)
    assert [r.message for r in caplog.records].count(
        "torch.compile is not available with this Python / PyTorch; running without --compile"
    ) == 1
    assert all(module._compiled_call_impl is None for module in speed_modules(models).values())


@pytest.mark.parametrize("options", [{}, {"compile": False, "channels_last": False}])
def test_no_options_leave_the_models_as_loaded(demo_models, options):
    models = load_models(find_model_files(demo_models))
    before = {name: p.data_ptr() for name, p in models.keyframe.named_parameters()}
    apply_speed_options(models, **options)
    assert {name: p.data_ptr() for name, p in models.keyframe.named_parameters()} == before


def test_every_attention_uses_pytorch_sdpa(demo_models):
    """No materialised attention matrix: diffusers' SDPA processor in every UNet attention (spatial, temporal,
    audio cross-attention) and the VAE mid-block; wav2vec2 with transformers' "sdpa" implementation; WavLM and
    BEATs through keyface.audio.attention.blockwise_attention (SDPA per query block)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from keyface.audio import beats as beats_module
    from keyface.audio.attention import BlockwiseWavLMAttention
    from keyface.audio.features import AudioFeatureExtractor

    models = load_models(find_model_files(demo_models))
    for name, part in models.parts().items():
        processors = [type(m.processor) for m in part.modules() if isinstance(m, Attention)]
        assert processors and set(processors) == {AttnProcessor2_0}, name
    extractor = AudioFeatureExtractor.from_folder(demo_models / "audio", cache=None)
    wavlm, beats, wav2vec2 = (extractor.encoder(role).module for role in ("wavlm", "beats", "wav2vec2"))
    assert all(isinstance(layer.attention, BlockwiseWavLMAttention) for layer in wavlm.encoder.layers)
    assert any(isinstance(m, beats_module._Attention) for m in beats.modules())  # its only attention: blockwise
    assert wav2vec2.config._attn_implementation == "sdpa"
