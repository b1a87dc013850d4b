"""The worker loop: claim a job, run it with a heartbeat beside it, record how it ended.

A heartbeat thread writes progress and the heartbeat every `WORKER_HEARTBEAT_S` and reads back
whether the job was cancelled; the training loop checks that flag before every step, so a cancel
takes effect within one step of the heartbeat seeing it. On SIGTERM the worker stops its job and
hands it back to the queue.

A training job saves its state at the end of every epoch (`service.worker.resume`); a job handed
back (shutdown, a dead worker, a stale heartbeat) continues from there on whichever worker claims
it next, and its state file goes when the job ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from typing import Any

import torch

from service.checkpoints.store import CheckpointStore
from service.datasets.store import DatasetStore
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.tables import JobRow
from service.files import Owner
from service.jobs import JobQueue
from service.registry import Registry
from service.serving.device import resolve_device
from service.settings import Settings
from service.worker.execution import Cancelled, JobHooks, run_job
from service.worker.resume import ResumeStore

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings) -> None:
        from models import load_plugins

        self.settings = settings
        load_plugins(settings.ARCHITECTURE_PLUGINS)
        engine = make_engine(settings.database_url)
        migrate(engine, settings.DATA_DIR)
        sessions = make_sessionmaker(engine)
        self.owner = Owner(settings.DATA_DIR)
        self.registry = Registry(sessions, CheckpointStore(settings.checkpoint_dir, self.owner))
        self.datasets = DatasetStore(
            settings.dataset_dir, self.owner, sessions, max_bytes=settings.max_dataset_bytes
        )
        self.queue = JobQueue(sessions)
        self.states = ResumeStore(settings.resume_dir, self.owner)
        self.device = resolve_device(settings.DEVICE)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{self.owner.token[:6]}"
        self.shutdown = threading.Event()

    def run_forever(self) -> None:
        log.info("worker %s ready on %s", self.id, self.device)
        while not self.shutdown.is_set():
            self.queue.reap_stale(self.settings.JOB_STALE_AFTER_S, self.settings.JOB_MAX_ATTEMPTS)
            # A listing of a small folder: it also catches states of jobs that ended elsewhere.
            self.states.sweep(self.queue)
            job = self.queue.claim(self.id)
            if job is None:
                self.shutdown.wait(self.settings.WORKER_POLL_S)
                continue
            self.run_one(job)
        self.owner.close()

    def run_one(self, job: JobRow) -> None:
        log.info("worker %s runs job %s (%s %s)", self.id, job.id, job.kind, job.model_name)
        stop = threading.Event()
        progress: dict[str, Any] = {}
        beating = threading.Event()

        def beat() -> None:
            while not beating.wait(self.settings.WORKER_HEARTBEAT_S):
                try:
                    if not self.queue.heartbeat(job.id, self.id, dict(progress) or None):
                        stop.set()
                except Exception:
                    log.exception("heartbeat for job %s failed", job.id)

        hooks = JobHooks(
            should_stop=lambda: stop.is_set() or self.shutdown.is_set(),
            on_progress=progress.update,
            # Progress goes with each epoch's metrics, so the two never disagree when read.
            on_epoch=lambda metrics: self.queue.add_epoch(
                job.id, self.id, metrics, dict(progress) or None
            ),
            begin_publishing=lambda: self.queue.begin_publishing(job.id, self.id),
            holds_job=lambda: not stop.is_set(),
            on_resume=lambda metrics, resumed: self.queue.restore_epochs(
                job.id, self.id, metrics, resumed
            ),
        )
        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        ended = False
        try:
            outcome = run_job(job, self.registry, self.datasets, self.device, hooks, self.states)
        except Cancelled:
            if self.shutdown.is_set() and not stop.is_set():
                self.queue.release(job.id, self.id)
                log.info("job %s handed back to the queue on shutdown", job.id)
            else:
                ended = self.queue.finish(job.id, self.id, "cancelled")
                log.info("job %s cancelled", job.id)
        except Exception as exc:
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            ended = self.queue.finish(job.id, self.id, "failed", error=_describe(exc))
        else:
            self.queue.heartbeat(job.id, self.id, dict(progress) or None)
            ended = self.queue.finish(
                job.id,
                self.id,
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


def _describe(exc: Exception) -> str:
    detail = getattr(exc, "detail", None)
    return f"{type(exc).__name__}: {detail or exc}"
