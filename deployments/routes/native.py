"""The native job API: ``/v1/jobs``.

* ``POST /v1/jobs``            202 ``{id, state, status_url}``; JSON :class:`JobRequest`, or multipart
                               with files ``image``, ``audio`` (1-2, or ``audio_2``) and a
                               ``request`` field holding the JSON options. ``Idempotency-Key`` header.
* ``GET /v1/jobs``             recent jobs, newest first (``?limit=20&after=<cursor>``)
* ``GET /v1/jobs/{id}``        :class:`JobStatus` (state, progress, timings, result + URL, error)
* ``DELETE /v1/jobs/{id}``     cancel (also stops the in-flight stage calls)
* ``GET /v1/jobs/{id}/video``  the mp4
"""
from __future__ import annotations

import json
from typing import Optional

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from multitalk.api import InputError

from ..jobs import JobRecord
from ..schemas import JobState, JobStatus, SubmitResponse
from ..service import JobService
from ..storage import LocalStore, NotFound
from .deps import get_job, get_service, get_tenant, json_body
from .errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_MULTIPART_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "audio": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "audio_2": {"type": "string", "format": "binary"},
                        "request": {"type": "string", "description": "JobRequest JSON without image/audio"},
                    },
                    "required": ["image", "audio"],
                }
            },
        },
        "required": True,
    }
}


@router.post("", status_code=202, response_model=SubmitResponse, responses=ERROR_RESPONSES,
             openapi_extra=_MULTIPART_BODY)
async def submit_job(request: Request, idempotency_key: Optional[str] = Header(None),
                     service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """Queue a job. JSON body: a JobRequest with references; multipart: uploaded files."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        job = await _from_multipart(request, service, tenant)
    else:
        job = await json_body(request)
        if not isinstance(job, dict):
            raise InputError("body", "a JobRequest JSON object is expected", 422)
    rec = await service.submit(job, idempotency_key=idempotency_key, source="api", tenant=tenant)
    return SubmitResponse(id=rec.id, state=rec.state, status_url=f"/v1/jobs/{rec.id}")


async def _upload_or_reference(service: JobService, name: str, item, tenant: Optional[str]) -> str:
    """A multipart item: a reference given as a plain form field, or a file to store."""
    if isinstance(item, str):
        return item
    return await service.save_upload(name, item.filename, await item.read(), tenant)


async def _from_multipart(request: Request, service: JobService, tenant: Optional[str]) -> dict:
    """The job's raw JSON object: the ``request`` form field with the uploaded files' keys."""
    form = await request.form()
    try:
        options = json.loads(form.get("request") or "{}")
    except json.JSONDecodeError:
        raise InputError("request", "form field 'request' is not valid JSON", 400)
    if not isinstance(options, dict):
        raise InputError("request", "form field 'request' must be a JSON object", 400)
    image = form.get("image")
    if image is None:
        if "image" not in options:
            raise InputError("image", "missing image file")
        image_ref = options["image"]
    else:
        image_ref = await _upload_or_reference(service, "image", image, tenant)
    audios = list(form.getlist("audio"))
    if form.get("audio_2") is not None:
        audios.append(form.get("audio_2"))
    audio_refs = [await _upload_or_reference(service, f"audio[{i}]", a, tenant) for i, a in enumerate(audios)]
    if not audio_refs:
        audio_refs = options.get("audio") or []
    if not audio_refs:
        raise InputError("audio", "missing audio file")
    return {**options, "image": image_ref, "audio": audio_refs}


@router.get("")
async def list_jobs(limit: int = Query(20, ge=1, le=200), after: Optional[str] = None,
                    service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """Recent jobs, newest first: ``{"jobs": [{id, state, created_at, finished_at, progress,
    prompt, video_url, error}], "next": cursor}``; pass ``after=<next>`` for the page after.
    Reads one page of records from the store's index."""
    page, cursor = await service.recent(tenant, limit, after)
    return {"jobs": [{
        "id": r.id, "state": r.state.value, "action": r.action, "created_at": r.created_at,
        "finished_at": r.finished_at, "progress": r.progress.model_dump(),
        "prompt": r.request.prompt if r.request is not None else None,
        "video_url": r.result.video_url if r.result is not None else None,
        "error": r.error.message if r.error is not None else None,
    } for r in page], "next": cursor}


@router.get("/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES)
async def get_job_status(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    return (await service.refresh_url(rec)).status()


@router.delete("/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES)
async def cancel_job(job_id: str, service: JobService = Depends(get_service),
                     tenant: Optional[str] = Depends(get_tenant)):
    return (await service.cancel(job_id, tenant)).status()


@router.get("/{job_id}/video", responses={200: {"content": {"video/mp4": {}}}, **ERROR_RESPONSES},
            response_class=StreamingResponse)
async def get_video(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    if rec.state != JobState.COMPLETED or rec.result is None:
        raise InputError("id", f"job is {rec.state.value}, no video yet", 409)
    store, key = service.video_location(rec)
    headers = {"Content-Disposition": f'inline; filename="{rec.id}.mp4"'}
    if isinstance(store, LocalStore):
        return FileResponse(store.path(key), media_type="video/mp4", headers=headers)
    try:
        chunks = store.stream(key)
    except NotFound:
        raise InputError("id", "video missing from the store", 404)
    return StreamingResponse(chunks, media_type="video/mp4", headers=headers)
