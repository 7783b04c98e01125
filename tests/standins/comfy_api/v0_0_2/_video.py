"""The core VIDEO type: ``VideoInput`` and its two implementations, from a file and from components (frames,
audio, frame rate). Behaviour of ComfyUI 0.3.64's ``comfy_api/latest/_input*/video_types.py``, reading with PyAV
like it; images are ``[frames, height, width, 3]`` float in [0, 1], audio ``{"waveform": [1, channels, samples],
"sample_rate": int}``."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypedDict

import av
import numpy as np
import torch

ImageInput = torch.Tensor
MaskInput = torch.Tensor


class AudioInput(TypedDict):
    waveform: torch.Tensor
    sample_rate: int


class LatentInput(TypedDict):
    samples: torch.Tensor


@dataclass
class VideoComponents:
    images: ImageInput
    frame_rate: Fraction
    audio: AudioInput | None = None
    metadata: dict | None = None


class VideoInput(ABC):
    @abstractmethod
    def get_components(self) -> VideoComponents:
        """The decoded frames, audio and frame rate."""

    @abstractmethod
    def save_to(self, path: str, format: Any = "auto", codec: Any = "auto", metadata: dict | None = None):
        """Write the video to ``path``."""

    def get_dimensions(self) -> tuple[int, int]:
        """(width, height)."""
        images = self.get_components().images
        return images.shape[2], images.shape[1]

    def get_duration(self) -> float:
        """Seconds: frame count over frame rate."""
        components = self.get_components()
        return float(components.images.shape[0] / components.frame_rate)


class VideoFromFile(VideoInput):
    """A video file on disk (or in a BytesIO), decoded on demand."""

    def __init__(self, file: str | io.BytesIO):
        self._file = file

    def _source(self):
        if isinstance(self._file, io.BytesIO):
            self._file.seek(0)
        return self._file

    def get_stream_source(self) -> str | io.BytesIO:
        return self._source()

    def get_dimensions(self) -> tuple[int, int]:
        with av.open(self._source(), mode="r") as container:
            for stream in container.streams:
                if stream.type == "video":
                    return stream.width, stream.height
        raise ValueError(f"No video stream found in file '{self._file}'")

    def get_duration(self) -> float:
        with av.open(self._source(), mode="r") as container:
            if container.duration is not None:
                return float(container.duration / av.time_base)
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is not None and stream.frames and stream.average_rate:
                return float(stream.frames / stream.average_rate)
        raise ValueError(f"Could not determine duration for file '{self._file}'")

    def get_components(self) -> VideoComponents:
        with av.open(self._source(), mode="r") as container:
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) / 255.0 for f in container.decode(video=0)]
            images = torch.stack(frames) if frames else torch.zeros(0, 3, 0, 0)
            stream = next(s for s in container.streams if s.type == "video")
            frame_rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(1)
            audio = None
            container.seek(0)
            for audio_stream in container.streams:
                if audio_stream.type != "audio":
                    continue
                chunks = [f.to_ndarray() for packet in container.demux(audio_stream) for f in packet.decode()]
                if chunks:
                    audio = AudioInput(
                        waveform=torch.from_numpy(np.concatenate(chunks, axis=1)).unsqueeze(0),
                        sample_rate=int(audio_stream.sample_rate) if audio_stream.sample_rate else 1,
                    )
            return VideoComponents(images=images, audio=audio, frame_rate=frame_rate, metadata=container.metadata)

    def save_to(self, path: str, format: Any = "auto", codec: Any = "auto", metadata: dict | None = None):
        """Copies the streams unchanged (the real one re-encodes only when another container or codec is asked)."""
        with av.open(self._source(), mode="r") as source, av.open(path, mode="w", format="mp4") as target:
            for key, value in (metadata or {}).items():
                target.metadata[key] = value if isinstance(value, str) else str(value)
            mapping = {
                s: target.add_stream_from_template(template=s) for s in source.streams if s.type in ("video", "audio")
            }
            for packet in source.demux():
                if packet.stream in mapping and packet.dts is not None:
                    packet.stream = mapping[packet.stream]
                    target.mux(packet)


class VideoFromComponents(VideoInput):
    """A video held as tensors; ``save_to`` encodes H.264 (+ AAC audio) mp4."""

    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        c = self._components
        return VideoComponents(images=c.images, audio=c.audio, frame_rate=c.frame_rate)

    def save_to(self, path: str, format: Any = "auto", codec: Any = "auto", metadata: dict | None = None):
        c = self._components
        with av.open(path, mode="w", format="mp4") as output:
            video = output.add_stream("h264", rate=Fraction(round(c.frame_rate * 1000), 1000))
            video.width, video.height, video.pix_fmt = c.images.shape[2], c.images.shape[1], "yuv420p"
            audio = output.add_stream("aac", rate=int(c.audio["sample_rate"])) if c.audio else None
            for frame in c.images:
                pixels = (frame * 255).clamp(0, 255).byte().cpu().numpy()
                output.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")))
            output.mux(video.encode(None))
            if audio is not None:
                waveform = c.audio["waveform"][0].float().cpu().numpy()
                layout = "mono" if waveform.shape[0] == 1 else "stereo"
                chunk = audio.codec_context.frame_size or 1024
                for start in range(0, waveform.shape[1], chunk):
                    piece = np.ascontiguousarray(waveform[:, start : start + chunk])
                    frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
                    frame.sample_rate = audio.rate
                    frame.pts = start
                    output.mux(audio.encode(frame))
                output.mux(audio.encode(None))
