"""uvicorn's HTTP protocols with the bounds uvicorn lacks: head timeout, idle eviction, JSON 503.

uvicorn (0.55) bounds only idle keep-alive connections (`timeout_keep_alive`); a socket that
connects and sends nothing, or sends its request head a byte at a time (slowloris), holds a slot
for ever, and once `limit_concurrency` such sockets are open every request gets uvicorn's plain-text
503. Here each connection must send a complete request head within `header_timeout_s` of opening
(or of the first bytes of its next request) or it is closed. At the cap, a request whose head
has arrived closes the longest-waiting connection that has no request in progress (a silent or
slow socket, or an idle keep-alive one) to make room, so a flood of idle sockets cannot keep other
clients out even while it is renewed; only when every connection is busy with a request does the
new one get 503, in the contract's JSON form. A new connection past the cap also closes such a
connection, if one has waited longer than a round trip, so open sockets stay near the cap.
Measured by tests/test_connections.py: stock uvicorn kept a silent socket open for ever and
answered every request 503 while 8 of them were open (cap 8).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import error_response
from service.api.request_id import RequestIdMiddleware, new_request_id

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 5.0
# A request head follows the TCP handshake within one round trip; a connection this young is
# not closed to make room for a newer one (only for a request whose head has arrived).
EVICTION_GRACE_S = 0.25


class CoalescingTransport:
    """A transport whose writes within one event-loop iteration leave as one `send()`.

    uvicorn writes a response's head and its body with a `transport.write` each, and uvloop sends
    each at once: two syscalls per response, each also waking the reader on loopback. In a
    py-spy profile of `mlp_bn` under 64 keep-alive clients the head's write alone was 22% of the
    event loop's time per prediction (issue #8). Holding the writes until the end of the current
    iteration (`call_soon`) sends head and body together, in order, a few microseconds later.
    """

    __slots__ = ("_chunks", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data if isinstance(data, bytes) else bytes(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ConnectionGuard:
    """The bounds, mixed into a uvicorn HTTP protocol class (which sets these attributes)."""

    server_state: Any
    config: Config
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    tasks: set[asyncio.Task[None]]
    app: ASGI3Application
    limit_concurrency: int | None

    def _guard_init(self) -> None:
        self._header_timeout_s: float = getattr(
            self.config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S
        )
        self._cap = self.limit_concurrency
        # Our own check replaces uvicorn's, which would answer in plain text.
        self.limit_concurrency = None
        self._head_timer: asyncio.TimerHandle | None = None
        # When this connection began to wait for a request head; None while one is being served.
        self._waiting_since: float | None = None

    def _connected(self) -> None:
        self.transport = CoalescingTransport(self.transport, self.loop)  # type: ignore[assignment]
        self._waiting_since = self.loop.time()
        self._arm_head_timer()
        if self._cap is not None and len(self.connections) > self._cap:
            # Keeps the sockets open near the cap. Connections younger than the grace are spared,
            # so a churning flood cannot close a client's connection before its head is read.
            self._make_room(min_idle_s=min(EVICTION_GRACE_S, self._header_timeout_s / 2))

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self._header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request head in time")
            self.transport.close()

    def _head_received(self) -> None:
        self._disarm_head_timer()
        self._waiting_since = None

    def _response_done(self, request_in_progress: bool) -> None:
        if not request_in_progress and not self.transport.is_closing():
            self._waiting_since = self.loop.time()

    def _live_connections(self) -> list[_ConnectionGuard]:
        return [
            c
            for c in self.connections
            if isinstance(c, _ConnectionGuard) and not c.transport.is_closing()
        ]

    def _make_room(self, min_idle_s: float) -> None:
        """Close the longest-waiting connections without a request (idle at least `min_idle_s`)
        until the open ones are within the cap."""
        live = self._live_connections()
        excess = len(live) - (self._cap or len(live))
        if excess <= 0:
            return
        now = self.loop.time()
        idle = sorted(
            (
                (c._waiting_since, id(c), c)
                for c in live
                if c is not self
                and c._waiting_since is not None
                and now - c._waiting_since >= min_idle_s
            ),
        )
        for _, _, oldest in idle[:excess]:
            log.debug("at the connection cap: closing the longest-waiting idle connection")
            oldest.transport.close()

    def _over_capacity(self) -> bool:
        """Whether the request whose head just arrived must be refused; makes room if it can."""
        if self._cap is None:
            return False
        if len(self.tasks) >= self._cap:
            return True
        if len(self.connections) <= self._cap:
            return False
        self._make_room(min_idle_s=0.0)
        return len(self._live_connections()) > self._cap

    def _refusal(self) -> ASGI3Application:
        log.warning("connection cap reached (%s): answering 503", self._cap)
        response = error_response(
            503,
            f"the server is at its limit of {self._cap} connections with requests in progress "
            "(BNSERVE_MAX_CONNECTIONS); retry shortly",
            "too_many_connections",
            {"Retry-After": "1", "Connection": "close"},
        )

        async def refuse(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            await response(scope, receive, send)  # type: ignore[arg-type]

        # Answered before the app, so it gets its X-Request-ID here, as every response does.
        return RequestIdMiddleware(refuse)  # type: ignore[arg-type, return-value]

    def send_400_response(self, msg: str) -> None:
        """A request uvicorn cannot parse (its request line or headers), answered with the
        contract's JSON error and a request id instead of uvicorn's plain text. The path may not
        have been read, so the body is valid both as the v1 and as the v2 error body."""
        detail = (
            f"malformed HTTP request: {msg.rstrip('.').lower()}; check its request line and headers"
        )
        body = json.dumps({"detail": detail, "error": detail, "code": "bad_request"}).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + new_request_id() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _with_app_for_capacity(self, start: Any) -> None:
        """Run uvicorn's request start (`start`) with the refusing app while over the cap."""
        if not self._over_capacity():
            start()
            return
        app = self.app
        self.app = self._refusal()
        try:
            start()
        finally:
            self.app = app


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):
    """The pure-Python fallback, for when httptools cannot be imported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard_init()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._connected()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_since is not None:
            self._arm_head_timer()

    def handle_events(self) -> None:
        before = self.cycle
        self._with_app_for_capacity(super().handle_events)
        if self.cycle is not before:
            self._head_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._response_done(not self.cycle.response_complete)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is uvicorn's own
    GuardedHttpToolsProtocol: type[asyncio.Protocol] | None = None
else:

    class _GuardedHttpTools(_ConnectionGuard, HttpToolsProtocol):
        """uvicorn's C-parser protocol (its fast path) with the bounds."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard_init()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._connected()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Still waiting after these bytes: a request head has begun and is not complete. A
            # whole head in one read (the usual case) never arms the timer.
            if self._waiting_since is not None:
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._head_received()
            self._with_app_for_capacity(super().on_headers_complete)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._response_done(not self.cycle.response_complete)

    GuardedHttpToolsProtocol = _GuardedHttpTools
