"""Shared fixtures: settings on tmp_path, real uvicorn servers on free loopback ports, httpx.

Two kinds of server, both real: `server` runs uvicorn in a thread of the test process (fast, for
most API tests); `ServerProcess` runs `python -m service` as a child process, for tests that need
several processes, SIGKILL or a restart.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from models import get_architecture
from service.api.server import server_config
from service.app import create_app
from service.settings import Settings

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "BNSERVE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "DATA_DIR": data_dir,
        "API_TOKEN": TOKEN,
        "DEVICE": "cpu",
        "WORKERS": 0,
        "DEMO": False,
        "SYNC_INTERVAL_S": 0.2,
        "LOG_LEVEL": "warning",
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


class ThreadServer:
    """uvicorn serving `create_app(settings)` from a thread, on a free loopback port."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The same configuration as `python -m service` (protocol, loop, limits, timeouts);
        # `options` override uvicorn's.
        config = server_config(
            settings,
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    @property
    def app_services(self) -> Any:
        return self._server.config.app.state.services  # type: ignore[union-attr]


@pytest.fixture
def server(settings: Settings) -> Iterator[ThreadServer]:
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@dataclass
class ServerProcess:
    """`python -m service` in a child process, for multi-process, kill and restart tests."""

    data_dir: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        self.port = free_port()
        env = {
            **os.environ,
            "BNSERVE_DATA_DIR": str(self.data_dir),
            "BNSERVE_PORT": str(self.port),
            "BNSERVE_API_TOKEN": TOKEN,
            "BNSERVE_DEVICE": "cpu",
            "BNSERVE_WORKERS": "0",
            "BNSERVE_DEMO": "false",
            "BNSERVE_SYNC_INTERVAL_S": "0.2",
            "BNSERVE_LOG_LEVEL": "warning",
            **self.env,
        }
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                path = "/readyz" if wait_ready else "/healthz"
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start server processes on a shared data dir; all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def _spawn(data_dir: Path | None = None, wait_ready: bool = True, **env: str) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / "data", env)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield _spawn
    for proc in started:
        proc.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; skipped when no server answers."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("BNSERVE_TEST_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required (CI) but not reachable at {POSTGRES_URL}: {exc}")
        pytest.skip(
            f"PostgreSQL not reachable at {POSTGRES_URL} ({exc}); set BNSERVE_TEST_POSTGRES_URL"
        )
    name = f"bnserve_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# Checkpoints made in the tests themselves, with plain PyTorch.


def trained_state_dict(architecture: str, seed: int = 0, **config: Any) -> dict[str, torch.Tensor]:
    """Weights of `architecture` whose BN statistics were moved by a few train-mode batches."""
    arch = get_architecture(architecture)
    cfg = arch.parse_config(config)
    torch.manual_seed(seed)
    model = arch.build(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *cfg.input_shape()) * 2 + 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_model(architecture: str, state_dict: dict[str, torch.Tensor], **config: Any) -> Any:
    """The same weights in a plain eval-mode module: what every served output must equal."""
    arch = get_architecture(architecture)
    model = arch.build(arch.parse_config(config))
    model.load_state_dict(state_dict)
    return model.eval()


def pt_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def create_model(client: httpx.Client, name: str, architecture: str, **config: Any) -> None:
    r = client.post(
        "/v1/models",
        json={"name": name, "architecture": architecture, "config": config},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text


def upload(
    client: httpx.Client, name: str, data: bytes, filename: str = "w.pt", **form: str
) -> httpx.Response:
    return client.post(
        f"/v1/models/{name}/versions", files={"file": (filename, data)}, data=form, headers=AUTH
    )
