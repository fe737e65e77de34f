"""The OpenAI-style videos API (``/v1/videos``), mapped onto the native job model.

The shape video servers share (OpenAI's videos API, kept alive by vLLM-Omni, LiteLLM's
proxy, routers and Open WebUI's "OpenAI compatible" video connections): a create request
(multipart or JSON) becomes a native :class:`~deployments.schemas.JobRequest` body
(:func:`job_body`), a job record is answered as the OpenAI video object
(:func:`video_object`). The HTTP routes are in ``deployments/routes/videos.py``.

Request fields (:class:`VideoCreate`):

* ``prompt``, ``model`` (the served model's name: ``multitalk`` or ``infinitetalk``);
* the condition: ``input_reference`` (OpenAI: a file, or ``{"image_url": ...}``) or
  vLLM-Omni's ``image_reference`` (``{"image_url": ...}`` or a file); on an InfiniteTalk
  server a video to dub instead: ``video_reference`` (``{"video_url": ...}`` or a file; a
  video file given as ``input_reference`` counts too);
* the speech: ``audio_reference`` (``{"audio_url": ...}`` or a file) and, for a second
  speaker, ``audio_reference_2``; ``audio_type`` as natively;
* the length: ``seconds`` (a number of seconds: the nearest 4n+1 frames at 25 fps; up to
  ``limits.max_clip_frames`` one clip, longer a streaming video of at most that length) or
  vLLM-Omni's ``num_frames`` (4n+1); left out, the video is as long as the speech;
* the size: ``size`` ``"WxH"``, one of the official buckets' sizes (or a 480p/720p 16:9
  size), mapped to its bucket (``multitalk-480`` / ``-720``; the output's aspect follows the
  condition image, as the official does), or a bucket name; vLLM-Omni's ``width`` + ``height``
  the same way;
* vLLM-Omni's sampler fields: ``num_inference_steps``, ``guidance_scale`` (text),
  ``seed``, ``negative_prompt``, ``fps`` (25 only); and ``preset``.

A ``*_url`` may be a store key or file name, ``s3://bucket/key``, an http(s) URL of an
object in a bucket the input rules allow (a presigned URL: read with the service's own
credentials, never fetched from the open web) or a ``data:`` URL (stored like an upload).
Unknown values are a 422 naming the field.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import urllib.parse
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from multitalk.api import InputError, Limits
from multitalk.utils.image import BUCKETS

from .jobs import JobRecord
from .schemas import JobState

FPS = 25
# A reference string as the document describes it: the keys ``storage.validate_key`` accepts
# (no control characters, backslashes, %-escapes, absolute paths, '.', '..' or empty
# segments; surrounding whitespace stripped), less '%' and, in the first segment, ':' (an ``xx:`` prefix is read as a URL
# scheme). Written without look-aheads, which fuzzers' regex generators do not support.
_C = r"[^\x00-\x1f\x7f\\/%]"  # a key character
_D = r"[^\x00-\x1f\x7f\\/%.]"  # ... but '.'
_SEGMENT = rf"(?:{_D}{_C}*|\.{_D}{_C}*|\.\.{_C}+)"
_FIRST_C, _FIRST_D = _C.replace("%]", "%:]"), _D.replace("%.]", "%.:~]")
_FIRST = rf"(?:{_FIRST_D}{_FIRST_C}*|\.{_FIRST_D.replace('~', '')}{_FIRST_C}*|\.\.{_FIRST_C}+)"
REFERENCE_PATTERN = rf"^\s*{_FIRST}(?:/{_SEGMENT})*\s*$"  # surrounding whitespace is stripped
BUCKET_PATTERN = (r"^(multitalk|infinitetalk)-(3[2-9]|[4-9][0-9]|[1-9][0-9]{2}|1[0-9]{3}|20[0-3][0-9]|"
                  r"204[0-8])$")  # multitalk.utils.image: N from 32 to 2048


def _sizes() -> dict[str, str]:
    """``"WxH"`` → its resolution (480 or 720): every size of the official bucket tables, and
    the 16:9 sizes clients ask for at those resolutions."""
    out = {}
    for resolution in ("480", "720"):
        for h, w in BUCKETS[f"multitalk-{resolution}"].values():
            out[f"{w}x{h}"] = resolution
    for w, h, resolution in ((832, 480, "480"), (854, 480, "480"), (1280, 720, "720")):
        out[f"{w}x{h}"] = out[f"{h}x{w}"] = resolution
    return dict(sorted(out.items()))


SIZES = _sizes()

# Native field names (errors, ``JobRecord.error.field``) as this door's requests name them.
OPENAI_FIELD_NAMES = {
    "image": "input_reference", "video": "video_reference", "audio": "audio_reference",
    "audio[0]": "audio_reference", "audio[1]": "audio_reference_2", "frames": "seconds", "max_frames": "seconds",
    "mode": "seconds", "sampling.steps": "num_inference_steps", "sampling.text_scale": "guidance_scale",
    "sampling.seed": "seed", "sampling.negative_prompt": "negative_prompt",
}


def rename_error(e: InputError) -> InputError:
    return InputError(OPENAI_FIELD_NAMES.get(e.field, e.field), e.message, e.status)


class ImageReference(BaseModel):
    """OpenAI's ``input_reference`` object / vLLM-Omni's ``image_reference``."""

    model_config = ConfigDict(extra="forbid")
    image_url: str = Field(description="Store key or file name, s3:// URL, presigned URL of an allowed bucket, "
                                       "or data: URL")


class AudioReference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio_url: str = Field(description="Like image_url")


class VideoReference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    video_url: str = Field(description="Like image_url (InfiniteTalk servers: a video to dub)")


class VideoCreate(BaseModel):
    """``POST /v1/videos`` (JSON; the multipart form has the same fields, references as
    files or JSON text)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="What the video shows")
    model: Optional[str] = Field(None, description="The served model: multitalk or infinitetalk")
    seconds: Optional[str] = Field(None, pattern=r"^[0-9]{1,4}(\.[0-9]{1,3})?$",
                                   description="Length in seconds (nearest 4n+1 frames at 25 fps); left out: as long "
                                               "as the speech")
    size: Optional[str] = Field(None, description="'WxH' of an official bucket (e.g. 640x640, 832x480, 1280x720) "
                                                  "or a bucket name (multitalk-480); the aspect follows the image")
    input_reference: Optional[ImageReference] = None
    image_reference: Optional[ImageReference] = None
    video_reference: Optional[VideoReference] = None
    audio_reference: Optional[AudioReference] = None
    audio_reference_2: Optional[AudioReference] = Field(None, description="A second speaker")
    audio_type: Optional[Literal["add", "para"]] = None
    num_frames: Optional[int] = Field(None, ge=1, description="Frames (4n+1), instead of seconds")
    width: Optional[int] = Field(None, ge=1, description="With height: like size")
    height: Optional[int] = Field(None, ge=1)
    fps: Optional[int] = Field(None, ge=25, le=25, description="25 (the model's rate) only")
    num_inference_steps: Optional[int] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0, description="Text guidance scale")
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    preset: Optional[str] = None

    @field_validator("seconds", mode="before")
    @classmethod
    def _number_as_string(cls, v):
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


