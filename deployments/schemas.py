"""Typed requests and responses of the native API, shared by the HTTP routes, the Python
handle and the persisted job records.

:class:`JobRequest` is *derived* from the library's request type,
:class:`multitalk.api.GenerationRequest`: every option field (name, type, default) is the
library's own, so a new option appears here by itself and the two can never disagree.
Only the media differ: the library takes bytes, a job takes *references* (store keys,
simple file names, ``s3://`` URLs), so job records stay small and a restarted ingress can
run a job again from its record. The numeric caps (steps, frames, prompt length, audio
length, image size) are the service's configured :class:`multitalk.api.Limits`, applied
at submit by the library's own ``validate`` (see ``deployments/admission.py``); the
schema itself checks only what holds for every deployment (types, ``frames`` = 4n+1,
ranges such as ``color_correction`` in [0, 1]).

The RunPod contract's request and status shapes are mapped onto these in
``deployments/runpod.py``.
"""
from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from multitalk.api import MAX_SPEAKERS, GenerationRequest, InputError

from .chunk_results import ChunkInfo
from .webhooks import WebhookInfo


class JobState(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class OutputSpec(BaseModel):
    """Where the video goes. ``s3``: the configured store (an S3 bucket in production),
    answered with key + presigned URL. ``local``: a file under the local output folder,
    answered with its path. ``None``: the configured store."""

    model_config = ConfigDict(extra="forbid")

    format: Optional[Literal["s3", "local"]] = None
    key: Optional[str] = Field(None, description="Output key; default outputs/{job_id}.mp4")

    @field_validator("key")
    @classmethod
    def _safe_key(cls, v):
        if v is not None:
            from .storage import validate_key

            validate_key(v, "output.key")
        return v


SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64); chunks add their index

# The library request's byte inputs: a job names them by reference instead (fields below).
MEDIA_FIELDS = ("image", "audio", "video")

# What the OpenAPI page says about the derived option fields.
OPTION_DOCS = {
    "prompt": "What the video shows (UMT5 text conditioning)",
    "audio_type": "Two speakers: 'add' (one after the other) or 'para' (at the same time)",
    "bbox": "Per speaker [r0, c0, r1, c1] in image pixels, rows first; left out, two or more speakers get boxes "
            "found from the faces in the image (the result reports the boxes used)",
    "speaker_order": "Without bbox: for speaker 1, 2, ... which detected face (1 = leftmost) they are, e.g. [2, 1]",
    "scene_cuts": "InfiniteTalk video-to-video: find the source's shot cuts and take each chunk's reference frame "
                  "from its own shot (the official --scene_seg); off by default",
    "mode": "'clip': one clip; 'streaming': clips chained until the audio ends",
    "frames": "Frames per clip, 4n+1 (81 at 25 fps = 3.24 s); left out: 81, a clip shortened to fit shorter speech",
    "size": "multitalk-480, multitalk-720 (InfiniteTalk: infinitetalk-480/-720), or a scaled -N "
            "(32 <= N <= 2048; small N for CPU)",
    "motion_frames": "Streaming: frames of the previous clip each clip continues from (4n+1)",
    "color_correction": "Streaming: strength of the colour match to the reference image",
    "max_frames": "Streaming: cap on the video's frames",
    "sampling": "Sampler settings (steps, guidance scales, seed, TeaCache, APG, negative prompt)",
    "loras": "LoRAs by the names the server's config gives them, e.g. [{name: lightx2v, scale: 1.0}]; applied "
             "per job on the loaded base (no reload)",
    "speech": "Text to speak instead of audio (Kokoro-82M): {voices: [v1, v2?], texts: [t1, t2?] | script: "
              "'(s1) ... (s2) ...', speed}",
}
# Checks that hold for every deployment; the configured caps are Limits (module docstring).
OPTION_BOUNDS = {
    "frames": {"ge": 1},
    "motion_frames": {"ge": 1},
    "max_frames": {"ge": 1},
    "color_correction": {"ge": 0, "le": 1},
    "size": {"pattern": r"^(multitalk|infinitetalk)-\d{2,4}$"},
}


def option_fields(request_type: type = GenerationRequest) -> dict[str, tuple[Any, Any]]:
    """``create_model`` field definitions for every non-media field of the library's
    request dataclass: its own type and default, plus :data:`OPTION_DOCS` and
    :data:`OPTION_BOUNDS`."""
    hints = typing.get_type_hints(request_type)
    fields = {}
    for f in dataclasses.fields(request_type):
        if f.name in MEDIA_FIELDS:
            continue
        extra = {"description": OPTION_DOCS.get(f.name), **OPTION_BOUNDS.get(f.name, {})}
        if f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory, **extra))
        else:
            fields[f.name] = (hints[f.name], Field(f.default, **extra))
    return fields


