"""Typed requests and responses, shared by the HTTP routes and the Python handle.

Two front doors lead to the same job:

* the native API: :class:`JobRequest` in, :class:`JobStatus` out (``/v1/jobs``);
* the predecessor's RunPod contract: :class:`RunPodRequest` (``{"input": {"action": ...}}``)
  in, :class:`RunPodStatus` (``{"id", "status", "output" | "error"}``) out. A RunPod
  ``generate`` input is converted into a :class:`JobRequest`.

Inputs are *references* (store keys, simple file names, ``s3://`` URLs), never bytes, so
job records stay small and a restarted ingress can run a job again from its record.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multitalk.api import GenerationRequest, InputError, SamplingOptions


class JobState(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class Sampling(BaseModel):
    """Mirror of :class:`multitalk.api.SamplingOptions` (same names, same defaults)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(40, ge=1, le=200)
    shift: Optional[float] = Field(None, gt=0)
    text_scale: float = Field(5.0, ge=0)
    audio_scale: float = Field(4.0, ge=0)
    seed: int = 42
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    teacache_thresh: float = Field(0.0, ge=0)
    negative_prompt: Optional[str] = None

    def to_options(self) -> SamplingOptions:
        return SamplingOptions(**self.model_dump())


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


class JobRequest(BaseModel):
    """One talking-video job. ``image``/``audio`` are references into the store."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="Reference image: store key, file name or s3://bucket/key")
    audio: list[str] = Field(..., min_length=1, max_length=2, description="One or two speakers' audio")
    prompt: str = Field("", max_length=4000)
    audio_type: Literal["add", "para"] = "add"
    bbox: Optional[list[list[float]]] = Field(
        None, description="Per speaker [r0, c0, r1, c1] in image pixels, rows first"
    )
    mode: Literal["clip", "streaming"] = "clip"
    frames: int = Field(81, ge=5, le=1001, description="Frames per clip, 4n+1")
    size: str = Field(
        "multitalk-480", pattern=r"^multitalk-\d{2,4}$",
        description="multitalk-480, multitalk-720, or a scaled multitalk-N (32 <= N <= 2048; small N for CPU)",
    )
    motion_frames: int = Field(25, ge=1)
    color_correction: float = Field(1.0, ge=0, le=1)
    max_frames: int = Field(1000, ge=5)
    sampling: Sampling = Field(default_factory=Sampling)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("frames")
    @classmethod
    def _four_n_plus_one(cls, v):
        if (v - 1) % 4:
            raise ValueError("frames must be 4n+1 (e.g. 81)")
        return v

    @model_validator(mode="after")
    def _bbox_per_speaker(self):
        if self.bbox is not None:
            if len(self.bbox) != len(self.audio):
                raise InputError("bbox", "bbox needs one box per audio track")
            for box in self.bbox:
                if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3]:
                    raise InputError("bbox", "each bbox is [r0, c0, r1, c1] with r0 < r1 and c0 < c1")
        return self

    def input_fields(self) -> list[tuple[str, str]]:
        """(field name, reference) for every input. Names are the library's (and RunPod's):
        ``condition_image``, ``audio_1``, ``audio_2``; see :data:`NATIVE_FIELD_NAMES`."""
        return [("condition_image", self.image)] + [(f"audio_{i + 1}", a) for i, a in enumerate(self.audio)]

    def to_generation_request(self, image: bytes, audio: list[bytes]) -> GenerationRequest:
        return GenerationRequest(
            image=image,
            audio=audio,
            prompt=self.prompt,
            audio_type=self.audio_type,
            bbox=self.bbox,
            mode=self.mode,
            frames=self.frames,
            size=self.size,
            motion_frames=self.motion_frames,
            color_correction=self.color_correction,
            max_frames=self.max_frames,
            sampling=self.sampling.to_options(),
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


class SubmitResponse(BaseModel):
    id: str
    state: JobState
    status_url: str


# --- the RunPod contract --------------------------------------------------------------


class ModelCheckInput(BaseModel):
    action: Literal["model_check"]


class VolumeExploreInput(BaseModel):
    action: Literal["volume_explore"]
    path: str = Field("", description="Folder under the models root")
    max_depth: int = Field(3, ge=0, le=8)


class GenerateInput(BaseModel):
    """The predecessor's ``generate`` input plus the native options under their own names."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["generate"]
    audio_1: str
    audio_2: Optional[str] = None
    condition_image: str
    prompt: str = ""
    output_format: Literal["s3", "local"] = "s3"
    output_key: Optional[str] = None
    audio_type: Literal["add", "para"] = "add"
    bbox: Optional[list[list[float]]] = None
    mode: Literal["clip", "streaming"] = "clip"
    frames: int = 81
    size: str = Field("multitalk-480", pattern=r"^multitalk-\d{2,4}$")
    motion_frames: int = 25
    sampling: Sampling = Field(default_factory=Sampling)
    # Convenience aliases used by the official CLI.
    sample_steps: Optional[int] = None
    seed: Optional[int] = None

    def to_job_request(self) -> JobRequest:
        sampling = self.sampling.model_copy()
        if self.sample_steps is not None:
            sampling.steps = self.sample_steps
        if self.seed is not None:
            sampling.seed = self.seed
        return JobRequest(
            image=self.condition_image,
            audio=[self.audio_1] + ([self.audio_2] if self.audio_2 else []),
            prompt=self.prompt,
            audio_type=self.audio_type,
            bbox=self.bbox,
            mode=self.mode,
            frames=self.frames,
            size=self.size,
            motion_frames=self.motion_frames,
            sampling=sampling,
            output=OutputSpec(format=self.output_format, key=self.output_key),
        )


# Errors carry the library's field names (the RunPod contract's too); native API callers
# get them renamed to the fields of their JobRequest.
NATIVE_FIELD_NAMES = {
    "condition_image": "image", "audio_1": "audio[0]", "audio_2": "audio[1]",
    "steps": "sampling.steps", "seed": "sampling.seed",
}
RUNPOD_FIELD_NAMES = {"image": "condition_image", "audio[0]": "audio_1", "audio[1]": "audio_2",
                      "output.key": "output_key", "sampling.steps": "sample_steps"}

RunPodInput = Union[ModelCheckInput, VolumeExploreInput, GenerateInput]


class RunPodRequest(BaseModel):
    input: RunPodInput = Field(..., discriminator="action")
    webhook: Optional[str] = None  # accepted for compatibility, not called

    @model_validator(mode="before")
    @classmethod
    def _default_action(cls, data):
        # The predecessor's clients always sent an action; a bare generate input is
        # unambiguous enough to accept too.
        if isinstance(data, dict) and isinstance(data.get("input"), dict):
            inp = data["input"]
            if "action" not in inp and "audio_1" in inp:
                data = {**data, "input": {**inp, "action": "generate"}}
        return data


class RunPodStatus(BaseModel):
    id: str
    status: str
    output: Optional[Any] = None
    error: Optional[str] = None
    delayTime: Optional[int] = Field(None, description="ms from submit to start")
    executionTime: Optional[int] = Field(None, description="ms of execution")


class ErrorBody(BaseModel):
    error: ErrorInfo
