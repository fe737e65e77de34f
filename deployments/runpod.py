"""The predecessor's RunPod contract, mapped onto the native job API.

Requests are ``{"input": {"action": ...}, "webhook": ...}``:

* ``model_check`` / ``volume_explore``: answered at once from the models volume, kept as
  finished job records (:data:`ACTIONS`);
* ``generate``: the predecessor's fields (``audio_1``, ``audio_2``, ``condition_image``,
  ``output_format``, ``output_key``) plus every native option under its own name
  (:class:`GenerateInput`, derived like :class:`~deployments.schemas.JobRequest` from the
  library's request type), mapped onto a ``JobRequest`` by :meth:`GenerateInput.to_job_request`.

Answers have RunPod's ``/status`` shape (:func:`runpod_status`); ``/stream`` items
(:func:`stream_outputs`), ``/health`` (:func:`runpod_health`) and ``/purge-queue`` their
own. The HTTP routes (the root ones and RunPod's serverless ``/v2/{endpoint_id}/...``) are in
``deployments/routes/runpod.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from multitalk.api import InputError
from multitalk.utils.dialogue import TTS_AUDIO_FIELDS, speech_from_tts_audio

from . import volume
from .jobs import JobRecord
from .schemas import OPTION_NAMES, JobRequest, JobState, option_fields

# Errors carry the library's field names; RunPod callers get them in their input's names.
RUNPOD_FIELD_NAMES = {"image": "condition_image", "video": "condition_video", "audio[0]": "audio_1", "audio[1]": "audio_2",
                      "audio[2]": "audio_3", "audio[3]": "audio_4",
                      "output.key": "output_key", "sampling.steps": "sample_steps", **TTS_AUDIO_FIELDS}


class ModelCheckInput(BaseModel):
    action: Literal["model_check"]


class VolumeExploreInput(BaseModel):
    action: Literal["volume_explore"]
    path: str = Field("", description="Folder under the models root")
    max_depth: int = Field(3, ge=0, le=8, strict=True)


class _GenerateFields(BaseModel):
    """The predecessor's ``generate`` fields; :class:`GenerateInput` adds the native options."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["generate"]
    audio_1: Optional[str] = None  # or tts_audio
    audio_2: Optional[str] = None
    audio_3: Optional[str] = None  # three and four speakers: beyond what the model was trained on
    audio_4: Optional[str] = None
    # The official examples' text to speech: {text, human1_voice[, human2_voice]} (multitalk.api).
    tts_audio: Optional[dict[str, Any]] = None
    condition_image: Optional[str] = None
    condition_video: Optional[str] = None  # InfiniteTalk video-to-video: the source video to dub
    output_format: Literal["s3", "local"] = "s3"
    output_key: Optional[str] = None
    # Convenience aliases of the official CLI.
    sample_steps: Optional[int] = None
    seed: Optional[int] = None

    preset: Optional[str] = None

    def to_job_body(self) -> dict:
        """The native job this input asks for, as a raw JobRequest object (the one mapping
        between the two contracts; options the input leaves out stay out, so presets and
        server defaults still apply to them)."""
        body = {name: getattr(self, name) for name in OPTION_NAMES if name in self.model_fields_set}
        sampling = body.pop("sampling", None)
        sampling = {} if sampling is None else dict(vars(sampling))
        if self.sample_steps is not None:
            sampling["steps"] = self.sample_steps
        if self.seed is not None:
            sampling["seed"] = self.seed
        if sampling:
            body["sampling"] = sampling
        if self.preset is not None:
            body["preset"] = self.preset
        if self.tts_audio is not None:
            if self.audio_1 is not None:
                raise InputError("audio_1", "give either audio_1 or tts_audio, not both")
            body["speech"] = vars(speech_from_tts_audio(self.tts_audio))
        elif self.audio_1 is None:
            raise InputError("audio_1", "required (or tts_audio: text with voices)")
        visual = {"image": self.condition_image} if self.condition_video is None else {"video": self.condition_video}
        if self.condition_video is not None and self.condition_image is not None:
            raise InputError("condition_video", "give condition_image or condition_video, not both")
        return {
            **body,
            **visual,
            "audio": self._audio_list(),
            "output": {"format": self.output_format, "key": self.output_key},
        }

    def _audio_list(self) -> list[str]:
        audios = [self.audio_1, self.audio_2, self.audio_3, self.audio_4]
        for i in range(1, len(audios)):
            if audios[i] and not audios[i - 1]:
                raise InputError(f"audio_{i + 1}", f"given without audio_{i}: number the speakers from audio_1 up")
        return [a for a in audios if a]

    def to_job_request(self) -> JobRequest:
        return JobRequest.model_validate(self.to_job_body())


GenerateInput = create_model(
    "GenerateInput", __base__=_GenerateFields, __module__=__name__,
    __doc__="The predecessor's generate input plus the native options under their own names.",
    **option_fields(),
)

RunPodInput = Union[ModelCheckInput, VolumeExploreInput, GenerateInput]