# --- request mapping ---------------------------------------------------------------------


def _frames_for(n: float) -> int:
    """The nearest 4n+1 frame count to ``n`` frames."""
    return max(1, int(round((n - 1) / 4.0)) * 4 + 1)


def _length_options(req: VideoCreate, model: str, limits: Limits) -> dict:
    if req.num_frames is not None:
        if req.seconds is not None:
            raise InputError("num_frames", "give seconds or num_frames, not both")
        if req.num_frames % 4 != 1:
            raise InputError("num_frames", f"must be 4n+1, got {req.num_frames}")
        frames = req.num_frames
    elif req.seconds is not None:
        seconds = float(req.seconds)
        if not 0 < seconds <= limits.max_audio_seconds:
            raise InputError("seconds", f"must be above 0 and at most {limits.max_audio_seconds:g} "
                                        f"(the longest speech this server takes), got {req.seconds}")
        frames = _frames_for(seconds * FPS)
    else:
        return {}
    field = "num_frames" if req.num_frames is not None else "seconds"
    if frames < limits.min_frames:
        raise InputError(field, f"is {frames} frames; the shortest video is {limits.min_frames} frames")
    if model == "multitalk" and frames <= limits.max_clip_frames:
        return {"mode": "clip", "frames": frames}
    return {"mode": "streaming", "max_frames": frames}  # InfiniteTalk always streams


