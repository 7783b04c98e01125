"""Sizes and hyper-parameters of the KeyFace networks, as frozen dataclasses.

Every size used by the models lives here; nothing else in the library hard-codes a width. The defaults are
the official full-size configuration (docs/models.md). A configuration comes from one of:

* the defaults / :meth:`StageConfig.official` (the released KeyFace checkpoints);
* a fixture set's ``config.json`` (format ``keyface-fixture-config-v1``): :meth:`StageConfig.from_fixture_config`;
* our own JSON (format ``keyface-stage-config-v1``): :meth:`StageConfig.to_json` / :meth:`StageConfig.from_json`;
* a checkpoint's tensor shapes: :func:`keyface.checkpoints.read_stage_config` (this module imports no checkpoint code).

This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .constants import FRAMES_PER_CLIP
from .errors import InputError

StageKind = Literal["keyframe", "interpolation"]
STAGE_KINDS: tuple[str, ...] = ("keyframe", "interpolation")

# SVD VAE latent scale: sampler-space latent = VAE latent * 0.18215 (docs/models.md#latents, `scale_factor`).
VAE_SCALE_FACTOR = 0.18215

STAGE_CONFIG_FORMAT = "keyface-stage-config-v1"
FIXTURE_CONFIG_FORMAT_PREFIX = "keyface-fixture-config"


@dataclass(frozen=True)
class UNetConfig:
    """The spatio-temporal UNet of one stage (official sgm ``VideoUNet``, diffusers layout).

    ``block_out_channels[i]`` is the width of resolution level ``i``; ``attention_per_level[i]`` says whether
    that level's res blocks are followed by a spatio-temporal transformer (the middle block always has one).
    ``context_dim`` is the width of an audio token: the cross-attention context and the audio part of each
    frame's label vector. ``emotion_embedding_dim`` is the sinusoidal embedding width of each of valence and
    arousal (0 = no emotion input, interpolation stage). The label vector of a frame is
    ``[emb(valence) | emb(arousal) | audio token]`` of width ``2 * emotion_embedding_dim + context_dim``.
    """

    in_channels: int = 8
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_per_level: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    num_head_channels: int = 64
    context_dim: int = 1024
    emotion_embedding_dim: int = 256
    num_frames: int = FRAMES_PER_CLIP

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(w) for w in self.block_out_channels))
        object.__setattr__(self, "attention_per_level", tuple(bool(a) for a in self.attention_per_level))
        if len(self.attention_per_level) != len(self.block_out_channels):
            raise InputError(
                f"UNetConfig: attention_per_level has {len(self.attention_per_level)} entries but "
                f"block_out_channels has {len(self.block_out_channels)}; give one per resolution level"
            )
        for name in (
            "in_channels",
            "out_channels",
            "layers_per_block",
            "transformer_layers_per_block",
            "num_head_channels",
            "context_dim",
            "num_frames",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"UNetConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.emotion_embedding_dim < 0 or self.emotion_embedding_dim % 2:
            raise InputError(
                f"UNetConfig: emotion_embedding_dim must be an even number >= 0, got {self.emotion_embedding_dim}"
            )
        for width in self.attention_widths:
            if width % self.num_head_channels:
                raise InputError(
                    f"UNetConfig: attention width {width} is not divisible by num_head_channels "
                    f"{self.num_head_channels}"
                )

    @property
    def attention_widths(self) -> tuple[int, ...]:
        """Widths of every level with attention, plus the middle block (always attended)."""
        levels = [w for w, a in zip(self.block_out_channels, self.attention_per_level, strict=True) if a]
        return (*levels, self.block_out_channels[-1])

    @property
    def num_attention_heads(self) -> tuple[int, ...]:
        """Heads per level (width / num_head_channels); levels without attention get the same rule."""
        return tuple(max(1, w // self.num_head_channels) for w in self.block_out_channels)

    @property
    def label_dim(self) -> int:
        """Width of the per-frame label vector fed to ``label_emb`` (diffusers ``add_embedding``)."""
        return 2 * self.emotion_embedding_dim + self.context_dim

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding (4 x first block width, fixed by the SVD layout)."""
        return 4 * self.block_out_channels[0]

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of diffusers ``UNetSpatioTemporalConditionModel`` for this configuration."""
        down = tuple(
            "CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in self.attention_per_level
        )
        up = tuple(
            "CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
            for a in reversed(self.attention_per_level)
        )
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": self.block_out_channels,
            "addition_time_embed_dim": self.emotion_embedding_dim,
            "projection_class_embeddings_input_dim": self.label_dim,
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.context_dim,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "num_attention_heads": self.num_attention_heads,
            "num_frames": self.num_frames,
        }


@dataclass(frozen=True)
class _VAEPartConfig:
    """Sizes shared by the SVD VAE's encoder and decoder."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(w) for w in self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for the SVD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class DecoderConfig(_VAEPartConfig):
    """The SVD temporal VAE decoder (diffusers ``TemporalDecoder``) stored in each engine checkpoint
    (docs/models.md#vae)."""

    out_channels: int = 3


@dataclass(frozen=True)
class EncoderConfig(_VAEPartConfig):
    """The SVD VAE image encoder used offline for the identity latent (diffusers ``Encoder`` + ``quant_conv``)."""

    in_channels: int = 3


