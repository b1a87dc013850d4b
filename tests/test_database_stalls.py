"""A slow, locked or restarting database holds up only the work that needs it (issue #17, 6).

Real pieces only: the SQLite file's write lock is held by a `sqlite3` connection of the test, a
PostgreSQL restart is a TCP hop between a worker and the server that the test cuts (live
connections reset, new ones closed at once), and a corrupt checkpoint is a flipped byte on disk.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, create_model
from tests.helpers_api import running, samples, serve
from tests.helpers_jobs import WorkerProcess, blobs, dataset_id, get_job, start_job, wait_until


def test_a_locked_database_holds_up_only_requests_that_need_it(tmp_path: Path):
    data = tmp_path / "data"
    with (
        running(data, DB_THREADS=2) as (_, c),
        contextlib.closing(sqlite3.connect(data / "bnserve.db", isolation_level=None)) as lock,
    ):
        serve(c, "m", "mlp_bn", in_features=64)
        # 300 samples of 64 floats: ~380 KB of JSON, parsed off the event loop.
        big = {"inputs": samples((64,), 300).tolist()}
        lock.execute("BEGIN IMMEDIATE")  # what a stuck writer in another process holds
        with httpx.Client(base_url=c.base_url, timeout=10) as quick:
            # Reads take no write lock: they answer while it is held.
            assert quick.get("/v1/models/m").status_code == 200
            assert quick.get("/readyz").status_code == 200
            # More writers than asyncio's default pool has threads (at most 32): they all wait.
            with ThreadPoolExecutor(40) as pool:
                creates = [
                    pool.submit(
                        c.post,
                        "/v1/models",
                        json={"name": f"c{i}", "architecture": "mlp_bn"},
                        headers=AUTH,
                    )
                    for i in range(40)
                ]
                threading.Event().wait(0.5)  # let them reach the server
                for _ in range(3):
                    r = quick.post("/v1/models/m/predict", json=big)
                    assert r.status_code == 200, r.text
                    assert len(r.json()["outputs"]) == 300
                assert not any(f.done() for f in creates), "the lock did not hold them up"
                lock.execute("ROLLBACK")
                assert [f.result().status_code for f in creates] == [201] * 40


def _metric(c: httpx.Client, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}"}} '
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def test_a_serving_version_that_fails_to_load_is_retried_with_backoff(tmp_path: Path, caplog):
    data = tmp_path / "data"
    with running(data) as (srv, c):
        serve(c, "m")
        model_dir = srv.settings.checkpoint_dir
    (stored,) = model_dir.glob("*/v1.safetensors")
    raw = bytearray(stored.read_bytes())
    raw[-1] ^= 0xFF
    stored.write_bytes(bytes(raw))

    caplog.set_level(logging.WARNING, logger="service.serving.manager")
    interval = 0.05
    with running(data, SYNC_INTERVAL_S=interval) as (_, c):
        failures = "bnserve_version_load_failures_total"
        wait_until(lambda: _metric(c, failures, "m") >= 5 or None, 30, "5 failed loads")
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "sha256" in r.json()["models"]["m"]["error"]
    tries = [r for r in caplog.records if r.getMessage().startswith("loading m version 1 failed")]
    waits = [float(r.args[3]) for r in tries[:5]]  # type: ignore[index]
    # Each wait is twice the one before, and each try came no sooner than the wait announced
    # before it (an unchecked sync would read and hash the file every 0.05 s).
    assert waits == [interval * 2**k for k in range(1, 6)]
    gaps = [b.created - a.created for a, b in itertools.pairwise(tries[:5])]
    assert all(gap >= wait * 0.9 for gap, wait in zip(gaps, waits, strict=False)), (gaps, waits)


class CuttableHop:
    """A TCP hop to PostgreSQL that can be cut like a server restart.

    While cut, its live connections are reset and new ones are closed as soon as they open, so
    clients see what they see when PostgreSQL restarts: dropped connections, then refusals.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            live = list(self._open)
        for sock in live:
            self._drop(sock)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _ended(c: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = get_job(c, job_id)
    return job if job["status"] not in ("queued", "running") else None


@pytest.mark.slow
@pytest.mark.postgres
def test_a_job_survives_a_database_restart_on_the_same_worker_and_attempt(
    postgres_url: str, tmp_path: Path
):
    host, port = postgres_url.split("@", 1)[1].split("/", 1)[0].split(":")
    hop = CuttableHop((host, int(port)))
    through_hop = postgres_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{hop.port}/")
    data = tmp_path / "data"
    # Many short epochs: the hop is cut once the first one is recorded, and an epoch's write
    # must come while it is cut (each epoch fsyncs a resume state, so it takes a few ms at least).
    epochs = 20
    worker: WorkerProcess | None = None
    try:
        # The API talks to PostgreSQL directly, so the test can watch; the worker goes through
        # the hop that gets cut.
        with running(data, DATABASE_URL=postgres_url) as (_, c):
            create_model(c, "w", "mlp_bn")
            x, y = blobs(100, seed=0)
            job_id = start_job(
                c,
                model="w",
                dataset=dataset_id(c, x, y, "w"),
                epochs=epochs,
                batch_size=8,
                lr=0.05,
                seed=0,
                promote="always",
            )
            worker = WorkerProcess(data, tmp_path / "worker.log", BNSERVE_DATABASE_URL=through_hop)
            wait_until(
                lambda: get_job(c, job_id)["metrics"] or None, 60, "the first epoch's metrics"
            )
            hop.cut()

            # Cut until an epoch's write has met the outage (retried), or the worker gave up.
            def met() -> bool | None:
                assert worker is not None
                log = worker.log()
                return "record epoch: database unavailable" in log or " failed:" in log or None

            wait_until(met, 60, "an epoch's write to meet the outage")
            hop.restore()
            job = wait_until(lambda: _ended(c, job_id), 90, "the job to end")
            assert job["status"] == "succeeded", (job, worker.log())
            assert job["attempts"] == 1, job
            assert f":{worker.pid}:" in job["worker"], job
            assert worker.proc.poll() is None, worker.log()
            assert [m["epoch"] for m in job["metrics"]] == list(range(1, epochs + 1))
            assert job["result_version"] == 1
    finally:
        if worker is not None:
            worker.stop()
            print(worker.log())
        hop.close()
