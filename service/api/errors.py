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
from service.errors import BNServeError, Overloaded, shorten
from service.files import disk_full_cause, insufficient_storage

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# A detail is a sentence or a few; past this it is echoing something it should not.
MAX_DETAIL = 2000


def _shortened(value: Any) -> Any:
    """`value` with every string in it cut to MAX_ECHOED characters (names from the request)."""
    if isinstance(value, str):
        return shorten(value)
    if isinstance(value, dict):
        return {shorten(str(k)): _shortened(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shortened(v) for v in value]
    return value


def error_response(
    status: int,
    detail: str,
    code: str,
    headers: dict[str, str] | None = None,
    *,
    for_path: str = "",
    **extra: Any,
) -> JSONResponse:
    """The error body for a request to `for_path` (the v2 protocol's form on `/v2` paths);
    echoed names are cut short, so no request is echoed whole."""
    detail = shorten(detail, MAX_DETAIL)
    if is_v2_path(for_path):
        status = 400 if status == 422 else status
        body = {"error": detail, "code": code, **_shortened(extra)}
    else:
        body = {"detail": detail, "code": code, **_shortened(extra)}
    return JSONResponse(body, status, headers=headers)


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
            "field": shorten(".".join(str(p) for p in err.get("loc", ()) if p != "body")),
            "message": shorten(err.get("msg", "")),
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
    if isinstance(exc.__cause__, BNServeError):
        # FastAPI turns anything raised while it reads a JSON body into a 400 "error parsing
        # the body" (`raise HTTPException(400) from e`): the chunked body limit's 413 among them.
        return await _domain(request, exc.__cause__)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (allowed := allowed_methods(request.app, request.url.path)):
        headers["Allow"] = ", ".join(allowed)
    return error_response(
        exc.status_code, str(exc.detail), code, headers, for_path=request.url.path
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    cause = disk_full_cause(exc)
    if cause is not None:
        # A full disk in a write no store wraps itself (creating a model or a job on SQLite).
        full = insufficient_storage(request.app.state.settings.DATA_DIR, cause)
        log.error("%s %s: %s", request.method, request.url.path, full.detail)
        return error_response(full.status, full.detail, full.code, **full.extra)
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
