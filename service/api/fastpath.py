"""The predict route as raw ASGI: the hot path without FastAPI's routing and dependency solving.

A py-spy profile of `mlp_bn` under 64 keep-alive clients (issue #8) put about 45% of the event
loop's time per prediction in FastAPI's machinery around the endpoint: matching the route
against every route in the app, the request/response wrapper, and solving dependencies (which in
FastAPI 0.16x walks each dependency's security scopes on every request), against ~15% in the
endpoint itself. This middleware answers `POST /v1/models/{name}/predict` directly with the
route's own `answer`, after the same auth check and with the same error table, so both paths give
the same bytes; every other request goes on to FastAPI. It sits inside the other middlewares
(body limit, host check, request ids), so they still apply.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import check_bearer
from service.api.deps import Services
from service.api.errors import response_for
from service.api.routes.predict import answer
from service.errors import InvalidInput
from service.registry import MAX_VERSION

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


def _version(query: bytes) -> int | None:
    """`?version=N` as the route's `Query(ge=1, le=2**63-1)` would take it."""
    if not query:
        return None
    value = None
    for key, text in parse_qsl(query.decode("latin-1")):
        if key == "version":
            value = text
    if value is None:
        return None
    if not value.isdigit():
        message = "Input should be a valid integer, unable to parse string as an integer"
    elif len(value) > 19 or not 1 <= int(value) <= MAX_VERSION:
        message = f"Input should be between 1 and {MAX_VERSION}"
    else:
        return int(value)
    raise InvalidInput(
        f"invalid request: query.version: {message}",
        code="validation_error",
        errors=[{"field": "query.version", "message": message, "type": "int"}],
    )


class PredictFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _PREDICT.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            services: Services = scope["app"].state.services
            if services.settings.PROTECT_READS:
                check_bearer(request, services.token)
            response = await answer(
                request, services, match.group(1), _version(scope["query_string"])
            )
        except Exception as exc:
            response = await response_for(request, exc)
        await response(scope, receive, send)
