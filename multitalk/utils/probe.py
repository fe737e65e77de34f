"""What a media file holds, read by structure: PyAV (FFmpeg's demuxers and decoders as a
library) gives the container, its duration and each stream's codec, frame size, rate,
rotation and sample rate as fields, not as text to be parsed out of ``ffmpeg -i``'s banner.

PyAV's wheels carry the decoders the project reads (H.264, HEVC, VP8/VP9, AV1, MPEG-4,
AAC, MP3, Opus, FLAC, PCM; checked in ``tests/test_media.py``). Probing reads the headers
and decodes at most the first video frame (the display rotation is frame side data); the
sequential decoding of a source video and of audio tracks stays in an ffmpeg process
(``multitalk.utils.video_source``, ``multitalk.utils.audio``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional


class UnreadableMedia(ValueError):
    """The file is not a media file PyAV can open (or has no stream)."""


@dataclass
class StreamInfo:
    """One stream: ``kind`` ``"video"``/``"audio"``/other, ``codec`` (FFmpeg's name, e.g.
    ``h264``, ``aac``). Video: ``width`` x ``height`` as displayed (``rotation`` applied),
    nominal ``fps``. Audio: ``sample_rate``, ``channels``. ``frames``: the container's count
    (0 when it does not say)."""

    kind: str
    codec: str
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None
    rotation: int = 0
    sample_rate: Optional[int] = None
    channels: Optional[int] = None
    frames: int = 0


@dataclass
class MediaInfo:
    """``container``: FFmpeg's demuxer names (``mov,mp4,m4a,3gp,3g2,mj2``, ``png_pipe``,
    ...); ``duration`` in seconds (None when unknown)."""

    container: str
    duration: Optional[float]
    streams: list[StreamInfo] = field(default_factory=list)

    def first(self, kind: str) -> Optional[StreamInfo]:
        return next((s for s in self.streams if s.kind == kind), None)


def _rate(stream) -> Optional[float]:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(Fraction(rate)) if rate else None


def _first_frame_rotation(container, stream) -> int:
    """Degrees of display rotation (the frame's display-matrix side data), 0 if none."""
    try:
        for frame in container.decode(stream):
            return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except Exception:  # noqa: BLE001 - an undecodable stream is reported by whoever decodes it
        return 0
    return 0


def probe(path: str) -> MediaInfo:
    """The container and streams of the file at ``path``. Raises :class:`UnreadableMedia`."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise UnreadableMedia(f"not a readable media file ({error})") from None
    with container:
        streams = []
        for stream in container.streams:
            context = stream.codec_context
            # The codec's name (``av1``), not the decoder's (``libdav1d``).
            codec = (context.codec.canonical_name or context.name) if context is not None else "unknown"
            if stream.type == "video":
                rotation = _first_frame_rotation(container, stream) if stream is container.streams.video[0] else 0
                width, height = context.width or stream.width, context.height or stream.height
                if rotation in (90, 270):
                    width, height = height, width
                streams.append(StreamInfo("video", codec, width, height, _rate(stream), rotation, frames=stream.frames))
            elif stream.type == "audio":
                streams.append(StreamInfo("audio", codec, sample_rate=context.sample_rate or None,
                                          channels=context.channels or None, frames=stream.frames))
            else:
                streams.append(StreamInfo(stream.type, codec))
        duration = container.duration / 1e6 if container.duration is not None else None
        if not streams:
            raise UnreadableMedia("the file has no audio or video stream")
        return MediaInfo(container.format.name, duration, streams)


def decoded_counts(path: str) -> tuple[int, Optional[float]]:
    """Every frame decoded: the first video stream's frame count, and the first audio
    stream's decoded duration in seconds (None without audio)."""
    import av

    with av.open(path) as container:
        frames = 0
        if container.streams.video:
            frames = sum(1 for _ in container.decode(video=0))
    seconds = None
    with av.open(path) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            seconds = samples / stream.codec_context.sample_rate
    return frames, seconds
