"""Error bodies ``{"error": {"field", "message", "status"}}`` and the app's exception handlers.

An :class:`~multitalk.api.InputError` answers with its own status and field; a request
that fails validation answers 422 naming the first bad field (``sampling.steps``,
``audio[1]``, ``input.audio_1``); too many queued jobs answer 429 with ``Retry-After``.
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from multitalk.api import InputError

from ..admission import Overloaded
from ..schemas import ErrorBody, as_input_error

ERROR_RESPONSES = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422, 429)}
__all__ = ["ERROR_RESPONSES", "as_input_error", "error_response", "install"]


def error_response(status: int, message: str, field: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message, "status": status}}, status_code=status,
                        headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return error_response(exc.status, exc.message, exc.field)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path (Starlette names the first route's only)
            methods = set()
            for route in request.app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    methods |= set(getattr(route, "methods", None) or ())
            headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, str(exc.detail), headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response(400, "body is not valid JSON", "body")  # malformed, not invalid
        e = as_input_error(exc)
        return error_response(e.status, e.message, e.field)
