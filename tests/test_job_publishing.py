"""Jobs publish exactly once (issue 17, point 2), through a server and worker processes.

A job's result version is recorded in the transaction that adds the version, so a worker killed
right after that (`BNSERVE_TEST_CRASH_POINT=after_publish`, a test-only fault injection) leaves a
job that is completed, not run again, and that a cancel cannot silently end `cancelled`. Deleting
a model ends its jobs `cancelled` and keeps their rows.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, ServerProcess, create_model
from tests.helpers_jobs import (
    FAST_WORKER_ENV,
    WorkerProcess,
    blobs,
    dataset_id,
    get_job,
    serving_version,
    start_job,
    versions,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.slow

STALE = {"BNSERVE_JOB_STALE_AFTER_S": "2"}


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30)


def _job(c: httpx.Client, epochs: int) -> str:
    create_model(c, "m", "mlp_bn")
    x, y = blobs(400, seed=0)
    return start_job(
        c,
        model="m",
        dataset=dataset_id(c, x, y),
        epochs=epochs,
        batch_size=8,
        lr=0.05,
        seed=0,
        promote="always",
    )


def test_a_worker_killed_right_after_publishing_leaves_a_completed_job(spawn, tmp_path: Path):
    server = spawn(**FAST_WORKER_ENV, **STALE)
    settings = {k: v for k, v in server.env.items() if k.startswith("BNSERVE_")}
    with _client(server) as c:
        job_id = _job(c, epochs=2)
        worker = WorkerProcess(
            server.data_dir,
            tmp_path / "worker.log",
            **settings,
            BNSERVE_TEST_CRASH_POINT="after_publish",
        )
        try:
            assert worker.proc.wait(timeout=90) == -signal.SIGKILL, worker.log()
        finally:
            worker.stop()

        # Stored, promoted and recorded as the job's result in one transaction.
        assert [v["version"] for v in versions(c, "m")] == [1]
        assert serving_version(c, "m") == 1
        r = c.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
        assert r.status_code == 409, r.text
        # Before the reaper notices the dead worker, or after it completed the job.
        assert r.json()["code"] in {"job_published", "job_finished"}

        job = wait_job(c, job_id, timeout=30)
        assert job["status"] == "succeeded", job
        assert job["result_version"] == 1
        assert job["promoted"] is True
        assert job["attempts"] == 1
        assert len(job["metrics"]) == 2
        assert [v["version"] for v in versions(c, "m")] == [1]  # never a second one


def test_deleting_a_model_ends_its_running_job_cancelled_and_keeps_it(spawn):
    server = spawn(BNSERVE_WORKERS="1", **FAST_WORKER_ENV)
    with _client(server) as c:
        job_id = _job(c, epochs=200)
        wait_until(lambda: get_job(c, job_id)["metrics"] or None, 60, "the job's first epoch")
        assert c.delete("/v1/models/m", headers=AUTH).status_code == 204

        job = get_job(c, job_id)
        assert job["status"] == "cancelled", job
        assert job["metrics"]
        assert "deleted" in job["error"]
        assert job["finished_at"] is not None
        assert job_id in [j["id"] for j in c.get("/v1/jobs").json()]
        r = c.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (409, "job_finished")

        # The worker stops and takes another job: the deleted model's job stays as it ended.
        create_model(c, "n", "mlp_bn")
        x, y = blobs(64, seed=1)
        other = start_job(c, model="n", dataset=dataset_id(c, x, y, "n"), epochs=1, lr=0.05)
        assert wait_job(c, other, timeout=60)["status"] == "succeeded"
        assert get_job(c, job_id) == job
