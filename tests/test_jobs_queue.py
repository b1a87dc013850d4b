"""The job queue's cancel/publish hand-over, on a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.checkpoints.store import CheckpointStore
from service.datasets.store import DatasetStore
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.errors import Conflict
from service.files import Owner
from service.jobs import JobQueue
from service.registry import Registry


@pytest.fixture
def queue_and_job(tmp_path: Path):
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

    def new_job() -> str:
        return queue.create(
            kind="train",
            model_id=model.id,
            model_name="m",
            dataset_id=dataset.id,
            base_version=None,
            params={"epochs": 1},
            promote="never",
        ).id

    yield queue, new_job
    owner.close()
    engine.dispose()


def test_cancel_before_publishing_stops_the_publish(queue_and_job):
    queue, new_job = queue_and_job
    job_id = new_job()
    assert queue.claim("w1").id == job_id
    queue.cancel(job_id)
    assert queue.begin_publishing(job_id, "w1") is False
    assert queue.heartbeat(job_id, "w1", None) is False  # the worker is told to stop


def test_cancel_after_publishing_began_is_refused(queue_and_job):
    queue, new_job = queue_and_job
    job_id = new_job()
    queue.claim("w1")
    assert queue.begin_publishing(job_id, "w1") is True
    with pytest.raises(Conflict) as info:
        queue.cancel(job_id)
    assert info.value.code == "job_publishing"
    assert queue.get(job_id).cancel_requested is False
    assert queue.finish(job_id, "w1", "succeeded", result_version=1, promoted=False)


def test_only_the_holding_worker_may_begin_publishing(queue_and_job):
    queue, new_job = queue_and_job
    job_id = new_job()
    queue.claim("w1")
    assert queue.begin_publishing(job_id, "w2") is False


def test_a_requeued_job_starts_without_the_publishing_mark(queue_and_job):
    queue, new_job = queue_and_job
    job_id = new_job()
    queue.claim("w1")
    queue.begin_publishing(job_id, "w1")
    assert queue.reap_stale(stale_after_s=-1, max_attempts=2) == [job_id]
    row = queue.get(job_id)
    assert (row.status, row.phase) == ("queued", None)
    queue.claim("w2")
    queue.cancel(job_id)  # cancellable again: the new attempt has not begun publishing
    assert queue.get(job_id).cancel_requested is True


def test_an_epochs_metrics_and_progress_are_written_together(queue_and_job):
    queue, new_job = queue_and_job
    job_id = new_job()
    queue.claim("w1")
    progress = {"epoch": 1, "epochs": 3, "step": 5, "steps": 5}
    queue.add_epoch(job_id, "w1", {"epoch": 1, "train_loss": 0.5}, progress)
    row = queue.get(job_id)
    assert row.metrics == [{"epoch": 1, "train_loss": 0.5}]
    assert row.progress == progress
    queue.add_epoch(job_id, "w2", {"epoch": 2, "train_loss": 0.4}, {"epoch": 2})  # not its job
    assert queue.get(job_id).metrics == [{"epoch": 1, "train_loss": 0.5}]
