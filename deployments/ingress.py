"""HTTP and handle front door: FastAPI routes over a :class:`~deployments.service.JobService`.

Routes (see ``/docs`` or ``/openapi.json`` on a running server):

* ``POST /v1/jobs``            202 ``{id, state, status_url}``; JSON :class:`JobRequest`, or multipart
                               with files ``image``, ``audio`` (1-2, or ``audio_2``) and a
                               ``request`` field holding the JSON options. ``Idempotency-Key`` header.
* ``GET /v1/jobs/{id}``        :class:`JobStatus` (state, progress, timings, result + URL, error)
* ``GET /v1/jobs``             recent jobs, newest first (``?limit=20``); ``GET /`` the web page
                               (``deployments/web/index.html``)
* ``DELETE /v1/jobs/{id}``     cancel (also stops the in-flight stage calls)
* ``GET /v1/jobs/{id}/video``  the mp4
* ``GET /v1/models``           checkpoint report; ``GET /healthz``
* ``POST /run``, ``POST /runsync``, ``GET /status/{id}``, ``POST /cancel/{id}``: the RunPod contract.

Errors are ``{"error": {"field", "message", "status"}}`` with the HTTP status of the
:class:`~multitalk.api.InputError`; too many queued jobs answer 429 with ``Retry-After``.

:func:`create_app` is plain FastAPI (tests drive it with TestClient); the
:class:`MultiTalkIngress` deployment builds it at replica start-up
(``__serve_build_asgi_app__``) around its own ``JobService`` and adds handle methods.
"""
from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from multitalk.api import InputError

from .schemas import (
    ErrorBody,
    JobRequest,
    JobState,
    JobStatus,
    RunPodRequest,
    RunPodStatus,
    SubmitResponse,
)
from .auth import AuthMiddleware, BodyLimitMiddleware, KeyRing
from .jobs import JobRecord
from .service import JobService, Overloaded, ServiceSettings, check_access, runpod_status
from .storage import LocalStore, NotFound, store_from_settings

logger = logging.getLogger("multitalk.serve")

_ERRORS = {
    400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
    422: {"model": ErrorBody}, 429: {"model": ErrorBody},
}


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"field": field, "message": message, "status": status}}, status_code=status, headers=headers
    )


def _validation_field(err: dict) -> str:
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):  # a model-level check that names its field (bbox)
        return cause.field
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # Discriminated unions insert the tag into the location ("input.generate.audio_1").
    loc = [p for p in loc if p not in ("generate", "model_check", "volume_explore")]
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or "body"


