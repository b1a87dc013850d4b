"""The training-job queue in the database, shared by the API processes and every worker.

Claiming is atomic: on PostgreSQL the oldest queued row is taken with `FOR UPDATE SKIP LOCKED`,
so concurrent workers skip each other's rows instead of waiting; on SQLite every write
transaction starts with BEGIN IMMEDIATE (see `db.engine`), so select-then-update cannot
interleave between processes. A running job carries its worker's heartbeat; one whose heartbeat
stops is queued again (up to `JOB_MAX_ATTEMPTS`) or failed by whoever notices first.

A job publishes exactly once: its `result_version` is written in the transaction that adds the
version (`result_recorder`), so a job whose worker died after that is completed, never run again,
and a cancel of it is refused (409 `job_published`) instead of ending it `cancelled` while its
version stays.

Blocking: call from a thread.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, defer, sessionmaker

from service.db.engine import read_sessions
from service.db.tables import JobRow, ModelRow, VersionRow, utcnow
from service.errors import Conflict, NotFound

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


def end_jobs_of_deleted_model(session: Session, model_id: str, name: str) -> None:
    """End the model's queued and running jobs `cancelled`, in the deleting transaction.

    Their rows and metrics stay readable; a running job's worker sees the status at its next
    heartbeat and stops, and cannot publish any more (`result_recorder` needs `running`).
    """
    session.execute(
        update(JobRow)
        .where(JobRow.model_id == model_id, JobRow.status.in_(ACTIVE))
        .values(
            status="cancelled",
            cancel_requested=True,
            error=f"model {name!r} was deleted",
            finished_at=utcnow(),
        )
    )


def result_recorder(
    job_id: str,
    worker_id: str,
    promoted: bool,
    kept_epoch: int | None = None,
    stop_reason: str | None = None,
) -> Callable[[Session, VersionRow], None]:
    """For `Registry.add_version`: record the job's result in the version's own transaction.

    Only while this worker still holds the job in its publishing phase; otherwise the
    transaction, the version with it, is rolled back (409 `job_not_held`).
    """

    def record(session: Session, version: VersionRow) -> None:
        held = session.scalar(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.worker_id == worker_id)
            .where(JobRow.status == "running", JobRow.phase == "publishing")
            .values(
                result_version=version.version,
                promoted=promoted,
                kept_epoch=kept_epoch,
                stop_reason=stop_reason,
            )
            .returning(JobRow.id)
        )
        if held is None:
            raise Conflict(
                f"job {job_id} is no longer held by worker {worker_id} (cancelled, its model "
                "deleted, or handed to another worker): its result was not stored",
                code="job_not_held",
            )

    return record


class JobQueue:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._reads = read_sessions(sessions)  # on SQLite: no write lock for reads

    def create(
        self,
        *,
        kind: str,
        model_id: str,
        model_name: str,
        dataset_id: str,
        base_version: str | None,
        params: dict[str, Any],
        promote: str,
    ) -> JobRow:
        row = JobRow(
            id=uuid.uuid4().hex,
            kind=kind,
            model_id=model_id,
            model_name=model_name,
            dataset_id=dataset_id,
            base_version=base_version,
            params=params,
            promote=promote,
            status="queued",
            progress={},
            metrics=[],
            cancel_requested=False,
            attempts=0,
            created_at=utcnow(),
        )
        with self._sessions.begin() as session:
            # Jobs have no foreign key to their model (they outlive it): the model must still be
            # there, locked against a delete (PostgreSQL), or the job would be orphaned.
            locked = session.scalar(
                select(ModelRow.id).where(ModelRow.id == model_id).with_for_update()
            )
            if locked is None:
                raise NotFound(f"model {model_name!r} was deleted", code="model_not_found")
            session.add(row)
        return row

    def get(self, job_id: str) -> JobRow:
        with self._reads.begin() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist", code="job_not_found")
            return row

    def recent(self, *, status: str | None = None, limit: int = 100) -> list[JobRow]:
        """The newest jobs, without their per-epoch metrics (not even read from the database)."""
        query = (
            select(JobRow)
            .options(defer(JobRow.metrics, raiseload=True))
            .order_by(JobRow.created_at.desc())
            .limit(limit)
        )
        if status is not None:
            query = query.where(JobRow.status == status)
        with self._reads.begin() as session:
            return list(session.scalars(query))

    def prune(self, older_than_s: float) -> int:
        """Delete jobs that ended more than `older_than_s` ago (BNSERVE_JOB_RETENTION_S); the
        versions they published keep their lineage. Returns how many went."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self._sessions.begin() as session:
            result = session.execute(
                delete(JobRow).where(JobRow.status.in_(FINAL), JobRow.finished_at < cutoff)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        """The status of each of `job_ids` that still exists."""
        with self._reads.begin() as session:
            rows = session.execute(select(JobRow.id, JobRow.status).where(JobRow.id.in_(job_ids)))
            return {job_id: status for job_id, status in rows}

    def overview(self) -> list[tuple[str, str, str]]:
        """(id, model name, status) of every job: a narrow read, for the metrics scrape."""
        with self._sessions.begin() as session:
            rows = session.execute(select(JobRow.id, JobRow.model_name, JobRow.status))
            return [(job_id, model, status) for job_id, model, status in rows]

    def progress_of(
        self, job_ids: list[str]
    ) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(progress, per-epoch metrics) of each of `job_ids` that still exists."""
        out: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        with self._sessions.begin() as session:
            for start in range(0, len(job_ids), 500):  # bound the statement's parameters
                chunk = job_ids[start : start + 500]
                query = select(JobRow.id, JobRow.progress, JobRow.metrics)
                for job_id, progress, metrics in session.execute(query.where(JobRow.id.in_(chunk))):
                    out[job_id] = (progress or {}, metrics or [])
        return out

    def cancel(self, job_id: str) -> JobRow:
        """A queued job ends at once; a running one is flagged and its worker stops it."""
        with self._sessions.begin() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist", code="job_not_found")
            if row.status in FINAL:
                raise Conflict(f"job {job_id} already ended {row.status}", code="job_finished")
            if row.result_version is not None:
                raise Conflict(
                    f"job {job_id} already stored version {row.result_version} of model "
                    f"{row.model_name!r} and can no longer be cancelled; delete or demote the "
                    "version instead",
                    code="job_published",
                )
            if row.phase == "publishing":
                raise Conflict(
                    f"job {job_id} is already storing its trained version and can no longer be "
                    "cancelled; delete or demote the version afterwards instead",
                    code="job_publishing",
                )
            row.cancel_requested = True
            if row.status == "queued":
                row.status = "cancelled"
                row.finished_at = utcnow()
            return row

    # Worker side

    def claim(self, worker_id: str) -> JobRow | None:
        with self._sessions.begin() as session:
            row = session.scalar(
                select(JobRow)
                .where(JobRow.status == "queued")
                .order_by(JobRow.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return None
            now = utcnow()
            row.status = "running"
            row.worker_id = worker_id
            row.attempts += 1
            row.started_at = now
            row.heartbeat_at = now
            row.error = None
            row.phase = None
            return row

    def heartbeat(self, job_id: str, worker_id: str, progress: dict[str, Any] | None) -> bool:
        """Record that the worker lives; False when it must stop (cancelled or taken from it)."""
        with self._sessions.begin() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != "running" or row.worker_id != worker_id:
                return False
            row.heartbeat_at = utcnow()
            if progress is not None:
                row.progress = progress
            return not row.cancel_requested

    def begin_publishing(self, job_id: str, worker_id: str) -> bool:
        """Pass the point after which the job can no longer be cancelled; False if cancelled."""
        with self._sessions.begin() as session:
            marked = session.scalar(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker_id == worker_id)
                .where(JobRow.status == "running", JobRow.cancel_requested.is_(False))
                .values(phase="publishing")
                .returning(JobRow.id)
            )
            return marked is not None

    def add_epoch(
        self,
        job_id: str,
        worker_id: str,
        metrics: dict[str, Any],
        progress: dict[str, Any] | None = None,
    ) -> None:
        """Append an epoch's metrics, with the progress that goes with them (one write).

        Idempotent per epoch: a retry after a commit whose answer was lost replaces its entry.
        """
        with self._sessions.begin() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is not None and row.worker_id == worker_id and row.status == "running":
                epoch = metrics.get("epoch")
                kept = [m for m in row.metrics if epoch is None or m.get("epoch") != epoch]
                row.metrics = [*kept, metrics]
                if progress is not None:
                    row.progress = progress

    def restore_epochs(
        self, job_id: str, worker_id: str, metrics: list[dict[str, Any]], progress: dict[str, Any]
    ) -> None:
        """Put back the metrics of the epochs a resumed job does not run again (one write)."""
        with self._sessions.begin() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is not None and row.worker_id == worker_id and row.status == "running":
                row.metrics = list(metrics)
                row.progress = progress

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: str,
        *,
        result_version: int | None = None,
        promoted: bool | None = None,
        error: str | None = None,
        kept_epoch: int | None = None,
        stop_reason: str | None = None,
    ) -> bool:
        """End a job this worker holds; False when it no longer holds it."""
        with self._sessions.begin() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None or row.worker_id != worker_id or row.status != "running":
                return False
            now = utcnow()
            row.status = status
            row.result_version = result_version
            row.promoted = promoted
            row.kept_epoch = kept_epoch
            row.stop_reason = stop_reason
            row.error = error
            row.finished_at = now
            if row.started_at is not None:
                row.duration_s = (now - row.started_at).total_seconds()
            return True

    def release(self, job_id: str, worker_id: str) -> None:
        """Hand a job back to the queue (worker shutting down), not counting the attempt."""
        with self._sessions.begin() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker_id == worker_id)
                .where(JobRow.status == "running")
                .values(
                    status="queued",
                    worker_id=None,
                    attempts=JobRow.attempts - 1,
                    progress={},
                    metrics=[],
                )
            )

    def reap_stale(self, stale_after_s: float, max_attempts: int) -> list[str]:
        """Requeue or fail running jobs whose worker stopped heartbeating; returns their ids."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        reaped: list[str] = []
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(JobRow)
                .where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
                .with_for_update(skip_locked=True)
            )
            for row in rows:
                reaped.append(row.id)
                lost = f"worker {row.worker_id} stopped heartbeating (attempt {row.attempts})"
                if row.result_version is not None:
                    # It published (in the version's own transaction) and died before it said
                    # so: that is its outcome. Running it again would publish a second version.
                    row.status, row.error = "succeeded", None
                elif row.cancel_requested:
                    row.status, row.error = "cancelled", None
                elif row.attempts < max_attempts:
                    row.status, row.error = "queued", lost + "; queued again"
                    row.progress, row.metrics, row.phase = {}, [], None
                else:
                    row.status, row.error = "failed", lost + "; no attempts left"
                row.worker_id = None
                if row.status != "queued":
                    row.finished_at = utcnow()
        return reaped
