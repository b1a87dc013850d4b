"""`X-Request-ID` on every response, and on every log line written while the request is handled.

A client's own id is kept when it is a plausible one (1-128 visible ASCII characters: anything
else could forge log lines); otherwise the server makes one. Made ids are this process's random
prefix and a counter (`3f9a1c2e-1b`): unique across processes and restarts for practical purposes,
and far cheaper than a uuid4 per request on the predict hot path (issue #8), where this
middleware's whole cost is one context-variable set and one header added to the response head.

The middleware wraps the app's whole stack (`install_request_ids`), outside Starlette's
ServerErrorMiddleware, so even a 500 for an unhandled error carries the id, and its log line too.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id

HEADER = b"x-request-id"
_PLAUSIBLE = re.compile(rb"[\x21-\x7e]{1,128}")
_PREFIX = os.urandom(4).hex().encode() + b"-"
_counter = itertools.count(1)


def new_request_id() -> bytes:
    """A fresh id: the process's prefix and the next value of its counter, in hex."""
    return _PREFIX + b"%x" % next(_counter)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value
                break
        rid = given if given is not None and _PLAUSIBLE.fullmatch(given) else None
        header = rid if rid is not None else new_request_id()
        token = request_id.set(header.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A new list: the response's own header list may be shared or reused.
                message["headers"] = [*message.get("headers", ()), (HEADER, header)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def install_request_ids(app: Callable[[], ASGIApp]) -> Callable[[], ASGIApp]:
    """Wrap a Starlette app's `build_middleware_stack` so this middleware is the outermost."""

    def build() -> ASGIApp:
        return RequestIdMiddleware(app())

    return build
