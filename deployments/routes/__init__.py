"""The HTTP API: FastAPI routers over a :class:`~deployments.service.JobService`.

* ``native.py``  ``/v1/jobs`` (submit JSON or multipart, status, list, cancel, video)
* ``runpod.py``  the RunPod contract: ``/run``, ``/runsync``, ``/status``, ``/cancel``, ... at the root
                 (the predecessor's URLs) and under RunPod's serverless ``/v2/{endpoint_id}/...``
* ``videos.py``  the OpenAI-style videos API: ``/v1/videos`` (create, sync, list, retrieve, content, delete)
* ``web.py``     the web page at ``/``, ``/v1/models``, ``/healthz``
* ``errors.py``  error bodies ``{"error": {"field", "message", "status"}}`` and their handlers
* ``deps.py``    the request's service, tenant and (tenant-checked) job
* ``openapi.py`` the OpenAPI document, finished for this server's settings

See ``/docs`` or ``/openapi.json`` on a running server. :func:`create_app` is plain
FastAPI (tests drive it with TestClient); the ``MultiTalkIngress`` deployment
(``deployments/ingress.py``) builds it at replica start-up around its own service.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from ..auth import AuthMiddleware, BodyLimitMiddleware, KeyRing
from ..service import JobService
from . import errors, native, openapi, runpod, videos, web


def create_app(service: JobService, title: str = "MultiTalk Serve", keyring: Optional[KeyRing] = None) -> FastAPI:
    """The HTTP API over ``service``. ``keyring``: API keys (default: from the environment,
    ``MULTITALK_API_KEYS`` / ``MULTITALK_API_KEYS_FILE`` or ``api_keys_file``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan,
                  description="Audio-driven talking video (MeiGen MultiTalk on WAN 2.1 I2V 14B).")
    app.state.service = service
    # Hardening (docs/SECURITY.md): the body cap, then the API key check outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, keyring=keyring or KeyRing.from_env(keys_file=service.settings.api_keys_file),
                       exempt=service.settings.auth_exempt_paths)
    errors.install(app)
    for router in (native.router, runpod.router, runpod.serverless_router, videos.router, web.router):
        app.include_router(router)
    openapi.install(app, service)  # the document as exact as the validation (routes/openapi.py)
    return app
