"""The browser front end at ``/`` (``deployments/web/index.html``: static, no build step),
the models report ``/v1/models`` and the health check ``/healthz``."""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from .. import volume
from ..service import JobService
from .deps import get_service

router = APIRouter()

WEB_PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"


@router.get("/", include_in_schema=False)
async def web_page():
    return FileResponse(WEB_PAGE, media_type="text/html")


@router.get("/v1/models", tags=["models"])
async def models(service: JobService = Depends(get_service)):
    """Which model components the models root holds (the RunPod ``model_check`` report)."""
    root = await service.models_root()
    return await asyncio.to_thread(volume.model_check, root or "")


@router.get("/healthz", tags=["health"])
async def healthz(service: JobService = Depends(get_service)):
    return service.health()