OPTION_NAMES = tuple(option_fields())


class _JobInputs(BaseModel):
    """The parts of a job that are not the library's options: media references and where
    the result goes. :class:`JobRequest` adds the options."""

    model_config = ConfigDict(extra="forbid")

    image: Optional[str] = Field(None, description="Reference image: store key, file name or s3://bucket/key")
    video: Optional[str] = Field(None, description="InfiniteTalk video-to-video: the source video to dub "
                                                   "(instead of image): store key, file name or s3://bucket/key")
    audio: list[str] = Field(default_factory=list, max_length=MAX_SPEAKERS,
                             description="One to four speakers' audio (or ``speech``: text to speak); the model "
                                         "was trained on one and two")
    output: OutputSpec = Field(default_factory=OutputSpec)
    preset: Optional[str] = Field(None, description="A named set of options from the server's config (e.g. "
                                                    "quality, fast); fields the request sets win")
    webhook: Optional[str] = Field(None, description="URL the final status is POSTed to once, signed "
                                                     "(docs/API.md, Webhooks); allow-listed hosts only")

    @field_validator("frames", check_fields=False)
    @classmethod
    def _four_n_plus_one(cls, v):
        if v is not None and (v - 1) % 4:
            raise ValueError("frames must be 4n+1 (e.g. 81)")
        return v

    @field_validator("sampling", check_fields=False)
    @classmethod
    def _runnable_sampling(cls, v):
        from multitalk.generation.planning import validate_sampling

        validate_sampling(v)  # the configured step cap is checked at submit (Limits)
        if not SEED_MIN <= v.seed <= SEED_MAX:
            raise InputError("sampling.seed", f"must be between {SEED_MIN} and {SEED_MAX}, got {v.seed}")
        return v

    @property
    def speakers(self) -> int:
        speech = getattr(self, "speech", None)
        return len(speech.voices) if speech is not None and not self.audio else len(self.audio)

    @model_validator(mode="after")
    def _image_or_video(self):
        if self.image is not None and self.video is not None:
            raise InputError("video", "give image (image-to-video) or video (video-to-video), not both")
        if self.image is None and self.video is None:
            raise InputError("image", "required (or video: a source video to dub, with the InfiniteTalk model)")
        return self

    @model_validator(mode="after")
    def _audio_or_speech(self):
        if not self.audio and getattr(self, "speech", None) is None:
            raise InputError("audio", "give one to four speakers' audio, or speech (text with voices) to synthesise")
        return self

    @model_validator(mode="after")
    def _bbox_per_speaker(self):
        bbox = getattr(self, "bbox", None)
        if bbox is not None:
            if len(bbox) != self.speakers:
                raise InputError("bbox", "bbox needs one box per audio track")
            for box in bbox:
                if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
                    raise InputError("bbox", "each bbox is [r0, c0, r1, c1] with r0 < r1 and c0 < c1")
        return self

    def input_fields(self) -> list[tuple[str, str]]:
        """(field name, reference) for every input. Names are the library's (and RunPod's):
        ``condition_image`` or ``condition_video``, ``audio_1``, ``audio_2``; see
        :data:`NATIVE_FIELD_NAMES`."""
        visual = [("condition_image", self.image)] if self.image is not None else [("condition_video", self.video)]
        return visual + [(f"audio_{i + 1}", a) for i, a in enumerate(self.audio)]

    def options(self) -> dict[str, Any]:
        """The library options of this job (deep copies: the record's own stay untouched)."""
        import copy

        return {name: copy.deepcopy(getattr(self, name)) for name in OPTION_NAMES}

    def to_generation_request(self, image: Optional[bytes], audio: list[bytes],
                              video: Optional[bytes] = None) -> GenerationRequest:
        return GenerationRequest(image=image, audio=audio, video=video, **self.options())

    def with_media(self, media: dict[str, Any]) -> GenerationRequest:
        """The library request, the media given by field name (:meth:`input_fields`)."""
        audio = [media[f"audio_{i + 1}"] for i in range(len(self.audio))]
        return self.to_generation_request(media.get("condition_image"), audio, media.get("condition_video"))


JobRequest = create_model(
    "JobRequest",
    __base__=_JobInputs,
    __module__=__name__,
    __doc__="One talking-video job: media references (``image``, ``audio``), where the result goes "
            "(``output``) and the library's generation options (multitalk.api.GenerationRequest).",
    **option_fields(),
)


