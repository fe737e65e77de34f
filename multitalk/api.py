"""Plain-data types that cross stage boundaries.

Everything here is picklable and free of Ray, so the same objects travel between
in-process stages, Ray Serve deployments and Python handles.

Inputs are already *resolved* to bytes here: fetching from S3 or a local store is
the serving layer's job (see ``deployments/``), never the model library's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

SizeBucket = Literal["multitalk-480", "multitalk-720", "infinitetalk-480", "infinitetalk-720"]
AudioType = Literal["add", "para"]
Mode = Literal["clip", "streaming"]


class InputError(ValueError):
    """A request that cannot be served as given (maps to HTTP 4xx).

    ``field`` names the offending input (``audio_1``, ``condition_image``, ``bbox`` ...)
    so clients can show the problem next to the right control.
    """

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
        self.status = status


@dataclass
class SamplingOptions:
    """Sampler settings; defaults are the official ``generate_multitalk.py`` ones."""

    steps: int = 40
    shift: Optional[float] = None  # None: 7 for multitalk-480, 11 for multitalk-720
    text_scale: float = 5.0
    audio_scale: float = 4.0
    seed: int = 42
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    teacache_thresh: float = 0.0  # 0 disables TeaCache; official range 0.2-0.5
    negative_prompt: Optional[str] = None  # None: the official MultiTalk negative prompt

    def resolved_shift(self, size: SizeBucket) -> float:
        if self.shift is not None:
            return float(self.shift)
        return 11.0 if size in ("multitalk-720", "infinitetalk-720") else 7.0


@dataclass
class GenerationRequest:
    """One talking-video job, inputs as raw file bytes.

    ``audio``: one or two speakers' audio files (wav/mp3/flac/mp4 bytes).
    ``bbox``: per speaker ``[r0, c0, r1, c1]`` in source-image pixels, rows first
    (the official examples' convention). ``None``: left/right halves for two speakers.
    ``frames``: frames per clip (4n+1). In ``streaming`` mode clips of ``frames`` frames
    are chained (25 motion frames carried over) until the audio ends.
    ``video``: InfiniteTalk video-to-video: the source video's bytes (mp4/webm/mkv/mov...),
    given instead of ``image`` (``image=None``); :mod:`multitalk.infinitetalk` runs it.
    """

    image: Optional[bytes]
    audio: list[bytes]
    prompt: str = ""
    audio_type: AudioType = "add"
    bbox: Optional[list[list[float]]] = None
    mode: Mode = "clip"
    frames: int = 81
    size: SizeBucket = "multitalk-480"
    motion_frames: int = 25
    color_correction: float = 1.0
    max_frames: int = 1000
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    video: Optional[bytes] = None

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


@dataclass
class Progress:
    """A progress event. ``stage`` is one of: audio, image, text, diffusion, decode, mux.

    For diffusion, ``step``/``total_steps`` count sampler steps over all chunks and
    ``chunk``/``total_chunks`` the streaming chunk.
    """

    stage: str
    step: int = 0
    total_steps: int = 0
    chunk: int = 0
    total_chunks: int = 1
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass
class GenerationResult:
    """The finished video: mp4 bytes (H.264 25 fps + AAC of the input speech)."""

    video: bytes
    num_frames: int
    fps: int
    width: int
    height: int
    chunks: int
    lip_sync: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
