"""The fixed numbers of the KeyFace models, defined once (see ``docs/architecture.md``).

The released models are trained on 25-fps video of 512x512 faces with 16 kHz audio; a clip (a keyframe batch,
an interpolation segment) holds 14 frames.
"""

VIDEO_FPS = 25
"""Frames per second of every generated video (the original's ``fps_id`` 24 means 25 fps)."""

FRAMES_PER_CLIP = 14
"""Frames per network call in both stages: keyframe slots per batch = frames per interpolation segment."""

ENCODER_SAMPLE_RATE = 16_000
"""Sample rate of the audio the three encoders (WavLM, BEATs, wav2vec 2.0) run on."""

SAMPLES_PER_FRAME = ENCODER_SAMPLE_RATE // VIDEO_FPS
"""16 kHz audio samples per video frame (640)."""

RELEASED_IMAGE_SIZE = 512
"""Side of the square identity image and of every generated frame of the released models."""

EMOTION_METADATA_KEY = "keyface_emotion"
"""Container tag of a generated video holding the emotion curve it was made with (EmotionCurve JSON)."""
