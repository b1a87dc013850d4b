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
import numpy as np
import pytest

from service.checkpoints.store import CheckpointStore
from service.checkpoints.validation import state_dict_to_safetensors
from service.datasets.store import DatasetStore
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.errors import Conflict
from service.files import Owner
from service.jobs import JobQueue, result_recorder
from service.registry import Registry
from tests.conftest import AUTH, ServerProcess, create_model, trained_state_dict
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_version_is_stored_only_for_the_worker_that_holds_the_job(tmp_path: Path):
    """The registry and the queue alone: the result is recorded with the version, or neither."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine, tmp_path)
    sessions = make_sessionmaker(engine)
    owner = Owner(tmp_path)
    registry = Registry(sessions, CheckpointStore(tmp_path / "checkpoints", owner))
    model = registry.create_model("m", "mlp_bn", {})
    upload = tmp_path / "d.npz"
    np.savez(upload, x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1]))
    dataset = DatasetStore(tmp_path / "datasets", owner, sessions).add(upload, "d.npz", None)
    queue = JobQueue(sessions)
    job_id = queue.create(
        kind="train",
        model_id=model.id,
        model_name="m",
        dataset_id=dataset.id,
        base_version=None,
        params={"epochs": 1},
        promote="always",
    ).id
    data = state_dict_to_safetensors(trained_state_dict("mlp_bn", seed=1))

    def publish_for(worker: str) -> int:
        record = result_recorder(job_id, worker, promoted=True)
        row = registry.add_version(
            "m", data, source="train", model_id=model.id, promote=True, in_transaction=record
        )
        return row.version

    queue.claim("w1")
    assert queue.begin_publishing(job_id, "w1")
    queue.reap_stale(stale_after_s=-1, max_attempts=2)  # w1 lost it before it published
    with pytest.raises(Conflict) as info:
        publish_for("w1")
    assert info.value.code == "job_not_held"
    assert registry.list_versions("m") == []
    assert registry.get_model("m").serving_version is None

    queue.claim("w2")
    assert queue.begin_publishing(job_id, "w2")
    assert publish_for("w2") == 1
    row = queue.get(job_id)
    assert (row.status, row.result_version, row.promoted) == ("running", 1, True)
    assert registry.get_model("m").serving_version == 1
    # w2 dies before it finishes the job: it is completed, not queued to train again.
    queue.reap_stale(stale_after_s=-1, max_attempts=5)
    assert (queue.get(job_id).status, queue.get(job_id).result_version) == ("succeeded", 1)
    with pytest.raises(Conflict):
        queue.cancel(job_id)
    owner.close()
    engine.dispose()
