"""See the whole pipeline run without any download: tiny random-weight models and generated inputs.

``python -m keyface demo`` (:func:`run_demo`) writes a complete models folder of tiny networks with random
weights (:func:`write_demo_weights`, a few MB, in every layout :mod:`keyface.loading` reads), draws a
portrait and synthesises speech-like audio (:func:`write_demo_inputs`), then runs
:func:`keyface.generate.generate_video` on them: audio features, keyframes, interpolation, decoding and the
mp4 with the audio, in about a minute on a laptop CPU. The picture is noise, because the weights are random;
it shows the machinery, not the model. Tests, benchmarks and workflows use the same folder, so they need no
fixture set.

Sizes are those of the golden fixture set ``keyface-tiny-v1`` (docs/models.md#tiny-sizes), all in :class:`TinySizes`.
Weights follow the fixture set's recipe so that activations stay O(1) and the output is visible noise, not a constant
(see :func:`randomise_`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import VAE_SCALE_FACTOR, DecoderConfig, StageConfig, UNetConfig
from .errors import InputError

DEMO_WEIGHTS_FAMILY = "keyface-demo-weights"  # any version: a demo set, which a newer one may replace
DEMO_WEIGHTS_FORMAT = f"{DEMO_WEIGHTS_FAMILY}-v2"
DEMO_WEIGHTS_FOLDER = "demo-weights"  # under keyface.paths.default_cache_root()
MARKER_FILE = "keyface_demo.json"  # written last: a folder holding it with the same content is complete

# The demo's speech: 16 kHz mono, as the encoders want it (docs/audio.md#frames-and-sub-frames).
DEMO_SAMPLE_RATE = 16_000
DEMO_AUDIO_PEAK = 0.5

# Structure (not sizes) of the released audio encoders (fixture config.json `audio_encoders`, the public
# WavLM Base+ / BEATs iter3+ / wav2vec2-base-960h releases): a conv stack of (kernel, stride) with a 320-sample
# hop, a 128-tap positional convolution and 320 relative-position buckets up to distance 800.
CONV_STACK = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2
POSITIONAL_CONV_TAPS = 128
RELATIVE_POSITION_BUCKETS = 320
RELATIVE_POSITION_MAX_DISTANCE = 800
BEATS_PATCH = 16

# Weight recipe of the fixture set (its README, "Random weights"): conv / linear weights N(0,1)/sqrt(fan_in),
# norm scales 1 + 0.1 N, biases 0.05 N, learned mixes and masks N(0,1), attention gates 1 + 0.3 N, relative
# position tables 0.5 N, weight-norm magnitudes such that the effective weight is N(0,1)/sqrt(fan_in) x (1 + 0.1 N).
NORM_SCALE_SPREAD = 0.1
BIAS_SPREAD = 0.05
GATE_SPREAD = 0.3
POSITION_TABLE_SPREAD = 0.5
STANDARD_NORMAL_NAMES = ("mix_factor", "learned_mask", "mask_emb", "masked_spec_embed")
GATE_NAMES = ("grep_a", "gru_rel_pos_const")
POSITION_TABLE_NAMES = ("relative_attention_bias", "rel_attn_embed")
WEIGHT_NORM_PAIRS = (("weight_g", "weight_v"), ("original0", "original1"))  # (magnitude, direction)


@dataclass(frozen=True)
class TinySizes:
    """Every size of the demo networks: those of the fixture set ``keyface-tiny-v1`` (docs/models.md#tiny-sizes)."""

    unet_widths: tuple[int, ...] = (32, 64)
    unet_res_blocks: int = 1
    head_channels: int = 16
    context_dim: int = 32
    emotion_dim: int = 8  # sinusoidal embedding width of each of valence and arousal
    image_size: int = 64
    latent_channels: int = 4
    vae_width: int = 32
    vae_levels: int = 4
    vae_res_blocks: int = 2
    encoder_dim: int = 12  # output width of each audio encoder: stage features are 12 + 12 wide
    encoder_layers: int = 2
    encoder_ffn_dim: int = 24
    encoder_heads: int = 2
    encoder_conv_dim: int = 32
    encoder_pos_conv_groups: int = 4
    beats_patch_dim: int = 16

    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig(
            block_out_channels=(self.vae_width,) * self.vae_levels,
            layers_per_block=self.vae_res_blocks,
            latent_channels=self.latent_channels,
        )

    def stage_config(self, kind: str) -> StageConfig:
        decoder = self.decoder_config()
        keyframe = kind == "keyframe"
        unet = UNetConfig(
            in_channels=2 * self.latent_channels + (0 if keyframe else 1),
            out_channels=self.latent_channels,
            block_out_channels=self.unet_widths,
            attention_per_level=(True,) * len(self.unet_widths),
            layers_per_block=self.unet_res_blocks,
            num_head_channels=self.head_channels,
            context_dim=self.context_dim,
            emotion_embedding_dim=self.emotion_dim if keyframe else 0,
        )
        return StageConfig(
            kind=kind,
            unet=unet,
            audio_feature_dim=2 * self.encoder_dim,  # [WavLM | BEATs] or [wav2vec2 | BEATs]
            latent_channels=self.latent_channels,
            latent_size=self.image_size // decoder.downsample_factor,
            decoder=decoder,
        )

    def vae_config(self) -> dict:
        """Arguments of diffusers ``AutoencoderKLTemporalDecoder`` (the SVD VAE layout)."""
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * self.vae_levels,
            "block_out_channels": (self.vae_width,) * self.vae_levels,
            "layers_per_block": self.vae_res_blocks,
            "latent_channels": self.latent_channels,
            "sample_size": self.image_size,
            "scaling_factor": VAE_SCALE_FACTOR,
        }

    def _transformer_cfg(self) -> dict:
        return {
            "encoder_layers": self.encoder_layers,
            "encoder_embed_dim": self.encoder_dim,
            "encoder_ffn_embed_dim": self.encoder_ffn_dim,
            "encoder_attention_heads": self.encoder_heads,
            "activation_fn": "gelu",
            "layer_norm_first": False,
            "conv_bias": False,
            "conv_pos": POSITIONAL_CONV_TAPS,
            "conv_pos_groups": self.encoder_pos_conv_groups,
            "relative_position_embedding": True,
            "num_buckets": RELATIVE_POSITION_BUCKETS,
            "max_distance": RELATIVE_POSITION_MAX_DISTANCE,
            "gru_rel_pos": True,
        }

    def wavlm_cfg(self) -> dict:
        """A unilm WavLM ``cfg`` (Base+ structure, tiny widths)."""
        layers = " + ".join(f"[({self.encoder_conv_dim},{k},{s})]" for k, s in CONV_STACK)
        return {
            **self._transformer_cfg(),
            "extractor_mode": "default",
            "conv_feature_layers": layers,
            "normalize": False,
        }

    def beats_cfg(self) -> dict:
        """A unilm BEATs ``cfg`` (iter3+ structure, tiny widths)."""
        return {
            **self._transformer_cfg(),
            "input_patch_size": BEATS_PATCH,
            "embed_dim": self.beats_patch_dim,
            "deep_norm": True,
        }

    def wav2vec2_config(self) -> dict:
        """A transformers ``Wav2Vec2Config`` (wav2vec2-base-960h structure, tiny widths)."""
        return {
            "hidden_size": self.encoder_dim,
            "num_hidden_layers": self.encoder_layers,
            "num_attention_heads": self.encoder_heads,
            "intermediate_size": self.encoder_ffn_dim,
            "conv_dim": [self.encoder_conv_dim] * len(CONV_STACK),
            "conv_kernel": [kernel for kernel, _ in CONV_STACK],
            "conv_stride": [stride for _, stride in CONV_STACK],
            "conv_bias": False,
            "feat_extract_norm": "group",
            "do_stable_layer_norm": False,
            "num_conv_pos_embeddings": POSITIONAL_CONV_TAPS,
            "num_conv_pos_embedding_groups": self.encoder_pos_conv_groups,
        }


