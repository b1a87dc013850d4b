"""Worker processes against a real database: crashes, shutdowns, restarts and concurrency.

Servers run as `python -m service` child processes; standalone workers as `python -m
service.worker`, the way an operator runs them on other machines. Nothing is mocked: a killed
worker is a SIGKILLed process, and the queue is the real SQLite file or PostgreSQL database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, TOKEN, ServerProcess, create_model
from tests.helpers_jobs import (
    FAST_WORKER_ENV,
    WorkerProcess,
    blobs,
    dataset_id,
    get_job,
    start_job,
    versions,
    wait_job,
    wait_until,
    worker_children,
)

pytestmark = pytest.mark.slow

# Seconds of training (40 epochs of 80 steps): long enough to kill a worker in the middle of it,
# short enough to run again.
JOB = {"epochs": 40, "batch_size": 8, "lr": 0.05, "seed": 0, "promote": "always"}
STALE = {"BNSERVE_JOB_STALE_AFTER_S": "2"}

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Start standalone workers on a server's data dir (and database); all stopped at the end."""
    started: list[WorkerProcess] = []

    def _start(server: ServerProcess, **env: str) -> WorkerProcess:
        settings = {k: v for k, v in server.env.items() if k.startswith("BNSERVE_")}
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(server.data_dir, log, **{**settings, **env})
        started.append(worker)
        return worker

    yield _start
    for worker in started:  # all at once: each takes a moment to exit
        worker.signal(signal.SIGTERM)
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (pid {worker.pid})\n{worker.log()}")


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30)


def _queue_training_job(c: httpx.Client, model: str = "w", **overrides: Any) -> str:
    create_model(c, model, "mlp_bn")
    x, y = blobs(800, seed=0)
    return start_job(c, model=model, dataset=dataset_id(c, x, y, model), **{**JOB, **overrides})


def _wait_running_on(c: httpx.Client, job_id: str, pid: int, timeout: float = 30) -> dict[str, Any]:
    """Wait until the worker with `pid` holds the job and has reported training steps."""

    def probe() -> dict[str, Any] | None:
        job = get_job(c, job_id)
        assert job["status"] in ("queued", "running"), job
        held = job["status"] == "running" and f":{pid}:" in (job["worker"] or "")
        return job if held and job["progress"]["step"] > 0 else None

    return wait_until(probe, timeout, f"job {job_id} to run on worker pid {pid}")


def test_sigkilled_worker_job_is_queued_again_and_finished_by_another(spawn, start_worker):
    server = spawn(BNSERVE_WORKERS="0", **FAST_WORKER_ENV, **STALE)
    with _client(server) as c:
        job_id = _queue_training_job(c)
        first = start_worker(server)
        _wait_running_on(c, job_id, first.pid)
        first.signal(signal.SIGKILL)
        first.proc.wait(timeout=10)

        # Nobody heartbeats it any more: the server's reaper hands it back to the queue.
        requeued = wait_job(c, job_id, ("queued", "failed", "succeeded", "cancelled"), timeout=45)
        assert requeued["status"] == "queued", requeued
        assert requeued["attempts"] == 1
        assert "stopped heartbeating" in requeued["error"]
        assert requeued["worker"] is None
        assert requeued["metrics"] == []
        assert versions(c, "w") == []

        second = start_worker(server)
        job = wait_job(c, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert f":{second.pid}:" in job["worker"]
        assert job["error"] is None
        assert [v["version"] for v in versions(c, "w")] == [1]
        assert len(job["metrics"]) == JOB["epochs"]


def test_sigkilled_worker_job_fails_when_no_attempts_are_left(spawn, start_worker):
    server = spawn(BNSERVE_WORKERS="0", BNSERVE_JOB_MAX_ATTEMPTS="1", **FAST_WORKER_ENV, **STALE)
    with _client(server) as c:
        job_id = _queue_training_job(c)
        worker = start_worker(server)
        _wait_running_on(c, job_id, worker.pid)
        worker.signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)

        job = wait_job(c, job_id, timeout=45)
        assert job["status"] == "failed", job
        assert job["attempts"] == 1
        assert "no attempts left" in job["error"]
        assert job["result_version"] is None
        assert job["finished_at"] is not None
        assert versions(c, "w") == []


