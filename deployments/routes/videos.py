"""The OpenAI-style videos front door (mapping: ``deployments/openai_videos.py``).

* ``POST /v1/videos``                the video object (``queued``); multipart or JSON
* ``POST /v1/videos/sync``           the mp4 once done (vLLM-Omni's); still running after
                                     ``runsync_timeout_s``: 202 with the video object
* ``GET /v1/videos``                 ``{"object": "list", "data", "first_id", "last_id", "has_more"}``
* ``GET /v1/videos/{id}``            the video object (status, progress 0-100, error)
* ``GET /v1/videos/{id}/content``    the mp4; ``?variant=thumbnail``: its first frame, JPEG
* ``DELETE /v1/videos/{id}``         ``{"id", "object": "video.deleted", "deleted": true}``

Every video is a native job (``/v1/jobs/{id}`` shows the same one).
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from multitalk.api import InputError

from ..jobs import JobRecord
from ..openai_videos import (MEDIA_FIELDS, VIDEO_SUFFIXES, Upload, Video, VideoCreate, VideoDeleted, VideoList,
                             job_body, parse_reference_text, reference_from_url, rename_error, video_object)
from ..schemas import JobState, as_input_error
from ..service import JobService
from .deps import get_service, get_tenant, json_body, stored_file
from .errors import ERROR_RESPONSES, error_response

router = APIRouter(prefix="/v1/videos", tags=["videos (OpenAI-style)"])

_BRACKETED = re.compile(r"^(\w+)\[(\w+)\]$")  # the openai SDK's multipart form of an object field


async def _form_request(request: Request, service: JobService, tenant: Optional[str]) -> tuple[VideoCreate, dict]:
    """A multipart create request: its fields and the media it names (files stored)."""
    form = await request.form()
    fields: dict = {}
    refs: dict[str, str] = {}
    for key, value in form.multi_items():
        nested = _BRACKETED.match(key)
        if nested:  # input_reference[image_url]=...
            fields.setdefault(nested.group(1), {})[nested.group(2)] = value
        elif key in MEDIA_FIELDS and not isinstance(value, str):  # a file part
            name = "audio_reference_2" if key == "audio_reference" and "audio_reference" in refs else key
            if name in refs:
                raise InputError(key, "given twice")
            data = await value.read()
            if name == "input_reference" and _is_video(value.filename, value.content_type):
                name = "video_reference"
            refs[name] = await service.save_upload(name, value.filename, data, tenant)
        elif key in MEDIA_FIELDS:  # vLLM-Omni: the object as JSON text (or a bare URL)
            fields[key] = parse_reference_text(value, key)
        else:
            fields[key] = value
    return _validated(fields), refs


def _is_video(filename: Optional[str], content_type: Optional[str]) -> bool:
    return (content_type or "").startswith("video/") or (filename or "").lower().endswith(VIDEO_SUFFIXES)


def _validated(fields) -> VideoCreate:
    if not isinstance(fields, dict):
        raise InputError("body", "a JSON object is expected", 422)
    try:
        return VideoCreate.model_validate(fields)
    except ValidationError as e:
        raise as_input_error(e) from None


async def _resolve(req: VideoCreate, refs: dict[str, str], service: JobService, tenant: Optional[str]) -> dict:
    """The media given by URL, as references the input rules check (data: URLs stored)."""
    endpoint = getattr(service.store, "endpoint_url", None)
    for field, url_field in MEDIA_FIELDS.items():
        obj = getattr(req, field)
        if obj is None:
            continue
        if field in refs:
            raise InputError(field, "given both as a file and as a URL")
        ref = reference_from_url(getattr(obj, url_field), f"{field}.{url_field}", endpoint)
        if isinstance(ref, Upload):
            ref = await service.save_upload(field, ref.filename, ref.data, tenant)
        refs[field] = ref
    return refs


async def _create(request: Request, idempotency_key: Optional[str], service: JobService,
                  tenant: Optional[str]) -> JobRecord:
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            req, refs = await _form_request(request, service, tenant)
        else:
            req, refs = _validated(await json_body(request)), {}
        refs = await _resolve(req, refs, service, tenant)
        body = job_body(req, refs, service.settings.model, service.settings.limits)
        return await service.submit(body, idempotency_key=idempotency_key, source="openai", tenant=tenant)
    except InputError as e:
        raise rename_error(e) from None


@router.post("", response_model=Video, responses=ERROR_RESPONSES, openapi_extra={"x-multitalk-body": "videos"})
async def create_video(request: Request, idempotency_key: Optional[str] = Header(None),
                       service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """Queue a talking video: an image (``input_reference`` / ``image_reference``) and speech
    (``audio_reference``, ``audio_reference_2``); multipart (files or references) or JSON."""
    rec = await _create(request, idempotency_key, service, tenant)
    return video_object(rec, service.settings.model)


@router.post("/sync", responses={200: {"content": {"video/mp4": {}}}, 202: {"model": Video}, **ERROR_RESPONSES},
             response_class=Response, openapi_extra={"x-multitalk-body": "videos"})
async def create_video_sync(request: Request, idempotency_key: Optional[str] = Header(None),
                            service: JobService = Depends(get_service),
                            tenant: Optional[str] = Depends(get_tenant)):
    """Like ``POST /v1/videos``, answered with the mp4 once it is done (up to the server's
    ``runsync_timeout_s``; still running then: 202 with the video object, which keeps
    rendering). A failed job answers its error."""
    rec = await _create(request, idempotency_key, service, tenant)
    rec = await service.wait(rec.id, service.settings.runsync_timeout_s)
    if rec.state == JobState.COMPLETED:
        return await stored_file(service, rec, rec.result.key, "video/mp4", f"{rec.id}.mp4")
    video = video_object(rec, service.settings.model)
    if rec.state.terminal:
        status = rec.error.status if rec.state == JobState.FAILED and rec.error is not None else 409
        return error_response(status if 400 <= status < 600 else 500, video.error.message, video.error.param)
    return JSONResponse(video.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/videos/{rec.id}"})


UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


@router.get("", response_model=VideoList, responses=ERROR_RESPONSES)
async def list_videos(limit: int = Query(20, ge=1, le=100),
                      after: Optional[str] = Query(None, pattern=UUID_PATTERN, description="The last id of the page "
                                                                                         "before"),
                      order: Literal["desc"] = Query("desc", description="Newest first (the only order kept)"),
                      service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """The caller's videos, newest first; ``after=<last_id>`` for the next page."""
    page, cursor = await service.recent_after_job(tenant, limit, after)
    data = [video_object(r, service.settings.model) for r in page if r.action == "generate" and r.request]
    return VideoList(data=data, first_id=data[0].id if data else None, last_id=page[-1].id if page else None,
                     has_more=cursor is not None)