def _size_option(req: VideoCreate, model: str) -> dict:
    if req.width is not None or req.height is not None:
        if req.size is not None or req.width is None or req.height is None:
            raise InputError("width", "give width and height together, or size")
        size, field = f"{req.width}x{req.height}", "width"
    elif req.size is None:
        return {}
    else:
        size, field = req.size, "size"
    if re.match(BUCKET_PATTERN, size):
        return {"size": size}
    if size not in SIZES:
        raise InputError(field, f"unknown size {size!r}: use the size of an official bucket (e.g. 640x640, 832x480, "
                                f"480x832, 960x960, 1280x720, 720x1280) or a bucket name ({model}-480, {model}-720)")
    return {"size": f"{model}-{SIZES[size]}"}


def _sampling_options(req: VideoCreate) -> dict:
    sampling = {}
    for name, native in (("num_inference_steps", "steps"), ("guidance_scale", "text_scale"), ("seed", "seed"),
                         ("negative_prompt", "negative_prompt")):
        if getattr(req, name) is not None:
            sampling[native] = getattr(req, name)
    return {"sampling": sampling} if sampling else {}


def job_body(req: VideoCreate, refs: dict[str, str], model: str, limits: Limits) -> dict:
    """The native job (a raw ``JobRequest`` object) ``req`` asks for, its media given as
    references (``refs``: field name → store key / ``s3://`` URL, see :func:`media_fields`).
    Options the request leaves out stay out: presets and server defaults apply."""
    if req.model is not None and req.model != model:
        raise InputError("model", f"this server serves {model!r}, not {req.model!r}")
    image = refs.get("input_reference") or refs.get("image_reference")
    if refs.get("input_reference") and refs.get("image_reference"):
        raise InputError("image_reference", "give input_reference or image_reference, not both")
    body: dict[str, Any] = {"prompt": req.prompt}
    if refs.get("video_reference"):
        if image:
            raise InputError("video_reference", "give an image (input_reference) or a video (video_reference), "
                                                "not both")
        body["video"] = refs["video_reference"]
    elif image:
        body["image"] = image
    else:
        raise InputError("input_reference", "required: the image to animate (or video_reference, a video to dub)")
    if not refs.get("audio_reference"):
        raise InputError("audio_reference", "required: the speech (audio_reference_2 for a second speaker)")
    body["audio"] = [refs["audio_reference"]] + ([refs["audio_reference_2"]] if refs.get("audio_reference_2") else [])
    for name in ("audio_type", "preset"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    body.update(_length_options(req, model, limits))
    body.update(_size_option(req, model))
    body.update(_sampling_options(req))
    return body


MEDIA_FIELDS = {"input_reference": "image_url", "image_reference": "image_url", "video_reference": "video_url",
                "audio_reference": "audio_url", "audio_reference_2": "audio_url"}
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


@dataclasses.dataclass
class Upload:
    """Media given inline (a ``data:`` URL), to be stored like an uploaded file."""

    filename: Optional[str]
    data: bytes


def reference_from_url(url: str, field: str, s3_endpoint: Optional[str]) -> Union[str, Upload]:
    """A ``*_url`` as a reference the input rules check: a key or ``s3://`` URL as it is; a
    ``data:`` URL as an :class:`Upload`; an http(s) URL of an S3 object (path style on the
    store's endpoint or on AWS, or a virtual-hosted AWS name) as ``s3://bucket/key``. Any
    other URL: 422 (the service fetches nothing from the open web)."""
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(field, "a data: URL must be base64 (data:<type>;base64,<data>)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(field, "the data: URL is not valid base64") from None
        subtype = header[5:].split(";")[0].partition("/")[2]
        ext = {"mpeg": "mp3", "x-wav": "wav", "wave": "wav", "quicktime": "mov"}.get(subtype, subtype)
        if not data:
            raise InputError(field, "the data: URL is empty")
        return Upload(f"upload.{ext}" if ext else None, data)
    if scheme in ("http", "https"):
        return _s3_url(url, field, s3_endpoint)
    return url


def _s3_url(url: str, field: str, s3_endpoint: Optional[str]) -> str:
    parts = urllib.parse.urlsplit(url)
    host, path = (parts.hostname or "").lower(), urllib.parse.unquote(parts.path).lstrip("/")
    endpoint_host = urllib.parse.urlsplit(s3_endpoint).hostname if s3_endpoint else None
    aws = re.match(r"^(?P<bucket>.+)\.s3([.-][a-z0-9-]+)*\.amazonaws\.com$", host)
    aws_path_style = re.match(r"^s3([.-][a-z0-9-]+)*\.amazonaws\.com$", host)
    if ((endpoint_host and host == endpoint_host.lower()) or aws_path_style) and "/" in path:
        bucket, _, key = path.partition("/")
    elif aws:
        bucket, key = aws.group("bucket"), path
    elif endpoint_host and host.endswith("." + endpoint_host.lower()):
        bucket, key = host[: -len(endpoint_host) - 1], path
    else:
        raise InputError(field, "only objects in the buckets this service reads are accepted by URL (a presigned "
                                "S3 URL), or a store key, s3:// URL or data: URL; other web addresses are not fetched")
    if not key:
        raise InputError(field, f"'{url}' names no object")
    return f"s3://{bucket}/{key}"


def parse_reference_text(text: str, field: str) -> Union[str, dict]:
    """A form field's text: a JSON object (``{"image_url": ...}``) or a bare URL/key."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            raise InputError(field, "not valid JSON") from None
        if not isinstance(value, dict):
            raise InputError(field, "must be a JSON object")
        return value
    return {MEDIA_FIELDS[field]: stripped}


# --- files ---------------------------------------------------------------------------------


def thumbnail_key(video_key: str) -> str:
    """``outputs/<id>.mp4`` → ``outputs/<id>.thumbnail.jpg``."""
    return (video_key[: -len(".mp4")] if video_key.endswith(".mp4") else video_key) + ".thumbnail.jpg"


def first_frame_jpeg(store, video_key: str) -> bytes:
    """The first frame of a stored mp4 as a JPEG (ffmpeg; the mp4 is streamed to a temporary
    file, so memory stays flat in the video's length)."""
    import subprocess
    import tempfile

    from multitalk.utils.ffmpeg import ffmpeg_exe, stderr_tail

    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        for chunk in store.stream(video_key):
            tmp.write(chunk)
        tmp.flush()
        proc = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", tmp.name, "-frames:v", "1", "-q:v", "3",
                               "-f", "image2pipe", "-c:v", "mjpeg", "pipe:1"], capture_output=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout.startswith(b"\xff\xd8"):
        raise RuntimeError(f"could not read the first frame of {video_key}: {stderr_tail(proc.stderr)}")
    return proc.stdout


# --- answers -------------------------------------------------------------------------------

_STATUS = {JobState.IN_QUEUE: "queued", JobState.IN_PROGRESS: "in_progress", JobState.COMPLETED: "completed",
           JobState.FAILED: "failed", JobState.CANCELLED: "failed"}


class VideoError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


class Video(BaseModel):
    """The OpenAI video object."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    model: str
    prompt: Optional[str] = None
    seconds: str = Field(description="The video's length once completed; before: a clip's length, or 'auto' (as "
                                     "long as the speech)")
    size: str = Field(description="'WxH' once completed; before: the size bucket")
    remixed_from_video_id: Optional[str] = None
    error: Optional[VideoError] = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


def progress_percent(rec: JobRecord) -> int:
    if rec.state == JobState.COMPLETED:
        return 100
    p = rec.progress
    if not p.total_steps:
        return 0
    return max(0, min(99, int(100 * p.step / p.total_steps)))


def _error(rec: JobRecord) -> Optional[VideoError]:
    if rec.state == JobState.CANCELLED:
        return VideoError(code="cancelled", message="the job was cancelled")
    if rec.state != JobState.FAILED or rec.error is None:
        return None
    e = rec.error
    code = "deadline_exceeded" if e.status == 504 else "invalid_input" if 400 <= e.status < 500 else "generation_failed"
    return VideoError(code=code, message=e.message,
                      param=OPENAI_FIELD_NAMES.get(e.field, e.field) if e.field else None)


def video_object(rec: JobRecord, model: str) -> Video:
    """A job record as the OpenAI video object."""
    request = rec.request
    if rec.state == JobState.COMPLETED and rec.result is not None:
        seconds, size = f"{rec.result.duration:g}", f"{rec.result.width}x{rec.result.height}"
    else:  # before the video exists: what the request fixes (a clip's frames, the size bucket)
        clip = request is not None and request.mode == "clip" and request.frames
        seconds = f"{request.frames / FPS:g}" if clip else "auto"
        size = request.size if request is not None else ""
    return Video(id=rec.id, status=_STATUS[rec.state], progress=progress_percent(rec), created_at=int(rec.created_at),
                 completed_at=int(rec.finished_at) if rec.finished_at and rec.state.terminal else None,
                 model=model, prompt=request.prompt if request is not None else None, seconds=seconds, size=size,
                 error=_error(rec))
