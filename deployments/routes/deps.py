"""FastAPI dependencies shared by the routers: the service, the caller's tenant, a job."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from fastapi import Depends, Request
from fastapi.responses import FileResponse, StreamingResponse

from multitalk.api import InputError

from ..jobs import JobRecord
from ..service import JobService
from ..storage import LocalStore, NotFound


def get_service(request: Request) -> JobService:
    return request.app.state.service


def get_tenant(request: Request) -> Optional[str]:
    """The API-key tenant :class:`~deployments.auth.AuthMiddleware` authenticated (None: open)."""
    return getattr(request.state, "tenant", None)


async def get_job(job_id: str, service: JobService = Depends(get_service),
                  tenant: Optional[str] = Depends(get_tenant)) -> JobRecord:
    """The path's job, if it exists (404) and the caller's tenant may see it (403)."""
    return await service.get_for(job_id, tenant)


async def json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("body", "body is not valid JSON", 400)


async def stored_file(service: JobService, rec: JobRecord, key: str, media_type: str, filename: str):
    """A result file from the job's store, streamed (a local store's file served directly)."""
    store, _ = service.video_location(rec)
    headers = {"Content-Disposition": f'inline; filename="{filename}"'}
    if isinstance(store, LocalStore):
        return FileResponse(store.path(key), media_type=media_type, headers=headers)
    try:  # the S3 request opens in a worker thread; Starlette reads the body's chunks in its threadpool
        chunks = await asyncio.to_thread(store.stream, key)
    except NotFound:
        raise InputError("id", f"{filename} missing from the store", 404)
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
