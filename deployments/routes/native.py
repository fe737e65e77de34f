"""The native job API: ``/v1/jobs``.

* ``POST /v1/jobs``            202 ``{id, state, status_url}``; JSON :class:`JobRequest`, or multipart
                               with files ``image``, ``audio`` (1-4, or ``audio_2``..``audio_4``) and a
                               ``request`` field holding the JSON options. ``Idempotency-Key`` header.
* ``GET /v1/jobs``             recent jobs, newest first (``?limit=20&after=<cursor>``)
* ``GET /v1/jobs/{id}``        :class:`JobStatus` (state, progress, timings, result + URL, error)
* ``DELETE /v1/jobs/{id}``     cancel (also stops the in-flight stage calls)
* ``GET /v1/jobs/{id}/video``  the mp4 (while a streaming job runs: its finished chunks, fMP4)
* ``GET /v1/jobs/{id}/chunks/index.m3u8`` the finished chunks as an HLS playlist
* ``GET /v1/jobs/{id}/speech`` text-to-speech jobs: the synthesised speech (16 kHz wav)
"""
from __future__ import annotations

import asyncio
import json
from typing import Optional

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from multitalk.api import InputError

from multitalk.utils.segments import hls_playlist

from ..chunk_results import INIT_NAME, partial_video, segment_name, stored_prefix
from ..jobs import CURSOR_PATTERN, JobRecord
from ..schemas import JobState, JobStatus, SubmitResponse
from ..service import JobService
from ..storage import NotFound
from .deps import get_job, get_service, get_tenant, json_body, stored_file
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
                        "video": {"type": "string", "format": "binary", "description": "InfiniteTalk: a video to dub"},
                        "audio": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "audio_2": {"type": "string", "format": "binary"},
                        "audio_3": {"type": "string", "format": "binary"},
                        "audio_4": {"type": "string", "format": "binary"},
                        "request": {"type": "string", "description": "JobRequest JSON without image/audio"},
                    },
                    "required": ["audio"],
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
    visual = {}
    for name in ("image", "video"):  # an image (image-to-video) or a source video (InfiniteTalk)
        item = form.get(name)
        if item is not None:
            visual[name] = await _upload_or_reference(service, name, item, tenant)
        elif name in options:
            visual[name] = options[name]
    if not visual:
        raise InputError("image", "missing image file (or video, a source video to dub)")
    audios = list(form.getlist("audio"))
    for name in ("audio_2", "audio_3", "audio_4"):
        if form.get(name) is not None:
            audios.append(form.get(name))
    audio_refs = [await _upload_or_reference(service, f"audio[{i}]", a, tenant) for i, a in enumerate(audios)]
    if not audio_refs:
        audio_refs = options.get("audio") or []
    if not audio_refs and "speech" not in options:
        raise InputError("audio", "missing audio file (or speech: text to speak)")
    return {**options, **visual, "audio": audio_refs}


@router.get("")
async def list_jobs(limit: int = Query(20, ge=1, le=200),
                    after: Optional[str] = Query(None, pattern=CURSOR_PATTERN, description="'next' of the page before"),
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
    """The finished mp4; before that (and after a late failure) the chunks finished so far of
    a streaming job, as one fragmented MP4 that plays (``X-MultiTalk-Chunks: done/total``)."""
    if rec.state == JobState.COMPLETED and rec.result is not None:
        return await stored_file(service, rec, rec.result.key, "video/mp4", f"{rec.id}.mp4")
    if rec.chunks:
        chunks = list(rec.chunks)  # a snapshot: the live list grows while the job runs
        headers = {"Content-Disposition": f'inline; filename="{rec.id}.partial.mp4"', "Cache-Control": "no-store",
                   "X-MultiTalk-Chunks": f"{len(chunks)}/{rec.progress.total_chunks}"}
        return StreamingResponse(partial_video(service.output_store(rec), chunks), media_type="video/mp4",
                                 headers=headers)
    raise InputError("id", f"job is {rec.state.value}, no video yet", 409)


@router.get("/{job_id}/chunks/{name}", responses={200: {"content": {"application/vnd.apple.mpegurl": {},
                                                                   "video/mp4": {}, "video/iso.segment": {}}},
                                                   **ERROR_RESPONSES})
async def get_chunk(name: str = Path(..., description="index.m3u8, init.mp4 or NNNNN.m4s (others: 404)"),
                    rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    """A streaming job's chunks for HLS players: ``index.m3u8`` (the playlist: EVENT while
    the job runs, VOD once it has ended), ``init.mp4`` and ``NNNNN.m4s``."""
    if not rec.chunks:
        raise InputError("id", f"job is {rec.state.value} and has no finished chunks", 409 if rec.state in (
            JobState.IN_QUEUE, JobState.IN_PROGRESS) else 404)
    if name == "index.m3u8":
        playlist = hls_playlist(list(rec.chunks), ended=rec.state.terminal, init_uri=INIT_NAME,
                                segment_uri="{index:05d}.m4s")
        return Response(playlist, media_type="application/vnd.apple.mpegurl", headers={"Cache-Control": "no-store"})
    prefix = stored_prefix(rec.chunks)
    if name != INIT_NAME and name not in {segment_name(c.index) for c in rec.chunks}:
        raise InputError("name", f"no chunk {name!r} (finished: {len(rec.chunks)})", 404)
    try:
        data = await asyncio.to_thread(service.output_store(rec).get, prefix + name)
    except NotFound:
        raise InputError("name", f"{name} missing from the store", 404)
    return Response(data, media_type="video/mp4" if name == INIT_NAME else "video/iso.segment")


@router.get("/{job_id}/speech", responses={200: {"content": {"audio/wav": {}}}, **ERROR_RESPONSES},
            response_class=StreamingResponse)
async def get_speech(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    if rec.state != JobState.COMPLETED or rec.result is None:
        raise InputError("id", f"job is {rec.state.value}, no speech yet", 409)
    if not rec.result.speech_key:
        raise InputError("id", "this job spoke no text (it was given audio)", 404)
    return await stored_file(service, rec, rec.result.speech_key, "audio/wav", f"{rec.id}.speech.wav")
