"""The bearer token checked from the request head alone, before any body is read or parsed.

FastAPI reads and parses a route's JSON body before it runs the route's dependencies, so an
unauthenticated `POST /v1/models` with a malformed (or 1 GiB) body got its 422 (or had its body
read in full) before the token was looked at (issue #17). This middleware applies the same rules
as the routes' `WriteAuth`/`ReadAuth` from the method and path: writes always need the token;
reads (GET, HEAD, OPTIONS) and predictions (`/v1/.../predict`, `/v2/.../infer`) only with
BNSERVE_PROTECT_READS; `/metrics` with BNSERVE_PROTECT_READS or BNSERVE_METRICS_TOKEN (and takes
either token); probes and the API docs never. The routes keep their own checks, which also
document the scheme in OpenAPI.

It sits inside the predict fast path (`service/api/fastpath.py`), which checks the token itself
before reading a body, so the hot path pays nothing for it.
"""

from __future__ import annotations

import re

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import UNAUTHORIZED, bearer_matches
from service.api.deps import Services
from service.api.errors import error_response

# Answer whoever asks: liveness and readiness probes (readiness hides model names from callers
# without the token itself, `routes/health.py`) and the API's description.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
# Static pages and their assets, which hold no data: the dashboard must load to ask for the token
# (it then sends it with every API call), and /docs to offer its Authorize button.
OPEN_PREFIXES = ("/docs/", "/ui")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PREDICTION = re.compile(r"/v1/models/[^/]+/predict|/v2/models/[^/]+(/versions/[^/]+)?/infer")


class TokenGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A request no route takes goes on to the router's 404 or 405 (which read no body), as
        # before; looked up only for requests that lack the token.
        if scope["type"] != "http" or self._allowed(scope) or not _routed(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, UNAUTHORIZED, "unauthorized", for_path=scope["path"])
        await response(scope, receive, send)

    @staticmethod
    def _allowed(scope: Scope) -> bool:
        path: str = scope["path"]
        if path in OPEN_PATHS or (
            scope["method"] in READ_METHODS and path.startswith(OPEN_PREFIXES)
        ):
            return True
        services: Services = scope["app"].state.services
        settings = services.settings
        if path == "/metrics":
            if not (settings.PROTECT_READS or settings.METRICS_TOKEN):
                return True
            return bearer_matches(_authorization(scope), services.token, settings.METRICS_TOKEN)
        read = scope["method"] in READ_METHODS or (
            scope["method"] == "POST" and _PREDICTION.fullmatch(path) is not None
        )
        if read and not settings.PROTECT_READS:
            return True
        return bearer_matches(_authorization(scope), services.token)


def _routed(scope: Scope) -> bool:
    """Whether a route of the app takes this method and path."""
    return any(route.matches(scope)[0] is Match.FULL for route in scope["app"].router.routes)


def _authorization(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"authorization":
            return bytes(value).decode("latin-1")
    return ""