class ProgressInfo(BaseModel):
    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    chunk: int = 0
    total_chunks: int = 1
    message: str = ""


class ErrorInfo(BaseModel):
    field: Optional[str] = None
    message: str
    status: int = 500


class ResultInfo(BaseModel):
    key: str
    store: Literal["s3", "local"]
    url: Optional[str] = Field(None, description="Presigned URL (s3) or file:// URL (local)")
    path: Optional[str] = Field(None, description="Local file path (local output)")
    video_url: Optional[str] = Field(None, description="Ingress route streaming the mp4")
    frames: int = 0
    duration: float = 0.0
    fps: int = 25
    width: int = 0
    height: int = 0
    chunks: int = 1
    lip_sync: bool = True
    warnings: list[str] = Field(default_factory=list)
    loras: list[dict[str, Any]] = Field(default_factory=list, description="The LoRAs applied: [{name, scale}]")
    speech_key: Optional[str] = Field(None, description="Text-to-speech jobs: the synthesised speech (16 kHz wav)")
    speech_url: Optional[str] = Field(None, description="Text-to-speech jobs: presigned URL (s3) or file:// URL")
    boxes: Optional[list[list[float]]] = Field(None, description="The speaker boxes the job ran with, [r0, c0, r1, c1] "
                                                                 "per speaker in image pixels (none for one speaker)")
    boxes_source: Optional[str] = Field(None, description="'request' (bbox) or 'faces' (found in the image)")


class JobStatus(BaseModel):
    """What ``GET /v1/jobs/{id}`` and the handle methods answer."""

    id: str
    state: JobState
    created_at: float
    updated_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    progress: ProgressInfo = Field(default_factory=ProgressInfo)
    timings: dict[str, float] = Field(default_factory=dict)
    result: Optional[ResultInfo] = None
    output: Optional[dict[str, Any]] = Field(None, description="Output of non-video RunPod actions")
    error: Optional[ErrorInfo] = None
    request: Optional[JobRequest] = None
    options_applied: dict[str, Any] = Field(
        default_factory=dict, description="Fields the request left out, filled in from its preset or the server's "
                                          "defaults: {field: {value, source}}")
    webhook: Optional[WebhookInfo] = Field(None, description="Delivery of the final status to the request's webhook")
    chunks: list[ChunkInfo] = Field(default_factory=list, description="Streaming jobs: the chunks finished so far "
                                                                      "(GET /v1/jobs/{id}/video plays them while "
                                                                      "the job runs)")


class SubmitResponse(BaseModel):
    id: str
    state: JobState
    status_url: str


# Errors carry the library's field names (the RunPod contract's too); native API callers
# get them renamed to the fields of their JobRequest.
NATIVE_FIELD_NAMES = {
    "condition_image": "image", "condition_video": "video", "audio_1": "audio[0]", "audio_2": "audio[1]",
    "audio_3": "audio[2]", "audio_4": "audio[3]",
    "text_1": "speech.texts[0]", "text_2": "speech.texts[1]", "script": "speech.script",
    "voice_1": "speech.voices[0]", "voice_2": "speech.voices[1]", "voice": "speech.voices", "speed": "speech.speed",
}


class ErrorBody(BaseModel):
    error: ErrorInfo


# Discriminated unions insert the tag into the location ("input.generate.audio_1").
_UNION_TAGS = ("generate", "model_check", "volume_explore")


def validation_field(err: dict) -> str:
    """The dotted field name of one pydantic error (``sampling.steps``, ``audio[1]``)."""
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):  # a check that names its field (bbox, sampling.steps)
        return cause.field
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    loc = [p for p in loc if p not in _UNION_TAGS]
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or "body"


def as_input_error(exc: Any, prefix: str = "") -> InputError:
    """The first problem of a pydantic validation error as a 422 :class:`InputError`
    (``prefix``: the part of the body that was validated, e.g. ``input``)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = validation_field(first)
    if prefix and not field.startswith(prefix):
        field = f"{prefix}.{field}" if field != "body" else prefix
    msg = str(first.get("msg", "invalid"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return InputError(field, msg, 422)


def parse_job_request(body: Any) -> "JobRequest":
    """A :class:`JobRequest` from a raw request object; a 422 :class:`InputError` naming
    the first bad field otherwise."""
    from pydantic import ValidationError

    if isinstance(body, JobRequest):
        return body
    try:
        return JobRequest.model_validate(body)
    except ValidationError as e:
        raise as_input_error(e) from None