@dataclass(frozen=True)
class StageConfig:
    """One KeyFace stage: its UNet, audio projection, learned mask and VAE decoder sizes.

    ``latent_size`` is the latent height = width the stage works at (64 for 512x512 pixels); for the
    interpolation stage it is also the size of the learned mask ``(latent_channels, latent_size, latent_size)``.
    ``audio_feature_dim`` is the raw per-sub-frame audio feature width (WavLM|BEATs or wav2vec2|BEATs, 1536)
    projected to ``unet.context_dim`` by the stage's audio Linear.
    """

    kind: StageKind = "keyframe"
    unet: UNetConfig = field(default_factory=UNetConfig)
    audio_feature_dim: int = 1536
    latent_channels: int = 4
    latent_size: int = 64
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise InputError(f"StageConfig: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        expected_in = self.latent_channels * 2 + (1 if self.kind == "interpolation" else 0)
        if self.unet.in_channels != expected_in:
            raise InputError(
                f"StageConfig: a {self.kind} UNet takes {expected_in} input channels for "
                f"{self.latent_channels} latent channels, got unet.in_channels={self.unet.in_channels}"
            )
        if self.kind == "interpolation" and self.unet.emotion_embedding_dim:
            raise InputError("StageConfig: the interpolation stage has no emotion input (emotion_embedding_dim=0)")

    @property
    def image_size(self) -> int:
        """Pixel height = width of the stage's frames (latent_size x VAE downsample factor)."""
        return self.latent_size * self.decoder.downsample_factor

    @classmethod
    def official(cls, kind: StageKind = "keyframe") -> StageConfig:
        """The released KeyFace configuration of ``kind`` (docs/models.md#unet)."""
        if kind == "interpolation":
            return cls(kind="interpolation", unet=UNetConfig(in_channels=9, emotion_embedding_dim=0))
        return cls(kind=kind)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STAGE_CONFIG_FORMAT, **asdict(self)}

    def to_json(self) -> str:
        """This configuration as JSON (format ``keyface-stage-config-v1``); inverse of :meth:`from_json`."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> StageConfig:
        if data.get("format") != STAGE_CONFIG_FORMAT:
            raise InputError(f"{source}: expected format {STAGE_CONFIG_FORMAT!r}, got {data.get('format')!r}")
        try:
            return cls(
                kind=data["kind"],
                unet=UNetConfig(**data["unet"]),
                audio_feature_dim=data["audio_feature_dim"],
                latent_channels=data["latent_channels"],
                latent_size=data["latent_size"],
                decoder=DecoderConfig(**data["decoder"]),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{source}: not a valid KeyFace stage config ({exc})") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> StageConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_fixture_config(cls, config: dict[str, Any] | str | Path, kind: StageKind) -> StageConfig:
        """The ``kind`` stage of a fixture set's ``config.json`` (format ``keyface-fixture-config-v1``)."""
        source = str(config) if not isinstance(config, dict) else "fixture config"
        data = config if isinstance(config, dict) else _read_json(Path(config))
        if not str(data.get("format", "")).startswith(FIXTURE_CONFIG_FORMAT_PREFIX):
            raise InputError(f"{source}: expected a {FIXTURE_CONFIG_FORMAT_PREFIX}-* file, got {data.get('format')!r}")
        try:
            common = data["unet"]["common"]
            stage = data["unet"][kind]
            context_dim = common["context_dim"]
            vae = data["vae"]["decoder"]
            unet = UNetConfig(
                in_channels=stage["in_channels"],
                out_channels=stage["out_channels"],
                block_out_channels=tuple(common["block_widths"]),
                attention_per_level=tuple(common["attention_per_level"]),
                layers_per_block=common["num_res_blocks"],
                transformer_layers_per_block=common["transformer_depth"],
                num_head_channels=common["num_head_channels"],
                context_dim=context_dim,
                emotion_embedding_dim=(stage["label_emb_in_channels"] - context_dim) // 2,
                num_frames=data["frames_per_clip"],
            )
            return cls(
                kind=kind,
                unet=unet,
                audio_feature_dim=data["audio_features"]["raw_dim"],
                latent_channels=data["latent_channels"],
                latent_size=data["latent_size"],
                decoder=DecoderConfig(
                    block_out_channels=tuple(vae["ch"] * m for m in vae["ch_mult"]),
                    layers_per_block=vae["num_res_blocks"],
                    latent_channels=vae["z_channels"],
                    out_channels=vae["out_ch"],
                ),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{source}: missing or invalid entry {exc} in the fixture config") from None

    @classmethod
    def from_file(cls, path: str | Path, kind: StageKind) -> StageConfig:
        """Read a JSON file in either format (our stage config, or a fixture set's ``config.json``)."""
        path = Path(path)
        data = _read_json(path)
        if str(data.get("format", "")).startswith(FIXTURE_CONFIG_FORMAT_PREFIX):
            return cls.from_fixture_config(data, kind)
        return cls.from_dict(data, str(path))

    def with_head_channels(self, num_head_channels: int) -> StageConfig:
        return replace(self, unet=replace(self.unet, num_head_channels=num_head_channels))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc}") from None
    except ValueError as exc:
        raise InputError(f"config file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a JSON object")
    return data