class RunPodRequest(BaseModel):
    input: RunPodInput = Field(..., discriminator="action")
    webhook: Optional[str] = None  # the final status is POSTed there once (deployments/webhooks.py)

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


RunPodState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]


class RunPodStatus(BaseModel):
    id: str
    status: RunPodState
    output: Optional[Any] = None
    error: Optional[str] = None
    delayTime: Optional[int] = Field(None, description="ms from submit to start")
    executionTime: Optional[int] = Field(None, description="ms of execution")


def _volume_explore(models_root: str, params: dict) -> dict:
    return volume.volume_explore(models_root, params.get("path", ""), params.get("max_depth", 3))


# The actions answered at once: name -> fn(models_root, params) -> output (blocking).
ACTIONS: dict[str, Callable[[str, dict], dict]] = {
    "model_check": lambda root, params: volume.model_check(root),
    "volume_explore": _volume_explore,
}


def _generate_output(rec: JobRecord) -> dict:
    r = rec.result
    output = {
        "status": "success",
        "output_format": r.store,
        "video_key": r.key,
        "video_url": r.url,
        "frames": r.frames,
        "duration": r.duration,
        "fps": r.fps,
        "width": r.width,
        "height": r.height,
        "timings": rec.timings,
        "options_applied": rec.options_applied,
    }
    if r.store == "s3":
        output["s3_key"] = r.key
    if r.path:
        output["local_path"] = r.path
    if r.speech_key:
        output["speech_key"], output["speech_url"] = r.speech_key, r.speech_url
    if r.boxes is not None:
        output["boxes"], output["boxes_source"] = r.boxes, r.boxes_source
    return output


def runpod_state(rec: JobRecord) -> str:
    """RunPod's state of a job: ours, except a job past its deadline (``job_timeout_s``,
    failed with status 504) is ``TIMED_OUT``."""
    if rec.state == JobState.FAILED and rec.error is not None and rec.error.status == 504:
        return "TIMED_OUT"
    return rec.state.value


def runpod_status(rec: JobRecord) -> RunPodStatus:
    """A job record in the predecessor's ``/status`` shape."""
    output = None
    error = None
    if rec.state == JobState.COMPLETED:
        output = _generate_output(rec) if rec.action == "generate" and rec.result is not None else rec.output
    elif rec.state == JobState.FAILED and rec.error is not None:
        error = f"{rec.error.field}: {rec.error.message}" if rec.error.field else rec.error.message
    elif rec.state in (JobState.IN_QUEUE, JobState.IN_PROGRESS):
        output = {"progress": rec.progress.model_dump()}
    delay = int((rec.started_at - rec.created_at) * 1000) if rec.started_at else None
    exe = int((rec.finished_at - rec.started_at) * 1000) if rec.started_at and rec.finished_at else None
    return RunPodStatus(id=rec.id, status=runpod_state(rec), output=output, error=error,
                        delayTime=delay, executionTime=exe)


class StreamItem(BaseModel):
    output: dict[str, Any]


class RunPodStream(BaseModel):
    """``/stream/{id}``: the results produced since the previous call."""

    id: str
    status: RunPodState
    stream: list[StreamItem]


def stream_outputs(rec: JobRecord, start: int, url: Callable[[str], str]) -> list[dict]:
    """The job's results from the ``start``-th on, as RunPod stream outputs: each finished
    chunk of a streaming job (its fMP4 segment; ``init_url`` first, then the segments in
    order play), then, once the job COMPLETED, its final output (the ``/status`` one).
    ``url(key)``: a URL a client can fetch the stored segment from."""
    from .chunk_results import INIT_NAME, stored_prefix

    items: list[dict] = []
    chunks = list(rec.chunks)
    for chunk in chunks[start:]:
        items.append({"chunk": chunk.index, "total_chunks": rec.progress.total_chunks, "frames": chunk.frames,
                      "frames_so_far": chunk.frames_so_far, "start": chunk.start, "duration": chunk.duration,
                      "segment_key": chunk.key, "segment_url": url(chunk.key),
                      "init_url": url(stored_prefix(chunks) + INIT_NAME), "partial_video_url": f"/v1/jobs/{rec.id}/video"})
    if rec.state == JobState.COMPLETED and start <= len(chunks):
        items.append(runpod_status(rec).output or {})
    return items


class RunPodHealth(BaseModel):
    jobs: dict[str, int] = Field(description="completed, failed, retried (this replica, since it started), "
                                             "inQueue, inProgress (every replica)")
    workers: dict[str, int] = Field(description="idle and running job slots of this replica (max_concurrent_jobs)")


def runpod_health(counts: dict[str, int]) -> RunPodHealth:
    """``/health`` from :meth:`~deployments.service.JobService.job_counts`."""
    return RunPodHealth(
        jobs={"completed": counts["completed"], "failed": counts["failed"], "inProgress": counts["running"],
              "inQueue": counts["queued"], "retried": counts["retried"]},
        workers={"idle": max(0, counts["slots"] - counts["slots_busy"]), "running": counts["slots_busy"]})


class RunPodPurge(BaseModel):
    removed: int
    status: Literal["completed"] = "completed"
