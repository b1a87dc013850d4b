"""Replicas that share only PostgreSQL and an S3 bucket (GitHub issue 12, point 4).

Two API processes and a training worker, each with its own data dir, against moto's real S3
endpoint and one PostgreSQL database: what one replica stores, the other downloads (verified),
a promote made through either reaches the other, a tampered object is refused and a replica
killed between an object's put and its row's commit leaves no row without its object.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import AUTH, create_model, upload
from tests.helpers_jobs import WorkerProcess, blobs, dataset_id, start_job, wait_job
from tests.helpers_s3 import S3Endpoint, s3_fixture, s3_server_fixture  # noqa: F401 - fixtures
from tests.helpers_serving import Book, Served, close, predict, promote, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SYNC_INTERVAL_S = 0.2
PREFIX = "bn"


@pytest.fixture
def cluster_env(s3: S3Endpoint, postgres_url: str) -> dict[str, str]:
    """What every process of the cluster is given: the database, the bucket, the token."""
    return {
        "BNSERVE_DATABASE_URL": postgres_url,
        "BNSERVE_STORAGE_URL": f"s3://{s3.bucket}/{PREFIX}",
        "BNSERVE_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S),
        **s3.env(),
    }


@pytest.fixture
def worker(tmp_path: Path, cluster_env: dict[str, str]) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(tmp_path / "w", tmp_path / "worker.log", **cluster_env)
    yield proc
    proc.stop()


def until_served(client: httpx.Client, version: int, timeout: float = 10) -> float:
    def serves() -> bool:
        return Served(predict(client, "m", torch.zeros(1, 2))).version == version

    return wait_for(f"version {version} served", serves, timeout, every=0.01)


def version_rows(client: httpx.Client) -> list[dict[str, object]]:
    r = client.get("/v1/models/m/versions")
    assert r.status_code == 200, r.text
    rows: list[dict[str, object]] = r.json()
    return rows


def test_two_replicas_and_a_worker_share_only_the_database_and_the_bucket(
    tmp_path: Path,
    spawn: Any,
    s3: S3Endpoint,
    cluster_env: dict[str, str],
    worker: WorkerProcess,
) -> None:
    a = spawn(tmp_path / "a", **cluster_env)
    b = spawn(tmp_path / "b", **cluster_env)
    book = Book()
    x = torch.randn(4, 2)
    with (
        httpx.Client(base_url=a.url, timeout=30) as ca,
        httpx.Client(base_url=b.url, timeout=30) as cb,
    ):
        create_model(ca, "m", "mlp_bn")
        v1 = book.upload(ca, "m", seed=1)
        # Written under checkpoints/<model id>/<sha256>.safetensors.
        (key,) = s3.keys(f"{PREFIX}/checkpoints/")
        assert key.endswith(f"/{v1['sha256']}.safetensors")
        model_id = key.split("/")[2]
        # Uploaded through a, predicted through b: b downloads the object into its own cache.
        served = Served(predict(cb, "m", x))
        assert served.version == 1
        assert close(served.outputs, book.expected(1, x))
        assert (tmp_path / "b" / "cache" / "checkpoints" / f"{v1['sha256']}.safetensors").exists()
        assert not (tmp_path / "b" / "checkpoints").exists()  # nothing in the data dir's store

        # Trained by the worker (its own data dir) on a dataset uploaded through b.
        xs, ys = blobs(200, seed=0)
        job = start_job(
            ca,
            model="m",
            dataset=dataset_id(cb, xs, ys, "d"),
            epochs=3,
            batch_size=16,
            lr=0.05,
            promote="always",
        )
        done = wait_job(cb, job, timeout=60)
        assert done["status"] == "succeeded", (done, worker.log())
        assert done["result_version"] == 2
        for c in (ca, cb):
            until_served(c, 2)

        # Rolled back through b, forward again through a: each reaches the other replica.
        delays = []
        for target, via, other in ((1, cb, ca), (2, ca, cb), (1, ca, cb)):
            assert promote(via, "m", target).status_code == 200
            answered = time.monotonic()
            until_served(other, target, timeout=5)
            delays.append(time.monotonic() - answered)
        print(
            "\nS3 replicas: promote through one replica served by the other after "
            + ", ".join(f"{d * 1000:.0f} ms" for d in delays)
            + f" (sync interval {SYNC_INTERVAL_S} s)"
        )

        # A version whose object is overwritten in the bucket is refused by a replica that
        # downloads it, and the weights route refuses it too; the serving version is untouched.
        v3 = upload(ca, "m", book.weights(3), promote="false")
        assert v3.status_code == 201, v3.text
        tampered = f"{PREFIX}/checkpoints/{model_id}/{v3.json()['sha256']}.safetensors"
        s3.client().put_object(Bucket=s3.bucket, Key=tampered, Body=b"not the weights")
        r = cb.post("/v1/models/m/predict?version=3", json={"inputs": x.tolist()}, headers=AUTH)
        assert (r.status_code, r.json()["code"]) == (500, "corrupt_checkpoint"), r.text
        r = cb.get("/v1/models/m/versions/3/weights")
        assert (r.status_code, r.json()["code"]) == (500, "corrupt_checkpoint"), r.text
        assert Served(predict(cb, "m", x)).version == 1


def test_a_replica_killed_between_the_object_and_the_row_loses_nothing(
    tmp_path: Path, spawn: Any, s3: S3Endpoint, cluster_env: dict[str, str]
) -> None:
    a = spawn(tmp_path / "a", **cluster_env)
    crash = spawn(tmp_path / "c", **cluster_env, BNSERVE_TEST_CRASH_POINT="after_object_put")
    book = Book()
    with (
        httpx.Client(base_url=a.url, timeout=30) as ca,
        httpx.Client(base_url=crash.url, timeout=30) as cc,
    ):
        create_model(ca, "m", "mlp_bn")
        book.upload(ca, "m", seed=1)
        with pytest.raises(httpx.TransportError):
            upload(cc, "m", book.weights(2))
        assert crash.proc is not None
        assert crash.proc.wait(10) == -signal.SIGKILL
        # The object went in, its row never did: every row still names an object that exists.
        objects = s3.keys(f"{PREFIX}/checkpoints/")
        assert len(objects) == 2
        rows = version_rows(ca)
        assert [row["version"] for row in rows] == [1]
        assert all(any(str(row["sha256"]) in key for key in objects) for row in rows)
        # A new version takes the next number; the lost upload left no gap and no row.
        assert book.upload(ca, "m", seed=3)["version"] == 2

    # The unreferenced object goes in the sweep of the next start, once past the grace.
    time.sleep(1.0)
    spawn(tmp_path / "c", **cluster_env, BNSERVE_STORAGE_SWEEP_GRACE_S="0.5")
    remaining = s3.keys(f"{PREFIX}/checkpoints/")
    assert len(remaining) == 2
    with httpx.Client(base_url=a.url, timeout=30) as ca:
        shas = {str(row["sha256"]) for row in version_rows(ca)}
    assert all(any(sha in key for key in remaining) for sha in shas)


def test_a_worker_killed_mid_publish_loses_nothing_and_the_job_publishes_once(
    tmp_path: Path, spawn: Any, s3: S3Endpoint, cluster_env: dict[str, str]
) -> None:
    """Killed after its version's object went in, before the row: another worker (on another
    host's data dir) takes the job over and publishes it once; every row names an object."""
    env = {**cluster_env, "BNSERVE_JOB_STALE_AFTER_S": "1"}
    a = spawn(tmp_path / "a", **env)
    with httpx.Client(base_url=a.url, timeout=30) as ca:
        create_model(ca, "m", "mlp_bn")
        xs, ys = blobs(100, seed=0)
        job = start_job(
            ca, model="m", dataset=dataset_id(ca, xs, ys, "d"), epochs=2, batch_size=25, lr=0.05
        )
        first = WorkerProcess(
            tmp_path / "w1", tmp_path / "w1.log", **env, BNSERVE_TEST_CRASH_POINT="after_object_put"
        )
        try:
            assert first.proc.wait(60) == -signal.SIGKILL, first.log()
        finally:
            first.stop()  # a no-op once it is dead
        assert version_rows(ca) == []
        assert len(s3.keys(f"{PREFIX}/checkpoints/")) == 1  # the object, without its row
        second = WorkerProcess(tmp_path / "w2", tmp_path / "w2.log", **env)
        try:
            done = wait_job(ca, job, timeout=60)
        finally:
            second.stop()
        assert done["status"] == "succeeded", (done, second.log())
        rows = version_rows(ca)
        assert [row["version"] for row in rows] == [done["result_version"]] == [1]
        objects = s3.keys(f"{PREFIX}/checkpoints/")
        assert any(str(rows[0]["sha256"]) in key for key in objects)
