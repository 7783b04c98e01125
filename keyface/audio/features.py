"""Per-frame audio features for both stages (docs/audio.md#per-frame-features).

For ``F`` 25-fps frames of 16 kHz audio (``F = ceil(samples / 640)``):

* keyframe features ``(F, 2, Dk)`` = WavLM ‖ BEATs, interpolation features ``(F, 2, Di)`` = wav2vec2 ‖ BEATs,
  two sub-frames (20 ms) per video frame; 768 + 768 wide with the released encoders;
* WavLM and BEATs see the waveform zero-padded to whole frames plus one zero frame when ``F`` is odd; their
  sequences (``2F'-1`` WavLM vectors, ``8 * floor(fbank_frames / 16)`` BEATs tokens) are resampled to ``2F'``
  by PyTorch's "nearest" rule and paired; BEATs pairs are thus neighbouring frequency patches (**[quirk]**
  of the original, kept: the models were trained on it);
* wav2vec2 sees the clip normalised (unbiased variance, eps 1e-7) then zero-padded to ``F`` frames; its
  ``2F-1`` vectors get one zero vector appended;
* everything is cut to the common length ``F`` (``full_pipeline.get_audio_embeddings``; the original's
  45-second cap belongs to the pipeline, not here).

Clips too short for BEATs' first 16x16 patch (under 2800 samples, 0.175 s; the original fails there) are
zero-padded to that length for BEATs only, so any clip of at least one sample gives features (F >= 1).

Long audio is encoded window by window (:mod:`keyface.audio.encoders`) from a 16 kHz file the input is
streamed into (read slice by slice: :class:`~keyface.audio.io.WaveformFile`), and written block by block into
``.npy`` files; with a :class:`~keyface.audio.cache.FeatureCache`
they are memory-mapped on return, so the pipeline can slice ``features.keyframe[a:b]`` chunk by chunk without
the whole array in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..constants import SAMPLES_PER_FRAME
from ..errors import CheckpointError, InputError, MissingWeightsError
from ..files import file_identity
from .cache import FEATURE_ARRAYS, FeatureCache, FeatureFiles, entry_tensor
from .encoders import AudioEncoder, WindowConfig, encode_blocks, plan_windows
from .io import (
    CHANNEL_MODES,
    AudioClip,
    AudioFileStream,
    WaveformFile,
    as_audio_clip,
    encoder_waveform_blocks,
    num_video_frames,
    to_encoder_waveform,
)
from .weights import (
    BEATS_FILE,
    BEATS_ORIGIN,
    WAV2VEC2_FOLDER,
    WAV2VEC2_ORIGIN,
    WAVLM_FILE,
    WAVLM_HF_FOLDER,
    WAVLM_ORIGIN,
    require_path,
)

SUBFRAMES_PER_FRAME = 2  # docs/audio.md#frames-and-sub-frames: two 20-ms encoder steps per 40-ms video frame
FEATURES_FORMAT = "keyface-audio-features-v1"  # part of every cache key: bump when the computation changes

EncoderSource = AudioEncoder | str | os.PathLike
ProgressCallback = Callable[[int, int], None]

# File names looked for by AudioFeatureExtractor.from_folder, first found wins.
_FOLDER_CANDIDATES = {
    "wavlm": (WAVLM_FILE, "WavLM-Base+.safetensors", WAVLM_HF_FOLDER),
    "beats": (BEATS_FILE, BEATS_FILE.replace(".pt", ".safetensors")),
    "wav2vec2": (WAV2VEC2_FOLDER,),
}
_ORIGINS = {"wavlm": WAVLM_ORIGIN, "beats": BEATS_ORIGIN, "wav2vec2": WAV2VEC2_ORIGIN}


@dataclass(frozen=True)
class AudioFeatures:
    """Audio features of one clip, one entry per 25-fps video frame.

    Attributes:
        keyframe: ``(frames, 2, Dk)`` float32, [WavLM | BEATs] per sub-frame. Memory-mapped when read from
            the cache: slicing reads only the slice.
        interpolation: ``(frames, 2, Di)`` float32, [wav2vec2 | BEATs].
        mode: channel mode used (``"default"`` or ``"reference"``).
        cache_path: the cache entry backing the arrays, or ``None`` when they are in memory.
    """

    keyframe: torch.Tensor
    interpolation: torch.Tensor
    mode: str = "default"
    cache_path: Path | None = None

    @property
    def num_frames(self) -> int:
        return int(self.keyframe.shape[0])


def nearest_indices(source_length: int, target_length: int) -> np.ndarray:
    """Source index of each target position under PyTorch's ``interpolate(mode="nearest")`` -> ``(target_length,)``.

    ``floor(i * (source / target))`` in float32, as ATen computes it, capped at ``source - 1``.
    """
    if source_length < 1:
        raise ValueError("nearest_indices: empty source sequence")
    positions = np.arange(target_length, dtype=np.int64)
    if target_length == source_length:
        return positions
    if target_length == 2 * source_length:
        return positions >> 1
    scale = np.float32(source_length) / np.float32(target_length)
    index = np.floor(positions.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(index, source_length - 1)


def combine_encoder_frames(
    wavlm: torch.Tensor, beats: torch.Tensor, wav2vec2: torch.Tensor, mode: str = "default"
) -> AudioFeatures:
    """Join per-encoder frame features ``(F_e, 2, D_e)`` as ``full_pipeline.get_audio_embeddings`` does.

    Returns keyframe = [WavLM | BEATs] and interpolation = [wav2vec2 | BEATs], cut to the common length.
    """
    frames = min(wavlm.shape[0], beats.shape[0], wav2vec2.shape[0])
    return AudioFeatures(
        keyframe=torch.cat([wavlm[:frames], beats[:frames]], dim=-1),
        interpolation=torch.cat([wav2vec2[:frames], beats[:frames]], dim=-1),
        mode=mode,
    )


class AudioFeatureExtractor:
    """Audio -> :class:`AudioFeatures`, with the three encoders and a feature cache.

    Args:
        wavlm: a loaded encoder, or the path of ``WavLM-Base+.pt`` / its safetensors copy / a HF folder.
        beats: a loaded encoder, or the path of the BEATs checkpoint (.pt or safetensors).
        wav2vec2: a loaded encoder, or the ``wav2vec2-base-960h`` folder.
        device, dtype: where and in which precision the encoders run (features are stored as float32).
        cache: a :class:`FeatureCache`, ``"default"`` (the default cache folder) or ``None`` (features kept
            in memory, nothing written).
        window: window sizes for long audio.

    Encoders given as paths are loaded on first use, so a cache hit loads nothing.
    """

    def __init__(
        self,
        wavlm: EncoderSource,
        beats: EncoderSource,
        wav2vec2: EncoderSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache: FeatureCache | str | None = "default",
        window: WindowConfig | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.window = window or WindowConfig()
        if cache == "default":
            cache = FeatureCache()
        elif cache is not None and not isinstance(cache, FeatureCache):
            raise InputError(f"cache: expected a FeatureCache, 'default' or None, got {cache!r}")
        self.cache = cache
        self._sources = {"wavlm": wavlm, "beats": beats, "wav2vec2": wav2vec2}
        self._encoders: dict[str, AudioEncoder] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs) -> AudioFeatureExtractor:
        """Find the three encoders in one folder (the KeyFace checkpoints folder) by their release names."""
        folder = Path(folder).expanduser()
        sources = {}
        for role, names in _FOLDER_CANDIDATES.items():
            found = next((folder / name for name in names if (folder / name).exists()), None)
            if found is None:
                raise MissingWeightsError(
                    f"{role} weights not found in {folder} (looked for {', '.join(names)}). {_ORIGINS[role]}."
                )
            sources[role] = found
        return cls(**sources, **kwargs)

    def encoder(self, role: str) -> AudioEncoder:
        """The ``"wavlm"``, ``"beats"`` or ``"wav2vec2"`` encoder, loading it on first use."""
        if role not in self._encoders:
            source = self._sources[role]
            if isinstance(source, AudioEncoder):
                encoder = source.to(self.device, self.dtype)
            else:
                from . import beats, wav2vec2, wavlm

                loader = {"wavlm": wavlm.load_wavlm, "beats": beats.load_beats, "wav2vec2": wav2vec2.load_wav2vec2}[
                    role
                ]
                encoder = loader(source, device=self.device, dtype=self.dtype)
            if encoder.name != role:
                raise CheckpointError(f"{role}: the encoder given is a {encoder.name} encoder")
            self._encoders[role] = encoder
        return self._encoders[role]

    def cache_key(self, waveform_16k: torch.Tensor, mode: str) -> str:
        """Hash of the encoder input waveform, the encoders' identities, mode, dtype and window settings."""
        digest = self._key_digest(mode)
        digest.update(np.ascontiguousarray(waveform_16k.numpy(), dtype=np.float32).data)
        return digest.hexdigest()[:40]

    def extract(
        self,
        audio: AudioClip | AudioFileStream | dict | str | os.PathLike,
        mode: str = "default",
        progress: ProgressCallback | None = None,
    ) -> AudioFeatures:
        """Features of ``audio`` (a clip, a ComfyUI ``AUDIO`` dict, a file path or an :class:`AudioFileStream`).

        A file is streamed: decoded and resampled to 16 kHz block by block into a file in the cache folder
        that the encoders read window by window, memory-mapped; the features are written block by block. So
        memory holds blocks, never the decoded file (a clip or ``AUDIO`` dict is in memory already).

        Args:
            audio: the input; see :mod:`keyface.audio.io` for decoding and the channel policy.
            mode: ``"default"`` (channels averaged) or ``"reference"`` (the original's channel choice).
            progress: ``progress(done, total)`` after each encoder window; it may raise (e.g.
                :class:`keyface.errors.Interrupted`) to stop, leaving no cache entry behind.
        """
        if mode not in CHANNEL_MODES:
            raise InputError(f"mode: expected one of {CHANNEL_MODES}, got {mode!r}")
        if isinstance(audio, (str, os.PathLike)):
            audio = AudioFileStream(audio)
        if isinstance(audio, AudioFileStream):
            source = audio.source
            pieces = encoder_waveform_blocks(audio.blocks(), audio.sample_rate, mode)
        else:
            clip = as_audio_clip(audio)
            source = clip.source
            pieces = [to_encoder_waveform(clip, mode)]
        cache = self.cache
        staging = cache.staging_folder() if cache is not None else Path(tempfile.mkdtemp(prefix="keyface-features-"))
        try:
            waveform, num_valid, key = self._stage_waveform(pieces, staging / "waveform.f32", mode)
            frames = num_video_frames(num_valid)
            if cache is None:
                with FeatureFiles(staging, self._shapes(frames)) as files:
                    self._fill(files, waveform, num_valid, frames, progress)
                arrays = {name: np.load(staging / f"{name}.npy") for name in FEATURE_ARRAYS}
                return AudioFeatures(
                    torch.from_numpy(arrays["keyframe"]), torch.from_numpy(arrays["interpolation"]), mode
                )
            opened = cache.open(key)
            if opened is None:
                meta = {"format": FEATURES_FORMAT, "frames": frames, "mode": mode, "source": source}
                with cache.write(key, self._shapes(frames), meta) as files:
                    self._fill(files, waveform, num_valid, frames, progress)
                opened = cache.open(key)
                if opened is None:
                    raise OSError(f"the feature cache entry {cache.root / key} could not be written")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        arrays, meta = opened
        keyframe, interpolation = (entry_tensor(arrays[name], key, name, meta) for name in FEATURE_ARRAYS)
        return AudioFeatures(keyframe, interpolation, mode, cache.root / key)

    def unload(self) -> None:
        """Drop the loaded encoders (frees their memory); encoders given as paths are loaded again when needed."""
        self._encoders.clear()

    def _shapes(self, frames: int) -> dict[str, tuple[int, int, int]]:
        wavlm, beats, wav2vec2 = (self.encoder(role) for role in ("wavlm", "beats", "wav2vec2"))
        return {
            "keyframe": (frames, SUBFRAMES_PER_FRAME, wavlm.dim + beats.dim),
            "interpolation": (frames, SUBFRAMES_PER_FRAME, wav2vec2.dim + beats.dim),
        }

    def _key_digest(self, mode: str):
        """The cache key's hash with everything but the waveform (:meth:`cache_key`) fed in."""
        identities = {}
        for role, source in self._sources.items():
            if isinstance(source, AudioEncoder):
                identities[role] = source.identity
            else:
                identities[role] = file_identity(require_path(source, f"{role} weights", _ORIGINS[role]))
        settings = {
            "format": FEATURES_FORMAT,
            "mode": mode,
            "dtype": str(self.dtype),
            "window": [self.window.window_seconds, self.window.context_seconds],
            "encoders": identities,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode())

    def _stage_waveform(self, pieces, path: Path, mode: str) -> tuple[WaveformFile, int, str]:
        """Write the 16 kHz waveform arriving in ``pieces`` to ``path``, zero-padded to the longest encoder
        input, hashing it on the way: returns it as a :class:`WaveformFile` (read slice by slice, so memory
        holds a window, not the waveform), its real length and the cache key (equal to :meth:`cache_key` of
        the whole waveform)."""
        digest = self._key_digest(mode)
        num_valid = 0
        with open(path, "wb") as file:
            for piece in pieces:
                data = np.ascontiguousarray(piece.numpy(), dtype=np.float32)
                digest.update(data.data)
                file.write(data.tobytes())
                num_valid += data.size
            if num_valid == 0:
                raise InputError(f"{path}: no audio samples to encode")
            length = max(self._input_lengths(num_video_frames(num_valid)))
            file.truncate(4 * length)  # the encoders' zero padding, sparse
        return WaveformFile(path, length), num_valid, digest.hexdigest()[:40]

    def _plans(self):
        """Per encoder: (encoder, pad to an even frame count and resample its sequence, [(array, first column)])."""
        wavlm, beats, wav2vec2 = (self.encoder(role) for role in ("wavlm", "beats", "wav2vec2"))
        return [
            (wavlm, True, [("keyframe", 0)]),
            (beats, True, [("keyframe", wavlm.dim), ("interpolation", wav2vec2.dim)]),
            (wav2vec2, False, [("interpolation", 0)]),
        ]

    def _input_lengths(self, frames: int) -> list[int]:
        """Samples each encoder sees (in :meth:`_plans` order): whole frames, and BEATs at least one patch."""
        return [
            max(SAMPLES_PER_FRAME * _input_frames(frames, even), encoder.min_samples)
            for encoder, even, _ in self._plans()
        ]

    def _fill(self, files: FeatureFiles, waveform: WaveformFile, num_valid: int, frames: int, progress) -> None:
        """Encode ``waveform`` (``num_valid`` real samples, then zeros at least as long as every encoder input)
        with the three encoders, writing each one's sub-frames into its columns, block by block."""
        plans = self._plans()
        input_lengths = self._input_lengths(frames)
        counts = [
            len(plan_windows(length, encoder.alignment, self.window))
            for length, (encoder, _, _) in zip(input_lengths, plans, strict=True)
        ]
        subframes = SUBFRAMES_PER_FRAME * frames
        done = 0
        for length, count, (encoder, even, targets) in zip(input_lengths, counts, plans, strict=True):
            x = waveform.head(length)
            if even:
                sources = nearest_indices(
                    encoder.sequence_length(length), SUBFRAMES_PER_FRAME * _input_frames(frames, even)
                )
            else:  # in order, then zero vectors (docs/audio.md#wav2vec2: one zero vector appended to the 2F-1)
                sources = np.arange(subframes)
            sources = sources[:subframes]

            def report(step: int, _total: int, before: int = done) -> None:
                if progress is not None:
                    progress(before + step, sum(counts))

            for first, block in encode_blocks(encoder, x, num_valid, self.window, report):
                low, high = np.searchsorted(sources, [first, first + block.shape[0]])
                rows = block.numpy()[sources[low:high] - first]
                for name, column in targets:
                    files.set_columns(name, int(low), column, rows)
            done += count


def _input_frames(frames: int, even: bool) -> int:
    """Frames of audio an encoder sees: WavLM and BEATs get one zero frame more when ``frames`` is odd."""
    return frames + frames % 2 if even else frames
