"""Error bodies ``{"error": {"field", "message", "status"}}`` and the app's exception handlers.

An :class:`~multitalk.api.InputError` answers with its own status and field; a request
that fails validation answers 422 naming the first bad field (``sampling.steps``,
``audio[1]``, ``input.audio_1``); too many queued jobs answer 429 with ``Retry-After``.
"""
from __future__ import annotations

from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from multitalk.api import InputError

from ..admission import Overloaded
from ..schemas import ErrorBody

ERROR_RESPONSES = {status: {"model": ErrorBody} for status in (400, 403, 404, 409, 422, 429)}

# Discriminated unions insert the tag into the location ("input.generate.audio_1").
_UNION_TAGS = ("generate", "model_check", "volume_explore")


def error_response(status: int, message: str, field: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message, "status": status}}, status_code=status,
                        headers=headers)


def validation_field(err: dict) -> str:
    """The dotted field name of one pydantic error (``sampling.steps``, ``audio[1]``)."""
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):  # a model-level check that names its field (bbox)
        return cause.field
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    loc = [p for p in loc if p not in _UNION_TAGS]
    out = ""
    for p in loc:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or "body"


def as_input_error(exc: Union[RequestValidationError, ValidationError], prefix: str = "") -> InputError:
    """The first problem of a validation error as a 422 :class:`InputError` (``prefix``:
    the part of the body that was validated, e.g. ``input``)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = validation_field(first)
    if prefix and not field.startswith(prefix):
        field = f"{prefix}.{field}" if field != "body" else prefix
    msg = str(first.get("msg", "invalid"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return InputError(field, msg, 422)


def install(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return error_response(exc.status, exc.message, exc.field)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = as_input_error(exc)
        return error_response(e.status, e.message, e.field)