TINY = TinySizes()


# ---------------------------------------------------------------------------------------------------------
# random weights


def _file_seed(seed: int, name: str) -> int:
    """One generator seed per weight file, from the demo seed and the file's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def randomise_(module, seed: int):
    """Overwrite every parameter of ``module`` with the fixture set's recipe (see the module constants), in
    sorted-name order from one generator seeded with ``seed``; returns ``module``.

    Weight-normalised convolutions get a magnitude of ``|direction| x (1 + 0.1 N)``, so that the effective
    weight is scaled like any other conv.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    parameters = dict(module.named_parameters())

    def normal(shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    magnitudes = {}
    with torch.no_grad():
        for name in sorted(parameters):
            parameter, leaf = parameters[name], name.rsplit(".", 1)[-1]
            shape = parameter.shape
            pair = next(((m, d) for m, d in WEIGHT_NORM_PAIRS if leaf == m), None)
            if pair is not None:
                magnitudes[name] = name[: -len(pair[0])] + pair[1]
                continue
            if leaf in STANDARD_NORMAL_NAMES:
                value = normal(shape)
            elif leaf in GATE_NAMES:
                value = 1 + GATE_SPREAD * normal(shape)
            elif any(part in POSITION_TABLE_NAMES for part in name.split(".")):
                value = POSITION_TABLE_SPREAD * normal(shape)
            elif leaf == "bias":
                value = BIAS_SPREAD * normal(shape)
            elif parameter.ndim == 1:
                value = 1 + NORM_SCALE_SPREAD * normal(shape)
            else:
                value = normal(shape) / math.sqrt(parameter[0].numel())  # fan_in = inputs x kernel size
            parameter.copy_(value)
        for name, direction_name in magnitudes.items():
            magnitude, direction = parameters[name], parameters[direction_name]
            dims = [d for d in range(direction.ndim) if magnitude.shape[d] == 1]
            norm = direction.norm(dim=dims, keepdim=True)
            magnitude.copy_(norm * (1 + NORM_SCALE_SPREAD * normal(magnitude.shape)))
    return module


# ---------------------------------------------------------------------------------------------------------
# the demo models folder


def _write_stage_files(folder: Path, seed: int) -> None:
    """The three engine checkpoints and the VAE folder (whose unused decoder is the interpolation checkpoint's, as
    in the fixture set)."""
    from diffusers import AutoencoderKLTemporalDecoder

    from .checkpoints import save_stage_checkpoint
    from .loading import STAGE_FILE_STEMS, VAE_FOLDER
    from .models.stages import InterpolationModel, InterpolationNetwork, KeyframeModel
    from .models.vae import FrameDecoder

    roles = (
        ("keyframe", KeyframeModel, "keyframe", True),
        ("interpolation", InterpolationModel, "interpolation", True),
        ("autoguidance", InterpolationNetwork, "interpolation", False),  # the "bad" network: UNet + mask only
    )
    decoders = {}
    for role, module_class, kind, with_decoder in roles:
        name = STAGE_FILE_STEMS[role] + ".safetensors"
        model = randomise_(module_class(TINY.stage_config(kind)), _file_seed(seed, name))
        if with_decoder:
            decoders[role] = randomise_(FrameDecoder(TINY.decoder_config()), _file_seed(seed, name + ":decoder"))
        save_stage_checkpoint(folder / name, model, decoders.get(role))
    vae = randomise_(AutoencoderKLTemporalDecoder(**TINY.vae_config()), _file_seed(seed, VAE_FOLDER))
    vae.decoder.load_state_dict(decoders["interpolation"].decoder.state_dict())
    vae.save_pretrained(folder / VAE_FOLDER)


def _write_audio_encoders(folder: Path, seed: int) -> None:
    """The audio encoders under their release names, so that shipped workflows run on the demo set unchanged:
    ``WavLM-Base+.pt`` and the BEATs ``.pt`` as original unilm ``{'cfg', 'model'}`` files (which the loaders read
    with ``weights_only=True``), wav2vec2 as the Hugging Face folder."""
    from transformers.utils import logging as transformers_logging

    from .audio.beats import BEATsConfig, BEATsModel, beats_state_dict_to_unilm
    from .audio.wav2vec2 import build_wav2vec2
    from .audio.wavlm import build_wavlm, wavlm_state_dict_to_unilm
    from .audio.weights import BEATS_FILE, WAV2VEC2_FOLDER, WAVLM_FILE, save_unilm_checkpoint

    folder.mkdir()
    wavlm = randomise_(build_wavlm(TINY.wavlm_cfg()).module, _file_seed(seed, WAVLM_FILE))
    save_unilm_checkpoint(
        folder / WAVLM_FILE, TINY.wavlm_cfg(), wavlm_state_dict_to_unilm(wavlm.state_dict(), TINY.wavlm_cfg())
    )
    config = BEATsConfig.from_cfg(TINY.beats_cfg())
    beats = randomise_(BEATsModel(config), _file_seed(seed, BEATS_FILE))
    save_unilm_checkpoint(folder / BEATS_FILE, TINY.beats_cfg(), beats_state_dict_to_unilm(beats.state_dict(), config))
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar for a tiny file
    try:
        wav2vec2 = build_wav2vec2(TINY.wav2vec2_config()).module
        randomise_(wav2vec2, _file_seed(seed, WAV2VEC2_FOLDER)).save_pretrained(folder / WAV2VEC2_FOLDER)
    finally:
        if bars_enabled:
            transformers_logging.enable_progress_bar()


def _marker(seed: int) -> dict:
    """What identifies a demo set, as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps({"format": DEMO_WEIGHTS_FORMAT, "seed": seed, "sizes": asdict(TINY)}))


def _read_marker(folder: Path) -> dict | None:
    """The marker of a demo set of any version (an older one is replaced, never refused), else None."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    is_demo = isinstance(marker, dict) and str(marker.get("format", "")).startswith(DEMO_WEIGHTS_FAMILY)
    return marker if is_demo else None


def _is_complete(folder: Path, seed: int) -> bool:
    marker = _read_marker(folder)
    if marker is None or {key: marker.get(key) for key in _marker(seed)} != _marker(seed):
        return False
    return all((folder / name).is_file() for name in marker.get("files", ()))


def check_demo_folder(folder: Path) -> None:
    """Refuse a folder the demo must not overwrite: anything but nothing, an empty folder or a demo set."""
    if folder.exists() and not (folder.is_dir() and (_read_marker(folder) or not any(folder.iterdir()))):
        raise InputError(
            f"demo models folder {folder} already exists and is not a KeyFace demo weights folder (no {MARKER_FILE}); "
            "the demo writes its random weights into a folder of its own: give a new or empty folder"
        )


def write_demo_weights(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete KeyFace models folder of tiny random-weight networks; returns the folder.

    Layout (what :func:`keyface.loading.find_model_files` and :meth:`AudioFeatureExtractor.from_folder` read):
    ``keyframe.safetensors``, ``interpolation.safetensors``, ``interpolation_bad.safetensors`` (original key
    names, StageConfig in the metadata), ``vae/`` (diffusers ``AutoencoderKLTemporalDecoder``), ``audio/``
    (``WavLM-Base+.pt`` and the BEATs ``.pt`` in the unilm release layout, the ``wav2vec2-base-960h/`` folder).

    Idempotent: a complete set of the same seed (and sizes) is left as it is. Atomic: the set is written into a
    temporary folder next to ``folder`` and renamed into place at the end. An existing ``folder`` is replaced only
    when it is empty or an older demo set; anything else raises :class:`~keyface.errors.InputError`.
    """
    folder = Path(folder).expanduser().absolute()
    if _is_complete(folder, seed):
        return folder
    check_demo_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    temporary.chmod(0o755)  # mkdtemp makes it private; the renamed folder is an ordinary models folder
    try:
        from .loading import AUDIO_FOLDER

        _write_stage_files(temporary, seed)
        _write_audio_encoders(temporary / AUDIO_FOLDER, seed)
        files = sorted(str(path.relative_to(temporary)) for path in temporary.rglob("*") if path.is_file())
        (temporary / MARKER_FILE).write_text(json.dumps({**_marker(seed), "files": files}, indent=1))
        _move_into_place(temporary, folder, seed)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _move_into_place(temporary: Path, folder: Path, seed: int) -> None:
    """Rename ``temporary`` to ``folder``; an old demo set there is moved aside first and then deleted. When
    another process completed the same set meanwhile, that one stays."""
    if folder.exists():
        if _is_complete(folder, seed):
            return
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(folder, old)
        try:
            os.rename(temporary, folder)
        except OSError:
            os.rename(old, folder)  # the old set stays where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(temporary, folder)
    except OSError:
        if not _is_complete(folder, seed):
            raise


# ---------------------------------------------------------------------------------------------------------
# inputs: a drawn portrait and speech-like audio


def draw_portrait(side: int) -> np.ndarray:
    """A simple drawn face (hair, ears, eyes, brows, nose, mouth, shoulders) on a gradient: uint8 (side, side, 3)."""
    from PIL import Image, ImageDraw

    scale = 2  # drawn at twice the size, then downsampled: smooth edges
    size = side * scale
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (1 - rows) * np.array([96, 128, 168]) + rows * np.array([40, 56, 88])
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def box(x0, y0, x1, y1):  # fractions of the side -> pixels
        return [round(v * size) for v in (x0, y0, x1, y1)]

    skin, hair, dark = (226, 184, 150), (70, 44, 30), (40, 30, 30)
    draw.ellipse(box(0.12, 0.82, 0.88, 1.25), fill=(60, 90, 120))  # shoulders
    draw.rectangle(box(0.42, 0.66, 0.58, 0.88), fill=(206, 164, 130))  # neck
    draw.ellipse(box(0.25, 0.14, 0.75, 0.56), fill=hair)  # hair behind the head
    draw.ellipse(box(0.24, 0.38, 0.32, 0.52), fill=skin)  # ears
    draw.ellipse(box(0.68, 0.38, 0.76, 0.52), fill=skin)
    draw.ellipse(box(0.29, 0.2, 0.71, 0.74), fill=skin)  # face
    draw.chord(box(0.28, 0.16, 0.72, 0.44), 180, 360, fill=hair)  # fringe
    for x in (0.37, 0.55):
        draw.ellipse(box(x, 0.42, x + 0.08, 0.47), fill=(245, 245, 245))  # eyes
        draw.ellipse(box(x + 0.025, 0.425, x + 0.055, 0.465), fill=(60, 90, 60))
        draw.line(box(x - 0.01, 0.39, x + 0.09, 0.385), fill=hair, width=round(0.012 * size))  # brows
    nose = [(round(x * size), round(y * size)) for x, y in ((0.5, 0.47), (0.48, 0.57), (0.52, 0.575))]
    draw.line(nose, fill=(190, 140, 110), width=round(0.01 * size), joint="curve")
    draw.chord(box(0.42, 0.6, 0.58, 0.67), 0, 180, fill=(170, 60, 70))  # mouth
    draw.line(box(0.42, 0.635, 0.58, 0.635), fill=dark, width=round(0.006 * size))
    return np.asarray(image.resize((side, side), Image.Resampling.LANCZOS))


def speech_like_waveform(seconds: float, sample_rate: int = DEMO_SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Synthetic speech-like audio: float32 ``(samples,)`` peaking at 0.5.

    Phrases of 3-7 syllables (0.12-0.3 s each, Hann envelopes, a short noise burst at each onset like a
    consonant) separated by pauses of 0.2-0.6 s; voiced by a harmonic tone whose pitch falls over each phrase
    (150 -> 110 Hz, small vibrato), shaped by two vowel formants that change from syllable to syllable.
    Generated one second at a time, so long clips cost little memory beyond the result.
    """
    rng = np.random.default_rng(seed)
    total = max(1, round(seconds * sample_rate))
    starts, lengths, formants, phrases = [], [], [], []  # per syllable; phrases: (start, length) of its phrase
    position = round(0.15 * sample_rate)
    while position < total:
        phrase = (rng.uniform(0.12, 0.3, int(rng.integers(3, 8))) * sample_rate).astype(int)
        phrase_span = (position, int(phrase.sum()))
        for length in phrase:
            starts.append(position)
            lengths.append(int(length))
            formants.append((rng.uniform(300, 800), rng.uniform(900, 2300)))
            phrases.append(phrase_span)
            position += int(length)
        position += int(rng.uniform(0.2, 0.6) * sample_rate)
    starts_array = np.asarray(starts, dtype=np.int64)
    harmonics = np.arange(1, 26)[:, None]
    out = np.zeros(total, np.float32)
    phase = 0.0
    for first in range(0, total, sample_rate):
        last = min(first + sample_rate, total)
        t = np.arange(first, last)
        envelope, burst = np.zeros(t.shape), np.zeros(t.shape)
        pitch, formant1, formant2 = np.full(t.shape, 130.0), np.full(t.shape, 500.0), np.full(t.shape, 1500.0)
        for k in range(max(0, np.searchsorted(starts_array, first, "right") - 1), np.searchsorted(starts_array, last)):
            low, high = max(starts[k], first) - first, min(starts[k] + lengths[k], last) - first
            if high <= low:
                continue
            local = (t[low:high] - starts[k]) / lengths[k]
            envelope[low:high] = np.sin(np.pi * local) ** 2
            burst[low:high] = np.exp(-local * lengths[k] / (0.015 * sample_rate))  # ~15 ms consonant noise
            progress = (t[low:high] - phrases[k][0]) / phrases[k][1]
            pitch[low:high] = 150 - 40 * progress + 4 * np.sin(2 * np.pi * 5 * t[low:high] / sample_rate)
            formant1[low:high], formant2[low:high] = formants[k]
        phases = phase + 2 * np.pi * np.cumsum(pitch) / sample_rate
        phase = float(phases[-1])
        frequencies = harmonics * pitch[None]
        gains = (
            np.exp(-(((frequencies - formant1) / 150) ** 2))
            + 0.6 * np.exp(-(((frequencies - formant2) / 200) ** 2))
            + 0.05
        ) / harmonics
        voiced = (gains * np.sin(harmonics * phases[None])).sum(axis=0)
        out[first:last] = envelope * voiced + 0.3 * burst * rng.standard_normal(t.shape[0])
    peak = float(np.abs(out).max())
    return (out * (DEMO_AUDIO_PEAK / peak) if peak > 0 else out).astype(np.float32)


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float waveform ``(samples,)`` in [-1, 1] as 16-bit PCM WAV."""
    path = Path(path)
    pcm = (np.clip(waveform, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(pcm.tobytes())
    return path


def check_seconds(seconds: float, name: str = "--seconds") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{name} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def write_demo_inputs(folder: str | os.PathLike, seconds: float = 3.0) -> tuple[Path, Path]:
    """Write ``portrait.png`` (a drawn face, as large as the identity crop so that it is not enlarged) and
    ``speech.wav`` (speech-like, 16 kHz mono, ``seconds`` long) into ``folder``; returns their paths."""
    from .constants import RELEASED_IMAGE_SIZE
    from .media import write_image

    seconds = check_seconds(seconds)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = write_image(folder / "portrait.png", draw_portrait(RELEASED_IMAGE_SIZE))
    audio = write_wav(folder / "speech.wav", speech_like_waveform(seconds), DEMO_SAMPLE_RATE)
    return image, audio


# ---------------------------------------------------------------------------------------------------------
# python -m keyface demo


def default_demo_folder() -> Path:
    from .paths import default_cache_root

    return default_cache_root() / DEMO_WEIGHTS_FOLDER


def run_demo(out: str | os.PathLike, seconds: float = 3.0, models_folder: str | os.PathLike | None = None) -> Path:
    """``python -m keyface demo``: tiny random weights + generated portrait and speech -> ``out`` (mp4).

    The weights go to ``models_folder`` (default: ``demo-weights`` in the KeyFace cache, written once), the
    inputs to a temporary folder. Prints where everything is and why the result is noise; returns ``out``.
    """
    from .checkpoints import KEYFACE_WEIGHTS_SOURCE
    from .generate import GenerationRequest, generate_video
    from .progress import terminal_progress_bar

    seconds = check_seconds(seconds)
    models = Path(models_folder).expanduser() if models_folder is not None else default_demo_folder()
    check_demo_folder(models)
    print(
        f"KeyFace demo: tiny random-weight models in {models} (written once), a drawn portrait and "
        f"{seconds:g} s of synthetic speech",
        flush=True,
    )
    write_demo_weights(models)
    with tempfile.TemporaryDirectory(prefix="keyface-demo-") as inputs:
        image, audio = write_demo_inputs(inputs, seconds)
        request = GenerationRequest(
            image, audio, Path(out), models, emotion=f"neutral at 0 s, happy at {seconds / 2:g} s"
        )
        with terminal_progress_bar() as on_event:
            path = generate_video(request, progress=on_event)
    print(
        f"wrote {path} ({seconds:g} s, {TINY.image_size}x{TINY.image_size} pixels, with the audio).\n"
        "The picture is noise: the demo's networks are tiny and their weights random. It shows the pipeline "
        "running end to end (audio features, keyframes, interpolation, decoding, mp4), not a talking head.\n"
        f"For real videos get the weights listed in README.md, section 'Weights' ({KEYFACE_WEIGHTS_SOURCE}: "
        "keyframe.pt, interpolation.pt, interpolation_bad.pt; the SVD VAE; the WavLM, BEATs and wav2vec2 "
        "audio encoders; python -m keyface download --models <folder> fetches them) and run: python -m keyface "
        "generate --image face.png --audio talk.wav --out talk.mp4 --models <folder>"
    )
    return path


def install_demo_weights(folder: str | os.PathLike | None = None) -> Path:
    """``python -m keyface demo --weights-only``: write the tiny random-weight models folder (e.g. into
    ``ComfyUI/models/keyface`` to try the example workflows) and say what it is; returns the folder."""
    folder = Path(folder).expanduser() if folder is not None else default_demo_folder()
    check_demo_folder(folder)
    write_demo_weights(folder)
    print(
        f"wrote the KeyFace demo weights to {folder}: tiny networks ({TINY.image_size}x{TINY.image_size} pixels) "
        "with random weights, in the release layout. Every workflow and command runs on them, and every video "
        "they make is noise. Replace the folder's contents with the real weights (README.md, 'Weights') for "
        "real videos."
    )
    return folder
