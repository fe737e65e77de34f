"""The predecessor's RunPod routes: ``POST /run``, ``POST /runsync``, ``GET /status/{id}``,
``POST /cancel/{id}`` (contract and mapping: ``deployments/runpod.py``)."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, Header, Query
from pydantic import ValidationError

from ..jobs import JobRecord
from ..runpod import ACTIONS, RunPodRequest, RunPodStatus, runpod_status
from ..service import JobService
from .deps import get_job, get_service, get_tenant, json_body
from .errors import ERROR_RESPONSES, as_input_error

router = APIRouter(tags=["runpod"])


async def _submit(body: Any, idempotency_key: Optional[str], service: JobService,
                  tenant: Optional[str]) -> JobRecord:
    try:
        req = RunPodRequest.model_validate(body)
    except ValidationError as e:
        raise as_input_error(e) from None
    inp = req.input
    if inp.action != "generate":
        return await service.run_action(inp.action, inp.model_dump(exclude={"action"}), ACTIONS[inp.action],
                                        idempotency_key, tenant)
    body = inp.to_job_body()
    if req.webhook:
        body["webhook"] = req.webhook
    return await service.submit(body, idempotency_key=idempotency_key, source="runpod", tenant=tenant)


@router.post("/run", response_model=RunPodStatus, responses=ERROR_RESPONSES)
async def run(body: Any = Depends(json_body), idempotency_key: Optional[str] = Header(None),
              service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """RunPod async submit: answers ``{"id", "status"}`` at once."""
    rec = await _submit(body, idempotency_key, service, tenant)
    return runpod_status(rec) if rec.state.terminal else RunPodStatus(id=rec.id, status=rec.state.value)


@router.post("/runsync", response_model=RunPodStatus, responses=ERROR_RESPONSES)
async def runsync(body: Any = Depends(json_body), idempotency_key: Optional[str] = Header(None),
                  wait: Optional[float] = Query(None, ge=0, description="Seconds to wait (default: server setting)"),
                  service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """RunPod sync submit: waits (up to a timeout), then answers like ``/status``."""
    rec = await _submit(body, idempotency_key, service, tenant)
    limit = service.settings.runsync_timeout_s
    rec = await service.wait(rec.id, limit if wait is None else min(wait, limit))
    return runpod_status(await service.refresh_url(rec))


@router.get("/status/{job_id}", response_model=RunPodStatus, responses=ERROR_RESPONSES)
async def status(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    return runpod_status(await service.refresh_url(rec))


@router.post("/cancel/{job_id}", response_model=RunPodStatus, responses=ERROR_RESPONSES)
async def cancel(job_id: str, service: JobService = Depends(get_service),
                 tenant: Optional[str] = Depends(get_tenant)):
    return runpod_status(await service.cancel(job_id, tenant))
