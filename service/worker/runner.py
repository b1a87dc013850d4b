"""The worker loop: claim a job, run it with a heartbeat beside it, record how it ended.

A heartbeat thread writes progress and the heartbeat every `WORKER_HEARTBEAT_S` and reads back
whether the job was cancelled; the training loop checks that flag before every step, so a cancel
takes effect within one step of the heartbeat seeing it. On SIGTERM the worker stops its job and
hands it back to the queue.

A training job saves its state at the end of every epoch (`service.worker.resume`); a job handed
back (shutdown, a dead worker, a stale heartbeat) continues from there on whichever worker claims
it next, and its state file goes when the job ends.

A database that goes away for a while (a PostgreSQL restart, a SQLite lock held past the busy
timeout) stops neither the worker nor its job: claims back off and try again, the job's own
updates (epochs, publishing, its end) are retried with backoff while training waits, and a
transient error anywhere else before publishing hands the job back without counting the attempt,
so it resumes from its last epoch (`service.db.retry`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from service.db.engine import engine_for, make_sessionmaker, migrate
from service.db.retry import Backoff, describe, is_transient, retrying
from service.db.tables import JobRow
from service.files import Owner
from service.jobs import JobQueue, result_recorder
from service.registry import Registry
from service.serving.device import resolve_device
from service.serving.precision import apply_precision, backend_precisions
from service.settings import Settings
from service.stores import open_stores
from service.worker.execution import Cancelled, JobHooks, run_job
from service.worker.resume import ResumeStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    def __init__(self, settings: Settings) -> None:
        from models import load_plugins

        self.settings = settings
        # The device and plugins first: a bad setting fails before the worker writes anything.
        self.device = resolve_device(settings.DEVICE)
        plugins = load_plugins(settings.ARCHITECTURE_PLUGINS)
        if plugins:
            log.info("loaded architecture plugin modules: %s", ", ".join(plugins))
        engine = engine_for(settings)
        migrate(engine, settings.DATA_DIR)
        sessions = make_sessionmaker(engine)
        self.owner = Owner(settings.DATA_DIR)
        checkpoints, self.datasets = open_stores(settings, self.owner, sessions)
        self.registry = Registry(sessions, checkpoints)
        self.queue = JobQueue(sessions)
        self.states = ResumeStore(settings.resume_dir, self.owner)
        apply_precision(settings.FP32_PRECISION)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{self.owner.token[:6]}"
        self.shutdown = threading.Event()

    def run_forever(self) -> None:
        log.info(
            "worker %s ready on %s, fp32 precision %s", self.id, self.device, backend_precisions()
        )
        backoff = Backoff()
        while not self.shutdown.is_set():
            try:
                job = self._next_job()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                wait = backoff.next_wait()
                log.warning(
                    "worker %s: database unavailable (%s); trying again in %.1f s",
                    self.id,
                    describe(exc),
                    wait,
                )
                self.shutdown.wait(wait)
                continue
            backoff.reset()
            if job is None:
                self.shutdown.wait(self.settings.WORKER_POLL_S)
                continue
            self.run_one(job)
        self.owner.close()

    def _next_job(self) -> JobRow | None:
        self.queue.reap_stale(self.settings.JOB_STALE_AFTER_S, self.settings.JOB_MAX_ATTEMPTS)
        # A listing of a small folder: it also catches states of jobs that ended elsewhere.
        self.states.sweep(self.queue)
        return self.queue.claim(self.id)

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """A job update, tried again through a database outage until it lands or we shut down."""
        return retrying(call, what, self.shutdown)

    def run_one(self, job: JobRow) -> None:
        log.info("worker %s runs job %s (%s %s)", self.id, job.id, job.kind, job.model_name)
        stop = threading.Event()
        progress: dict[str, Any] = {}
        beating = threading.Event()

        publishing = threading.Event()

        def beat() -> None:
            # Every beat tries once: the interval is already the backoff's natural pace.
            while not beating.wait(self.settings.WORKER_HEARTBEAT_S):
                try:
                    if not self.queue.heartbeat(job.id, self.id, dict(progress) or None):
                        stop.set()
                except Exception as exc:
                    if not is_transient(exc):
                        log.exception("heartbeat for job %s failed", job.id)
                    else:
                        log.warning(
                            "heartbeat for job %s: database unavailable (%s)", job.id, describe(exc)
                        )

        def begin_publishing() -> bool:
            began = self._retry(
                f"job {job.id}: begin publishing",
                lambda: self.queue.begin_publishing(job.id, self.id),
            )
            if began:
                publishing.set()
            return began

        hooks = JobHooks(
            should_stop=lambda: stop.is_set() or self.shutdown.is_set(),
            on_progress=progress.update,
            # Progress goes with each epoch's metrics, so the two never disagree when read.
            on_epoch=lambda metrics: self._retry(
                f"job {job.id}: record epoch",
                lambda: self.queue.add_epoch(job.id, self.id, metrics, dict(progress) or None),
            ),
            begin_publishing=begin_publishing,
            holds_job=lambda: not stop.is_set(),
            on_resume=lambda metrics, resumed: self._retry(
                f"job {job.id}: restore epochs",
                lambda: self.queue.restore_epochs(job.id, self.id, metrics, resumed),
            ),
            record_result=lambda promoted, kept, reason: result_recorder(
                job.id, self.id, promoted, kept, reason
            ),
        )
        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        ended = False
        try:
            outcome = run_job(
                job,
                self.registry,
                self.datasets,
                self.device,
                hooks,
                self.states,
                loader_threads=self.settings.LOADER_THREADS,
            )
        except Cancelled:
            if self.shutdown.is_set() and not stop.is_set():
                self._retry(f"job {job.id}: hand back", lambda: self.queue.release(job.id, self.id))
                log.info("job %s handed back to the queue on shutdown", job.id)
            else:
                ended = self._end(job.id, "cancelled")
                log.info("job %s cancelled", job.id)
        except Exception as exc:
            if is_transient(exc) and not publishing.is_set():
                # The database went away under a step that is not retried (reading the model,
                # dataset or base weights, storing the result): nothing was published, so the
                # job goes back to the queue with its attempt and resumes from its last epoch.
                log.warning("job %s handed back: database unavailable (%s)", job.id, describe(exc))
                self._retry(f"job {job.id}: hand back", lambda: self.queue.release(job.id, self.id))
            else:
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                ended = self._end(job.id, "failed", error=_describe(exc))
        else:
            if self.settings.TEST_CRASH_POINT == "after_publish":
                # Test-only fault injection (tests/test_job_publishing.py): die as a SIGKILL
                # would, after the version is stored and before the job is marked finished.
                os.kill(os.getpid(), signal.SIGKILL)
            self._retry(
                f"job {job.id}: heartbeat",
                lambda: self.queue.heartbeat(job.id, self.id, dict(progress) or None),
            )
            ended = self._end(
                job.id,
                "succeeded",
                result_version=outcome.result_version,
                promoted=outcome.promoted,
                kept_epoch=outcome.kept_epoch,
                stop_reason=outcome.stop_reason,
            )
        finally:
            # Only a job this worker ended: one taken from it may be resuming on another worker.
            if ended:
                self.states.remove(job.id)
            beating.set()
            thread.join()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _end(self, job_id: str, status: str, **result: Any) -> bool:
        """`JobQueue.finish`, retried through an outage; False when the job is no longer ours."""
        return self._retry(
            f"job {job_id}: end {status}",
            lambda: self.queue.finish(job_id, self.id, status, **result),
        )


def _describe(exc: Exception) -> str:
    detail = getattr(exc, "detail", None)
    return f"{type(exc).__name__}: {detail or exc}"
