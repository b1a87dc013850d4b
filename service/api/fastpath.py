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
from service.api.routes.predict import MAX_TOP_K, answer
from service.errors import InvalidInput
from service.registry import MAX_VERSION

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


def _query(query: bytes) -> tuple[int | None, int | None]:
    """`?version=N` and `?top_k=K` as the route's `Query(ge=1, le=...)` would take them."""
    if not query:
        return None, None
    values: dict[str, str] = {}
    for key, text in parse_qsl(query.decode("latin-1")):
        if key in _BOUNDS:
            values[key] = text
    version = _integer("version", values.get("version"))
    return version, _integer("top_k", values.get("top_k"))


_BOUNDS = {"version": MAX_VERSION, "top_k": MAX_TOP_K}


def _integer(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        message = "Input should be a valid integer, unable to parse string as an integer"
    elif len(value) > 19 or not 1 <= int(value) <= _BOUNDS[name]:
        message = f"Input should be between 1 and {_BOUNDS[name]}"
    else:
        return int(value)
    raise InvalidInput(
        f"invalid request: query.{name}: {message}",
        code="validation_error",
        errors=[{"field": f"query.{name}", "message": message, "type": "int"}],
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
            version, top_k = _query(scope["query_string"])
            response = await answer(request, services, match.group(1), version, top_k)
        except Exception as exc:
            response = await response_for(request, exc)
        await response(scope, receive, send)
