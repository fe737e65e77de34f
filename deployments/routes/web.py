"""The browser front end at ``/`` (``deployments/web/index.html``: static, no build step),
its speaker-box helper ``/v1/speaker-boxes``, the models report ``/v1/models`` and the
health check ``/healthz``."""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from multitalk.api import InputError

from ..schemas import NATIVE_FIELD_NAMES
from ..service import JobService
from .deps import get_service
from .errors import ERROR_RESPONSES

router = APIRouter()

WEB_PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"


@router.get("/", include_in_schema=False)
async def web_page():
    return FileResponse(WEB_PAGE, media_type="text/html")


@router.get("/v1/models", tags=["models"])
async def models(service: JobService = Depends(get_service)):
    """Which model components the models root holds (the RunPod ``model_check`` report)."""
    return await service.models_report()


@router.get("/healthz", tags=["health"])
async def healthz(service: JobService = Depends(get_service)):
    return service.health()


_BOXES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "speakers"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   "speakers": {"type": "integer", "minimum": 1, "maximum": 4},
                   "speaker_order": {"type": "string", "description": "JSON list, e.g. [2, 1]"}}}}}}}


@router.post("/v1/speaker-boxes", tags=["jobs"], responses=ERROR_RESPONSES, openapi_extra=_BOXES_BODY)
async def speaker_boxes(request: Request, service: JobService = Depends(get_service)):
    """The speaker boxes a job without ``bbox`` would get for an uploaded condition image:
    ``{"width", "height", "faces": [{"box", "confidence"}], "boxes"}`` (``[r0, c0, r1, c1]``
    per speaker, image pixels, rows first). The web page draws them for the user to adjust;
    fewer faces than speakers answers 422 naming ``bbox``."""
    form = await request.form()
    image = form.get("image")
    if image is None or isinstance(image, str):
        raise InputError("image", "upload the condition image as a file")
    try:
        speakers = int(form.get("speakers") or "")
        order = json.loads(form["speaker_order"]) if form.get("speaker_order") else None
    except ValueError:
        raise InputError("speakers", "speakers must be a number and speaker_order a JSON list") from None
    try:
        return await service.speaker_boxes(await image.read(), speakers, order)
    except InputError as e:  # the native API's field names (image, not condition_image)
        raise InputError(NATIVE_FIELD_NAMES.get(e.field, e.field), e.message, e.status) from None