def _from_validation(exc: Union[RequestValidationError, ValidationError], prefix: str = "") -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _validation_field(first)
    if prefix and not field.startswith(prefix):
        field = f"{prefix}.{field}" if field != "body" else prefix
    msg = str(first.get("msg", "invalid"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return _error(422, msg, field)


def _tenant(request: Request) -> Optional[str]:
    """The API-key tenant :class:`~deployments.auth.AuthMiddleware` authenticated (None: open)."""
    return getattr(request.state, "tenant", None)


def create_app(service: JobService, title: str = "MultiTalk Serve", keyring: Optional[KeyRing] = None) -> FastAPI:
    """The HTTP API over ``service``. ``keyring``: API keys (default: from the environment,
    ``MULTITALK_API_KEYS`` / ``MULTITALK_API_KEYS_FILE`` or ``api_keys_file``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title=title,
        version="0.1.0",
        lifespan=lifespan,
        description="Audio-driven talking video (MeiGen MultiTalk on WAN 2.1 I2V 14B).",
    )
    # Hardening (docs/SECURITY.md): the body cap, then the API key check outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, keyring=keyring or KeyRing.from_env(keys_file=service.settings.api_keys_file),
                       exempt=service.settings.auth_exempt_paths)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return _error(429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _from_validation(exc)

    async def _record(job_id: str, tenant: Optional[str] = None) -> JobRecord:
        """The job, if it exists (404) and ``tenant`` may see it (403)."""
        rec = await service.get(job_id)
        if rec is None:
            raise InputError("id", f"no job {job_id!r}", 404)
        check_access(rec, tenant)
        return rec

    async def _cancel(job_id: str, tenant: Optional[str] = None) -> JobRecord:
        if (known := await service.get(job_id)) is not None:
            check_access(known, tenant)
        rec = await service.cancel(job_id)
        if rec is None:
            raise InputError("id", f"no job {job_id!r}", 404)
        return rec

    # --- native API ----------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=SubmitResponse,
        responses=_ERRORS,
        openapi_extra={
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
        },
    )
    async def submit_job(request: Request, idempotency_key: Optional[str] = Header(None)):
        """Queue a job. JSON body: a JobRequest with references; multipart: uploaded files."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            job = await _from_multipart(request, _tenant(request))
        else:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError("body", "body is not valid JSON", 400)
            try:
                job = JobRequest.model_validate(body)
            except ValidationError as e:
                return _from_validation(e)
        rec = await service.submit(job, idempotency_key=idempotency_key, source="api", tenant=_tenant(request))
        return SubmitResponse(id=rec.id, state=rec.state, status_url=f"/v1/jobs/{rec.id}")

    async def _from_multipart(request: Request, tenant: Optional[str] = None) -> JobRequest:
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
        elif isinstance(image, str):
            image_ref = image  # a reference given as a plain form field
        else:
            image_ref = await service.save_upload("image", image.filename, await image.read(), tenant)
        audios = list(form.getlist("audio"))
        if form.get("audio_2") is not None:
            audios.append(form.get("audio_2"))
        audio_refs = []
        for i, a in enumerate(audios):  # files and references, in the order given
            if isinstance(a, str):
                audio_refs.append(a)
            else:
                audio_refs.append(await service.save_upload(f"audio[{i}]", a.filename, await a.read(), tenant))
        if not audio_refs:
            audio_refs = options.get("audio") or []
        if not audio_refs:
            raise InputError("audio", "missing audio file")
        try:
            return JobRequest.model_validate({**options, "image": image_ref, "audio": audio_refs})
        except ValidationError as e:
            errors = e.errors()
            raise InputError(_validation_field(errors[0]), str(errors[0]["msg"]), 422)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=200), after: Optional[str] = None):
        """Recent jobs, newest first: ``{"jobs": [{id, state, created_at, finished_at, progress,
        prompt, video_url, error}], "next": cursor}``; pass ``after=<next>`` for the page after.
        Reads one page of records from the store's index (this replica's live copies win)."""
        import asyncio

        page, cursor = await asyncio.to_thread(service.jobs.recent, _tenant(request), limit, after)
        recent = [service.records.get(r.id, r) for r in page]
        return {"jobs": [{
            "id": r.id, "state": r.state.value, "action": r.action, "created_at": r.created_at,
            "finished_at": r.finished_at, "progress": r.progress.model_dump(),
            "prompt": r.request.prompt if r.request is not None else None,
            "video_url": r.result.video_url if r.result is not None else None,
            "error": r.error.message if r.error is not None else None,
        } for r in recent], "next": cursor}

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=_ERRORS)
    async def get_job(job_id: str, request: Request):
        return (await service.refresh_url(await _record(job_id, _tenant(request)))).status()

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, responses=_ERRORS)
    async def cancel_job(job_id: str, request: Request):
        return (await _cancel(job_id, _tenant(request))).status()

    @app.get(
        "/v1/jobs/{job_id}/video",
        responses={200: {"content": {"video/mp4": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def get_video(job_id: str, request: Request):
        rec = await _record(job_id, _tenant(request))
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

    @app.get("/v1/models")
    async def models():
        import asyncio

        from . import volume

        root = await service.models_root()
        return await asyncio.to_thread(volume.model_check, root or "")

    @app.get("/", include_in_schema=False)
    async def web_page():
        """The browser front end (``deployments/web/index.html``: static, no build step)."""
        from pathlib import Path

        return FileResponse(Path(__file__).resolve().parent / "web" / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "store": service.store.describe(), "jobs_running": service._unfinished()}

    # --- RunPod contract -------------------------------------------------------------

    async def _runpod_submit(body: Any, idempotency_key: Optional[str], tenant: Optional[str] = None):
        try:
            req = RunPodRequest.model_validate(body)
        except ValidationError as e:
            return None, _from_validation(e)
        inp = req.input
        if inp.action == "generate":
            try:
                job = inp.to_job_request()
            except ValidationError as e:
                return None, _from_validation(e, "input")
            rec = await service.submit(job, idempotency_key=idempotency_key, source="runpod", tenant=tenant)
        else:
            rec = await service.run_action(inp.action, inp.model_dump(exclude={"action"}), idempotency_key, tenant)
        return rec, None

    async def _json(request: Request):
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("body", "body is not valid JSON", 400)

    @app.post("/run", response_model=RunPodStatus, responses=_ERRORS)
    async def run(request: Request, idempotency_key: Optional[str] = Header(None)):
        """RunPod async submit: answers ``{"id", "status"}`` at once."""
        rec, err = await _runpod_submit(await _json(request), idempotency_key, _tenant(request))
        if err is not None:
            return err
        status = runpod_status(rec)
        return status if rec.state.terminal else RunPodStatus(id=rec.id, status=rec.state.value)

    @app.post("/runsync", response_model=RunPodStatus, responses=_ERRORS)
    async def runsync(
        request: Request,
        idempotency_key: Optional[str] = Header(None),
        wait: Optional[float] = Query(None, ge=0, description="Seconds to wait (default: server setting)"),
    ):
        """RunPod sync submit: waits (up to a timeout), then answers like ``/status``."""
        rec, err = await _runpod_submit(await _json(request), idempotency_key, _tenant(request))
        if err is not None:
            return err
        timeout = service.settings.runsync_timeout_s if wait is None else min(wait, service.settings.runsync_timeout_s)
        rec = await service.wait(rec.id, timeout)
        return runpod_status(await service.refresh_url(rec))

    @app.get("/status/{job_id}", response_model=RunPodStatus, responses=_ERRORS)
    async def status(job_id: str, request: Request):
        return runpod_status(await service.refresh_url(await _record(job_id, _tenant(request))))

    @app.post("/cancel/{job_id}", response_model=RunPodStatus, responses=_ERRORS)
    async def runpod_cancel(job_id: str, request: Request):
        return runpod_status(await _cancel(job_id, _tenant(request)))

    return app


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class MultiTalkIngress:
    """The application's entry point: HTTP routes plus handle methods for other Ray apps.

    ``serve.get_app_handle("multitalk").generate.remote(JobRequest(...))`` runs a job and
    returns its final :class:`JobStatus`; ``submit`` returns at once.
    """

    def __init__(self, audio, image, text, diffusion, decode, settings: Optional[dict] = None):
        from .metrics import replica_logging
        from .stages import ServeStages

        replica_logging()  # the [job <id>] lines into this replica's Serve log
        settings = dict(settings or {})
        store = store_from_settings(settings.pop("store", None))
        if "replica_id" not in settings:
            # Serve's own replica id: job records name their owner as Serve's logs and
            # actor names do (SERVE_REPLICA::<app>#MultiTalkIngress#<id>).
            try:
                settings["replica_id"] = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a replica (tests): a random id
                pass
        self.service = JobService(
            store=store,
            stages=ServeStages(audio, image, text, diffusion, decode),
            settings=ServiceSettings.from_dict(settings),
        )
        logger.info("ingress replica %s: store %s", self.service.settings.replica_id, store.describe())

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    @staticmethod
    def _request(request: Union[JobRequest, dict]) -> JobRequest:
        return request if isinstance(request, JobRequest) else JobRequest.model_validate(request)

    async def submit(self, request: Union[JobRequest, dict], idempotency_key: Optional[str] = None,
                     tenant: Optional[str] = None) -> JobStatus:
        """Queue a job; raises InputError / Overloaded like the HTTP route answers 4xx/429.
        ``tenant``: run it as that tenant (handles are trusted in-cluster callers)."""
        rec = await self.service.submit(self._request(request), idempotency_key, source="handle", tenant=tenant)
        return rec.status()

    async def generate(
        self, request: Union[JobRequest, dict], idempotency_key: Optional[str] = None, timeout: Optional[float] = None,
        tenant: Optional[str] = None,
    ) -> JobStatus:
        """Run a job to the end and return its final status (COMPLETED/FAILED/CANCELLED)."""
        rec = await self.service.submit(self._request(request), idempotency_key, source="handle", tenant=tenant)
        rec = await self.service.wait(rec.id, timeout)
        return (await self.service.refresh_url(rec)).status()

    async def status(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobStatus]:
        rec = await self.service.get(job_id)
        if rec is not None:
            check_access(rec, tenant)
        return None if rec is None else (await self.service.refresh_url(rec)).status()

    async def cancel(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobStatus]:
        if (known := await self.service.get(job_id)) is not None:
            check_access(known, tenant)
        rec = await self.service.cancel(job_id)
        return None if rec is None else rec.status()
