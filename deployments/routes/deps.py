"""FastAPI dependencies shared by the routers: the service, the caller's tenant, a job."""
from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import Depends, Request

from multitalk.api import InputError

from ..jobs import JobRecord
from ..service import JobService


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
