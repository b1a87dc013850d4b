"""Contenders' server processes: each in its own session, paused, resumed, always stopped.

Each contender runs in a new session (its own process group), so SIGSTOP/SIGCONT reach every
process it forked or spawned (LitServe's inference workers, uvicorn workers) and a Ctrl-C in the
terminal reaches only the benchmark, which then stops them all itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One contender's process group, with its log file and base URL."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        port: int,
        health_path: str,
    ) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._health_url = self.url + health_path
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.paused = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Poll the health URL until 200; a process that died or never answers is an error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self._proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(self._health_url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n" + self.log_tail())

    def _signal(self, sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self, grace_s: float = 10.0) -> None:
        """Resume (a stopped process cannot act on SIGTERM), terminate, then kill what is left."""
        if self._proc.returncode is not None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        # Wait without reaping: while the leader is a zombie its pid (the group's id) cannot be
        # reused, so the SIGKILL below reaches only what is left of this group (LitServe's workers).
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            time.sleep(0.05)
        self._signal(signal.SIGKILL)
        self._proc.wait()


class Servers:
    """All contenders of one run; exactly one of them is running whenever one is measured."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def add(self, server: Server) -> Server:
        self._servers.append(server)
        return server

    def pause_all(self) -> None:
        for server in self._servers:
            if not server.paused:
                server.pause()

    @contextmanager
    def alone(self, server: Server) -> Iterator[Server]:
        """`server` running, every other contender stopped; all stopped again afterwards."""
        for other in self._servers:
            if other is not server and not other.paused:
                other.pause()
        server.resume()
        try:
            if not server.alive():
                raise RuntimeError(f"{server.name} is no longer running:\n" + server.log_tail())
            yield server
        finally:
            server.pause()

    def stop_all(self) -> None:
        for server in self._servers:
            server.stop()


@contextmanager
def terminated_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop the servers then too."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
