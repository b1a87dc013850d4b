"""The one place that turns Settings into a uvicorn server, for `python -m service` and the tests.

uvloop and httptools are uvicorn's fast paths (its C event loop and C HTTP parser); the pure-Python
asyncio loop and h11 parser are used only where those cannot be imported. Either way the HTTP
protocol is the guarded one of `service.api.connections` (head timeout, idle eviction, JSON 503).
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("uvicorn.error")

# Seconds a stopping server waits for requests in flight before it closes their connections.
GRACEFUL_SHUTDOWN_S = 10
# How long uvicorn's parent waits for a `--workers` child to answer its health check before it
# kills and restarts it. uvicorn's 5 s killed children still starting up on a loaded 2-core
# machine (load average 18: "Child process [...] died", again and again, 86 s to ready).
WORKER_HEALTHCHECK_S = 30


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus the request-head timeout that our protocol reads from it."""

    def __init__(self, app: Any, *, header_timeout_s: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.header_timeout_s = header_timeout_s


def http_protocol() -> str:
    """uvicorn's import string for the guarded protocol on the fastest parser available here.

    A string, not the class: uvicorn pickles this Config to each `--workers` child, and a child
    that spends its first seconds importing before it answers uvicorn's health check is killed.
    This module stays light to import for the same reason.
    """
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - httptools is a dependency; h11 is uvicorn's own
        return "service.api.connections:GuardedH11Protocol"
    return "service.api.connections:GuardedHttpToolsProtocol"


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
        # No dictConfig of uvicorn's own: its loggers propagate to the one handler that
        # `service.logs` installs, so the server's lines have the app's format (and request ids).
        "log_config": None,
        "loop": event_loop(),
        "http": http_protocol(),
        "access_log": settings.ACCESS_LOG,
        "limit_concurrency": settings.MAX_CONNECTIONS,
        "timeout_keep_alive": settings.KEEP_ALIVE_S,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "timeout_worker_healthcheck": WORKER_HEALTHCHECK_S,
        **overrides,
    }
    return ServerConfig(app, header_timeout_s=settings.HEADER_TIMEOUT_S, **options)


def bind(config: ServerConfig) -> socket.socket:
    """The server's socket, bound now: uvicorn binds only after the app's lifespan has run (its
    migrations, the demo), so a port in use failed after the data dir was written to.

    A failure is a `StartupError` naming the settings, for the one-line start-up message.
    """
    from service.startup import StartupError

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {config.host}:{config.port} (BNSERVE_HOST, BNSERVE_PORT): "
            f"{exc.strerror or exc}"
        ) from None
    sock.set_inheritable(True)  # for uvicorn's `--workers` children
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, config.port)
    return sock


class ReapingMultiprocess(Multiprocess):
    """uvicorn's process manager, telling `on_exit` the pid of each API process that is gone.

    uvicorn replaces a dead child (and SIGHUP/SIGTTOU retire some) without a hook; the metrics'
    multiprocess mode must then drop the gone process's live gauges (`mark_process_dead`).
    """

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], on_exit: Callable[[int], None]
    ) -> None:
        super().__init__(config, sockets)
        self._on_exit = on_exit
        self._known: set[int] = set()

    def _reap(self) -> None:
        alive = {p.pid for p in self.processes if p.pid is not None}
        for pid in self._known - alive:
            self._on_exit(pid)
        self._known = alive

    def init_processes(self) -> None:
        super().init_processes()
        self._reap()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._reap()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._reap()


def serve(
    config: ServerConfig,
    sock: socket.socket | None = None,
    on_child_exit: Callable[[int], None] | None = None,
) -> None:
    """Run the server until it is stopped (what `uvicorn.run` does, for a Config built here),
    on `sock` (from `bind`) or a socket bound now, before the app's lifespan. With several
    workers, `on_child_exit(pid)` is called for each API process that ended."""
    from service.startup import StartupError, exit_on_startup_error

    if sock is None:
        try:
            sock = bind(config)
        except StartupError as exc:
            exit_on_startup_error(exc)
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            if on_child_exit is None:
                Multiprocess(config, sockets=[sock]).run()
            else:
                ReapingMultiprocess(config, [sock], on_child_exit).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)
