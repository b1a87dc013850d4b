"""What requests can make a server hold, answer or reveal (issue #17, points 3-5).

No request leaves state behind for names that do not exist, a deleted model leaves none, job
listings stay small and old jobs go; answers are bounded like requests; and with
BNSERVE_PROTECT_READS nothing about the models shows without the token, which is checked before
any body is read.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.conftest import AUTH
from tests.helpers_api import predict_ok, running, samples, serve
from tests.helpers_jobs import blobs, dataset_id, start_job, wait_until

TRAIN = {"epochs": 3, "batch_size": 8, "lr": 0.05, "seed": 0}


def _model_series(client: httpx.Client, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if f'model="{name}"' in line]


# --- 3. No state for names that do not exist, none left by a deleted model ---------------------


def test_unknown_names_leave_no_state_and_a_deleted_model_leaves_none(server, client):
    serve(client, "m", "mlp_bn")
    predict_ok(client, "m", samples((2,), 2))
    for _ in range(20):
        ghost = "g" * 60 + uuid.uuid4().hex
        body = {"inputs": [[0.0, 1.0]]}
        assert client.post(f"/v1/models/{ghost}/predict?version=1", json=body).status_code == 404
        assert client.post(f"/v2/models/{ghost}/versions/1/infer", json={}).status_code == 404
        assert client.get(f"/v2/models/{ghost}/versions/1/ready").status_code == 404
        assert client.delete(f"/v1/models/{ghost}", headers=AUTH).status_code == 404
    services = server.app_services
    assert len(services.manager._locks) == 0  # locks exist only while held
    assert len(services.upload_locks) == 0
    assert _model_series(client, "m")
    assert not [line for line in client.get("/metrics").text.splitlines() if "ggg" in line]

    assert client.delete("/v1/models/m", headers=AUTH).status_code == 204
    assert _model_series(client, "m") == []
    assert len(services.manager._locks) == 0
    assert len(services.upload_locks) == 0


def test_job_listings_leave_out_epoch_metrics_and_old_jobs_are_pruned(tmp_path: Path):
    with running(tmp_path / "data", JOB_RETENTION_S=1.0) as (srv, client):
        serve(client, "m", "mlp_bn")
        data = dataset_id(client, *blobs(40))
        old = start_job(client, model="m", dataset=data, **TRAIN)
        kept = start_job(client, model="m", dataset=data, **TRAIN)
        # A worker's view of the queue: claim the job and record two epochs, as training does.
        queue = srv.app_services.jobs
        assert queue.claim("w1").id == old
        for epoch in (1, 2):
            queue.add_epoch(old, "w1", {"epoch": epoch, "train_loss": 0.5, "val_loss": 0.5})
        listed = {job["id"]: job for job in client.get("/v1/jobs").json()}
        assert set(listed) == {old, kept}
        assert all("metrics" not in job for job in listed.values())
        assert [m["epoch"] for m in client.get(f"/v1/jobs/{old}").json()["metrics"]] == [1, 2]

        assert queue.finish(old, "w1", "failed", error="stopped by the test")
        wait_until(
            lambda: True if client.get(f"/v1/jobs/{old}").status_code == 404 else None,
            30,
            "the ended job to be pruned",
            interval=0.2,
        )
        assert client.get(f"/v1/jobs/{kept}").json()["status"] == "queued"  # not ended: kept