@router.get("/{video_id}", response_model=Video, responses=ERROR_RESPONSES)
async def retrieve_video(video_id: str, service: JobService = Depends(get_service),
                         tenant: Optional[str] = Depends(get_tenant)):
    return video_object(await service.get_for(video_id, tenant), service.settings.model)


@router.delete("/{video_id}", response_model=VideoDeleted, responses=ERROR_RESPONSES)
async def delete_video(video_id: str, service: JobService = Depends(get_service),
                       tenant: Optional[str] = Depends(get_tenant)):
    """Delete the video, its files and its job (an unfinished one is cancelled first)."""
    await service.delete(video_id, tenant)
    return VideoDeleted(id=video_id)


@router.get("/{video_id}/content", response_class=Response,
            responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}}, **ERROR_RESPONSES})
async def video_content(video_id: str, variant: Literal["video", "thumbnail"] = "video",
                        service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """The finished mp4 (H.264 + AAC); ``variant=thumbnail``: its first frame as a JPEG."""
    rec = await service.get_for(video_id, tenant)
    if rec.state != JobState.COMPLETED or rec.result is None:
        raise InputError("video_id", f"the video is {video_object(rec, service.settings.model).status}, "
                                     f"no content yet", 409)
    if variant == "thumbnail":
        return Response(await service.thumbnail(rec), media_type="image/jpeg",
                        headers={"Content-Disposition": f'inline; filename="{rec.id}.jpg"'})
    return await stored_file(service, rec, rec.result.key, "video/mp4", f"{rec.id}.mp4")
