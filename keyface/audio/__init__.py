"""Audio front end: decoding, 16 kHz preparation, the three encoders and per-frame features
(docs/audio.md#per-frame-features).

Typical use::

    from keyface.audio import AudioFeatureExtractor, load_audio

    extractor = AudioFeatureExtractor.from_folder("checkpoints")  # WavLM-Base+.pt, BEATs_...pt, wav2vec2-base-960h/
    features = extractor.extract(load_audio("speech.mp3"))         # features.keyframe: (F, 2, 1536)

Submodules: ``io`` (decode, resample, frames), ``encoders`` (windowed encoding), ``wavlm``, ``beats``,
``wav2vec2`` (loaders), ``features`` (the extractor), ``cache`` (on-disk feature cache), ``weights``
(checkpoint files). Importing this package does not import transformers.
"""

from .cache import FeatureCache, default_cache_dir
from .encoders import AudioEncoder, WindowConfig
from .features import AudioFeatureExtractor, AudioFeatures, combine_encoder_frames
from .io import (
    AudioClip,
    as_audio_clip,
    load_audio,
    num_video_frames,
    raw_audio_frames,
    to_encoder_waveform,
)

__all__ = [
    "AudioClip",
    "AudioEncoder",
    "AudioFeatureExtractor",
    "AudioFeatures",
    "FeatureCache",
    "WindowConfig",
    "as_audio_clip",
    "combine_encoder_frames",
    "default_cache_dir",
    "load_audio",
    "num_video_frames",
    "raw_audio_frames",
    "to_encoder_waveform",
]
