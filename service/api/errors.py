"""The one table that turns every error into the contract's `{"detail", "code", ...}` body.

On the Open Inference Protocol's paths (`/v2...`) the body is the protocol's `{"error", "code",
...}` instead, and 422 becomes 400: the protocol answers every bad request with 400.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.openapi import allowed_methods, is_v2_path
from service.errors import BNServeError, Overloaded

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    detail: str,
    code: str,
    headers: dict[str, str] | None = None,
    *,
    for_path: str = "",
    **extra: Any,
) -> JSONResponse:
    """The error body for a request to `for_path`: the v2 protocol's form on `/v2` paths."""
    if is_v2_path(for_path):
        status = 400 if status == 422 else status
        return JSONResponse({"error": detail, "code": code, **extra}, status, headers=headers)
    return JSONResponse({"detail": detail, "code": code, **extra}, status, headers=headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BNServeError)
    headers = (
        {"Retry-After": f"{max(1, round(exc.retry_after))}"}
        if isinstance(exc, Overloaded)
        else None
    )
    if exc.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.detail)
    return error_response(
        exc.status, exc.detail, exc.code, headers, for_path=request.url.path, **exc.extra
    )


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:5])
    return error_response(
        422,
        f"invalid request: {summary}",
        "validation_error",
        for_path=request.url.path,
        errors=errors,
    )


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := allowed_methods(request.app, request.url.path)):
        headers["Allow"] = ", ".join(allowed)
    return error_response(
        exc.status_code, str(exc.detail), code, headers, for_path=request.url.path
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error", for_path=request.url.path)


async def response_for(request: Request, exc: Exception) -> JSONResponse:
    """What the handler table answers for `exc`, for code that runs outside FastAPI's routing
    (the predict fast path, `service/api/fastpath.py`)."""
    if isinstance(exc, BNServeError):
        return await _domain(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await _http(request, exc)
    return await _unexpected(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BNServeError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
