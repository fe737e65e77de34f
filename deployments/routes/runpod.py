"""The RunPod front door (contract and mapping: ``deployments/runpod.py``).

The same operations twice: at the root, as the predecessor's clients call them (``POST
/run``, ``/runsync``, ``GET /status/{id}``, ``POST /cancel/{id}``, ...), and under RunPod's
serverless URLs, ``/v2/{endpoint_id}/run`` etc., so that the ``runpod`` SDK works unchanged
with ``RUNPOD_ENDPOINT_BASE_URL=http://<server>/v2``. The endpoint id is any name, or the
configured ``runpod_endpoint_id`` only.

* ``POST run``              queue a job: ``{"id", "status": "IN_QUEUE"}``
* ``POST runsync``          queue and wait (up to ``runsync_timeout_s``), then like ``status``
* ``GET status/{id}``       ``{"id", "status", "output" | "error", "delayTime", "executionTime"}``
* ``GET stream/{id}``       the results produced since the previous call: a streaming job's
                            finished chunks, then the final output
* ``POST cancel/{id}``      cancel; the status
* ``POST retry/{id}``       run a FAILED/CANCELLED/TIMED_OUT job again (same id and input)
* ``POST purge-queue``      cancel every job not yet started: ``{"removed", "status"}``
* ``GET health``            ``{"jobs": {...}, "workers": {...}}``
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Depends, Header, Path, Query

from multitalk.api import InputError

from ..jobs import JobRecord
from ..runpod import (ACTIONS, RunPodHealth, RunPodPurge, RunPodRequest, RunPodStatus, RunPodStream, runpod_health,
                      runpod_state, runpod_status, stream_outputs)
from ..service import JobService
from .deps import get_job, get_service, get_tenant
from .errors import ERROR_RESPONSES


async def _submit(req: RunPodRequest, idempotency_key: Optional[str], service: JobService,
                  tenant: Optional[str]) -> JobRecord:
    inp = req.input
    if inp.action != "generate" and req.webhook is not None:
        raise InputError("webhook", f"webhooks are sent for generate jobs; {inp.action} answers at once")
    if inp.action != "generate":
        return await service.run_action(inp.action, inp.model_dump(exclude={"action"}), ACTIONS[inp.action],
                                        idempotency_key, tenant)
    body = inp.to_job_body()
    if req.webhook is not None:
        body["webhook"] = req.webhook
    return await service.submit(body, idempotency_key=idempotency_key, source="runpod", tenant=tenant)


async def run(body: RunPodRequest, idempotency_key: Optional[str] = Header(None),
              service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """RunPod async submit: answers ``{"id", "status"}`` at once."""
    rec = await _submit(body, idempotency_key, service, tenant)
    return runpod_status(rec) if rec.state.terminal else RunPodStatus(id=rec.id, status=rec.state.value)


async def runsync(body: RunPodRequest, idempotency_key: Optional[str] = Header(None),
                  wait: Optional[float] = Query(None, ge=0, description="Seconds to wait (default and cap: the "
                                                                        "server's runsync_timeout_s)"),
                  service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """RunPod sync submit: waits (up to a timeout), then answers like ``/status``."""
    rec = await _submit(body, idempotency_key, service, tenant)
    limit = service.settings.runsync_timeout_s
    rec = await service.wait(rec.id, limit if wait is None else min(wait, limit))
    return runpod_status(await service.refresh_url(rec))


async def status(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    return runpod_status(await service.refresh_url(rec))


async def stream(rec: JobRecord = Depends(get_job), service: JobService = Depends(get_service)):
    """The results produced since the previous call (RunPod's stream semantics: the SDK's
    ``Job.stream()`` yields each once): a streaming job's finished chunks as partial
    outputs (segment URLs), then the final output once the job COMPLETED."""
    start = await service.stream_position(rec.id)
    store, expires = service.output_store(rec) if rec.request is not None else None, service.settings.presign_expires_s
    items = await asyncio.to_thread(stream_outputs, rec, start, lambda key: store.presigned_url(key, expires))
    if items:
        await service.advance_stream(rec.id, start + len(items))
    return RunPodStream(id=rec.id, status=runpod_state(rec), stream=[{"output": item} for item in items])


async def cancel(job_id: str, service: JobService = Depends(get_service),
                 tenant: Optional[str] = Depends(get_tenant)):
    return runpod_status(await service.cancel(job_id, tenant))


async def retry(job_id: str, service: JobService = Depends(get_service),
                tenant: Optional[str] = Depends(get_tenant)):
    """Run a FAILED, CANCELLED or TIMED_OUT job again under the same id (409 otherwise)."""
    rec = await service.retry(job_id, tenant)
    return RunPodStatus(id=rec.id, status=rec.state.value)


async def purge_queue(service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """Cancel every job of the caller that has not started yet."""
    return RunPodPurge(removed=len(await service.purge_queue(tenant)))


async def health(service: JobService = Depends(get_service), tenant: Optional[str] = Depends(get_tenant)):
    """Jobs queued and running (every replica), completed/failed/retried (this replica since
    it started), and this replica's job slots as workers."""
    return runpod_health(await service.job_counts(tenant))


def check_endpoint(endpoint_id: str = Path(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                                           description="The endpoint id (any, or the configured runpod_endpoint_id)"),
                   service: JobService = Depends(get_service)) -> None:
    configured = service.settings.runpod_endpoint_id
    if configured is not None and endpoint_id != configured:
        raise InputError("endpoint_id", f"no endpoint {endpoint_id!r} on this server", 404)


_OPERATIONS = [  # (path, method, handler, answer)
    ("/run", "POST", run, RunPodStatus),
    ("/runsync", "POST", runsync, RunPodStatus),
    ("/status/{job_id}", "GET", status, RunPodStatus),
    ("/stream/{job_id}", "GET", stream, RunPodStream),
    ("/cancel/{job_id}", "POST", cancel, RunPodStatus),
    ("/retry/{job_id}", "POST", retry, RunPodStatus),
    ("/purge-queue", "POST", purge_queue, RunPodPurge),
    ("/health", "GET", health, RunPodHealth),
]


def _router(prefix: str = "", **kwargs) -> APIRouter:
    router = APIRouter(prefix=prefix, **kwargs)
    for path, method, handler, answer in _OPERATIONS:
        name = handler.__name__ + ("_v2" if prefix else "")
        router.add_api_route(path, handler, methods=[method], response_model=answer, responses=ERROR_RESPONSES,
                             name=name, operation_id=name)
    return router


router = _router(tags=["runpod"])  # the predecessor's URLs
serverless_router = _router("/v2/{endpoint_id}", tags=["runpod serverless"], dependencies=[Depends(check_endpoint)])
