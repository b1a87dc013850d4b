"""A request-body size limit that also holds for chunked bodies, which have no Content-Length."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.errors import PayloadTooLarge


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"request body is larger than the limit of {self.limit} bytes "
            "(BNSERVE_MAX_UPLOAD_BYTES)"
        )
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                response = error_response(
                    413, message, "payload_too_large", for_path=scope["path"], limit=self.limit
                )
                await response(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    # Raised inside the route's body read; the handler table answers 413.
                    raise PayloadTooLarge(message, limit=self.limit)
            return msg

        await self.app(scope, counting_receive, send)
