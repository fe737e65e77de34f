"""Plain-data types that cross stage boundaries.

Everything here is picklable and free of Ray, so the same objects travel between
in-process stages, Ray Serve deployments and Python handles.

Inputs are already *resolved* to bytes here: fetching from S3 or a local store is
the serving layer's job (see ``deployments/``), never the model library's.

The serving layer derives its request schema from these dataclasses (field names, types
and defaults; ``deployments/schemas.py``). ``__pydantic_config__`` is a plain dict that
pydantic reads when it validates one of them (unknown keys are refused); nothing here
imports pydantic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

# "multitalk-480" / "multitalk-720" (the official buckets) or a scaled "multitalk-N"
# (multitalk.utils.image.bucket_table): a name, checked where the size is resolved.
# InfiniteTalk: "infinitetalk-480" / "infinitetalk-720" / "infinitetalk-N" (the same tables).
SizeBucket = str
AudioType = Literal["add", "para"]
Mode = Literal["clip", "streaming"]
# Speakers per job: the model was trained on one and two; three and four run with the
# L-RoPE ranges spread as ComfyUI-WanVideoWrapper does (multitalk.modules.audio_adapter).
MAX_SPEAKERS = 4


class StageCancelled(Exception):
    """Raised inside a stage's computation (the sampler's step callback) when the job it
    serves was cancelled: a Python thread cannot be killed, so it stops at its next step."""


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

    def __reduce__(self):
        # Picklable with its field, so it survives the hop out of a Ray Serve replica
        # (the default would call __init__ with the formatted message alone).
        return (InputError, (self.field, self.message, self.status))


@dataclass
class Limits:
    """Request bounds: the one set of caps every front door applies (the library's
    :func:`multitalk.generation.planning.validate`, the service's admission, the CLI). The service
    configures them (``ingress.limits`` in the serve config); the defaults suit a GPU
    deployment of the 14B model."""

    __pydantic_config__ = {"extra": "forbid"}

    max_audio_seconds: float = 300.0
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 2000
    min_frames: int = 5
    max_clip_frames: int = 201
    max_steps: int = 100
    max_speech_chars: int = 4000  # text to speech: characters of all texts (about 5 min of speech)
    # A clip fitted to short speech (frames left out) is never shorter than this: below it,
    # the request is refused naming the audio.
    min_fit_frames: int = 5
    # Source videos (InfiniteTalk video-to-video), checked from the header before decoding.
    max_video_bytes: int = 1 << 30
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160


@dataclass
class LoraChoice:
    """One LoRA a job asks for, by the name the deployment registered it under
    (``DiffusionStage.from_pretrained(lora_registry=...)``), and its strength."""

    __pydantic_config__ = {"extra": "forbid"}

    name: str
    scale: float = 1.0


@dataclass
class SamplingOptions:
    """Sampler settings; defaults are the official ``generate_multitalk.py`` ones."""

    __pydantic_config__ = {"extra": "forbid"}

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
class SpeechRequest:
    """Text to speak instead of uploaded audio (Kokoro-82M, the official TTS).

    ``voices``: the voice of each speaker (1 or 2), names from the models root's
    ``Kokoro-82M/voices/`` (``af_heart`` for ``voices/af_heart.pt``).
    Either ``texts``, one per voice (two speakers are then laid out by the job's
    ``audio_type``, as uploaded audio is), or one ``script`` whose turns are tagged
    ``(s1) ... (s2) ...`` (the official two-speaker layout: each turn on its speaker's
    track, silence on the other's). ``speed``: Kokoro's speaking rate (1 = the official).
    Errors name ``text_1``/``text_2``, ``script``, ``voice_1``/``voice_2`` or ``speed``.
    """

    __pydantic_config__ = {"extra": "forbid"}

    voices: list[str]
    texts: Optional[list[str]] = None
    script: Optional[str] = None
    speed: float = 1.0

    @property
    def text_field(self) -> str:
        """The request field holding the text (for errors about it as a whole)."""
        return "script" if self.script is not None else "text_1"


@dataclass
class GenerationRequest:
    """One talking-video job, inputs as raw file bytes.

    ``audio``: one to four speakers' audio files (wav/mp3/flac/mp4 bytes); the model was
    trained on one and two (:data:`MAX_SPEAKERS`).
    ``bbox``: per speaker ``[r0, c0, r1, c1]`` in source-image pixels, rows first
    (the official examples' convention). ``None``: for two or more speakers, boxes found
    from the faces in the condition image (:mod:`multitalk.utils.faces`).
    ``frames``: frames per clip (4n+1). In ``streaming`` mode clips of ``frames`` frames
    are chained (25 motion frames carried over) until the audio ends. ``None``: the
    official 81, except that a clip is shortened to the longest one the speech allows
    (:func:`multitalk.generation.planning.fit_frames`).
    ``video``: InfiniteTalk video-to-video: the source video's bytes (mp4/webm/mkv/mov...),
    given instead of ``image`` (``image=None``); :mod:`multitalk.infinitetalk` runs it.
    """

    image: Optional[bytes]
    audio: list[bytes]
    prompt: str = ""
    audio_type: AudioType = "add"
    bbox: Optional[list[list[float]]] = None
    mode: Mode = "clip"
    frames: Optional[int] = None
    size: SizeBucket = "multitalk-480"
    motion_frames: int = 25
    color_correction: float = 1.0
    max_frames: int = 1000
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Text to speech instead of ``audio`` (then left empty); see :class:`SpeechRequest`.
    speech: Optional[SpeechRequest] = None
    # LoRAs for this job by registered name (dicts {"name", "scale"} and (name, scale) pairs
    # are accepted too); the Diffusion stage applies them on top of the loaded base, no reload.
    loras: list[LoraChoice] = field(default_factory=list)
    # InfiniteTalk video-to-video: the source video to dub, instead of ``image``.
    video: Optional[bytes] = None
    # Without ``bbox``, two or more speakers get boxes found from the faces in the condition
    # image (multitalk.utils.faces), left to right; ``speaker_order`` lists, for speaker 1,
    # 2, ..., which of those faces (1 = leftmost) they are.
    speaker_order: Optional[list[int]] = None
    # InfiniteTalk dubbing: find the source video's shot cuts and take each chunk's reference
    # frame from its own shot (the official --scene_seg; multitalk.utils.shots).
    scene_cuts: bool = False

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


@dataclass
class Progress:
    """A progress event. ``stage`` is one of: speech, audio, image, text, diffusion, decode, mux.

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
    """The finished video (H.264 25 fps + AAC of the input speech): the mp4's bytes in
    ``video``, or the mp4 as a file in ``video_file`` (``video`` is then ``None``).

    The chunk loops return a file (``multitalk.utils.video_output.VideoFile``: a served job
    uploads it from disk, never holding the whole video in memory; it is removed when the
    result is released or garbage-collected); ``MultiTalkPipeline.generate`` reads it into
    ``video``. :meth:`mp4_bytes` gives the bytes either way."""

    video: Optional[bytes]
    num_frames: int
    fps: int
    width: int
    height: int
    chunks: int
    lip_sync: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Jobs that gave text: the synthesised soundtrack the video carries (16 kHz mono WAV).
    speech_wav: Optional[bytes] = None
    loras: list[dict] = field(default_factory=list)  # the set applied: [{"name", "scale"}], sorted by name
    # The speaker boxes the job ran with ([r0, c0, r1, c1] per speaker, source pixels) and
    # where they came from: "request" (bbox), "faces" (detected); None for one speaker.
    boxes: Optional[list[list[int]]] = None
    boxes_source: Optional[str] = None
    video_file: Any = None

    def mp4_bytes(self) -> bytes:
        return self.video if self.video is not None else self.video_file.read_bytes()

    def release(self) -> None:
        """Remove the video file (if any) now rather than at garbage collection."""
        if self.video_file is not None:
            self.video_file.release()