def test_server_restarts_a_killed_worker_which_finishes_the_job(spawn):
    server = spawn(BNSERVE_WORKERS="1", **FAST_WORKER_ENV, **STALE)
    assert server.proc is not None
    with _client(server) as c:
        pids = wait_until(lambda: worker_children(server.proc.pid) or None, 30, "a worker child")
        assert len(pids) == 1
        job_id = _queue_training_job(c)
        _wait_running_on(c, job_id, pids[0])
        os.kill(pids[0], signal.SIGKILL)

        job = wait_job(c, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        replacement = worker_children(server.proc.pid)
        assert len(replacement) == 1
        assert replacement != pids
        assert f":{replacement[0]}:" in job["worker"]
        assert [v["version"] for v in versions(c, "w")] == [1]


def test_sigterm_hands_the_job_back_without_counting_the_attempt(spawn, start_worker):
    server = spawn(BNSERVE_WORKERS="0", **FAST_WORKER_ENV)
    with _client(server) as c:
        job_id = _queue_training_job(c)
        first = start_worker(server)
        _wait_running_on(c, job_id, first.pid)
        first.signal(signal.SIGTERM)
        assert first.proc.wait(timeout=20) == 0

        job = get_job(c, job_id)
        assert job["status"] == "queued", job
        assert job["attempts"] == 0
        assert job["worker"] is None
        assert job["metrics"] == []
        assert versions(c, "w") == []

        second = start_worker(server)
        job = wait_job(c, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1
        assert f":{second.pid}:" in job["worker"]
        assert [v["version"] for v in versions(c, "w")] == [1]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_many_jobs_on_several_workers_each_run_once(request, backend):
    env = {"BNSERVE_WORKERS": "0", **FAST_WORKER_ENV}
    if backend == "postgres":
        env["BNSERVE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    # Set up after the database, so the processes stop before it is dropped.
    spawn = request.getfixturevalue("spawn")
    start_worker = request.getfixturevalue("start_worker")
    server = spawn(**env)
    count = 12
    with _client(server) as c:
        create_model(c, "many", "mlp_bn")
        x, y = blobs(400, seed=1)
        dataset = dataset_id(c, x, y, "many")
        # Each job takes a moment (2 epochs of 40 steps), so no worker can drain the queue
        # before the others have started.
        job_ids = [
            start_job(
                c,
                model="many",
                dataset=dataset,
                epochs=2,
                batch_size=8,
                lr=0.05,
                seed=i,
                promote="never",
            )
            for i in range(count)
        ]
        workers = [start_worker(server) for _ in range(3)]
        jobs = [wait_job(c, job_id, timeout=90) for job_id in job_ids]

        assert [j["status"] for j in jobs] == ["succeeded"] * count, jobs
        assert [j["attempts"] for j in jobs] == [1] * count
        results = sorted(j["result_version"] for j in jobs)
        assert results == list(range(1, count + 1))
        stored = versions(c, "many")
        assert [v["version"] for v in stored] == list(range(1, count + 1))
        # Each version was published by the job that reports it: no job ran twice.
        by_version = {v["version"]: v["lineage"]["job_id"] for v in stored}
        assert by_version == {j["result_version"]: j["id"] for j in jobs}
        assert all(j["promoted"] is False for j in jobs)
        assert c.get("/v1/models/many").json()["serving_version"] is None

        took_part = {j["worker"] for j in jobs}
        assert len(took_part) >= 2, took_part
        assert all(any(f":{w.pid}:" in name for w in workers) for name in took_part), took_part
        print(f"{backend}: {count} jobs over workers {sorted(took_part)}")


def _exited(pid: int) -> bool:
    """Whether `pid` is gone (or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_workers_exit_when_the_server_that_started_them_is_sigkilled(spawn, tmp_path: Path):
    server = spawn(BNSERVE_WORKERS="1", **FAST_WORKER_ENV, **STALE)
    assert server.proc is not None
    with _client(server) as c:
        pids = wait_until(lambda: worker_children(server.proc.pid) or None, 30, "a worker child")
        job_id = _queue_training_job(c)
        _wait_running_on(c, job_id, pids[0])
    server.kill()
    # A few seconds normally; generous for a loaded machine. It used to train on, and promote.
    wait_until(lambda: _exited(pids[0]) or None, 30, f"worker pid {pids[0]} to exit")

    # It handed its job back on the way out, and stored nothing.
    again = spawn(tmp_path / "data", BNSERVE_WORKERS="0")
    with _client(again) as c:
        job = get_job(c, job_id)
        assert job["status"] == "queued", job
        assert job["worker"] is None
        assert versions(c, "w") == []


def test_a_worker_started_by_hand_outlives_the_shell_that_started_it(spawn, tmp_path: Path):
    server = spawn(BNSERVE_WORKERS="0")
    log = tmp_path / "hand-worker.log"
    env = {**os.environ, **server.env, "BNSERVE_DATA_DIR": str(server.data_dir)}
    env.update({"BNSERVE_API_TOKEN": TOKEN, "BNSERVE_DEVICE": "cpu", "BNSERVE_LOG_LEVEL": "info"})
    shell = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m service.worker >"{log}" 2>&1 & echo $!'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(shell.stdout.strip())  # its parent, the shell, has exited already
    try:
        wait_until(
            lambda: (log.exists() and "ready" in log.read_text()) or None, 60, "the worker to start"
        )
        time.sleep(3)
        assert not _exited(pid), log.read_text()
    finally:
        if not _exited(pid):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _exited(pid) or None, 30, f"worker pid {pid} to stop on SIGTERM")
