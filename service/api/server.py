"""The one place that turns Settings into a uvicorn server, for `python -m service` and the tests.

uvloop and httptools are uvicorn's fast paths (its C event loop and C HTTP parser); the pure-Python
asyncio loop and h11 parser are used only where those cannot be imported. Either way the HTTP
protocol is the guarded one of `service.api.connections` (head timeout, idle eviction, JSON 503).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.api.connections import guarded_protocol
from service.settings import Settings

# Seconds a stopping server waits for requests in flight before it closes their connections.
GRACEFUL_SHUTDOWN_S = 10


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus the request-head timeout that our protocol reads from it."""

    def __init__(self, app: Any, *, header_timeout_s: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.header_timeout_s = header_timeout_s


def event_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return "asyncio"
    return "uvloop"


def server_config(
    settings: Settings, app: Callable[..., Any] | str, **overrides: Any
) -> ServerConfig:
    """The server for `app` (an ASGI app, or an import string with `factory=True`) as configured."""
    options: dict[str, Any] = {
        "host": settings.HOST,
        "port": settings.PORT,
        "log_level": settings.LOG_LEVEL,
        "loop": event_loop(),
        "http": guarded_protocol(),
        "access_log": settings.ACCESS_LOG,
        "limit_concurrency": settings.MAX_CONNECTIONS,
        "timeout_keep_alive": settings.KEEP_ALIVE_S,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        **overrides,
    }
    return ServerConfig(app, header_timeout_s=settings.HEADER_TIMEOUT_S, **options)


def serve(config: ServerConfig) -> None:
    """Run the server until it is stopped (what `uvicorn.run` does, for a Config built here)."""
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)
