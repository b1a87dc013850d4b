"""Job metrics read from the database at scrape time: jobs by status, progress, epoch durations.

Training workers are separate processes (on other machines in the compose stack); the job rows
are what all of them write, so any API process can report every job. An ended job's epochs never
change, so its durations are read once and kept; each scrape reads the id, model and status of
every job, and the progress and epochs only of running jobs and of jobs that ended since.
Blocking: it runs in the scrape's thread.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from service.jobs import ACTIVE, FINAL, JobQueue

# Epochs of the small built-in models take well under a second on a CPU; image models minutes.
EPOCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


def progress_ratio(progress: dict[str, Any]) -> float:
    """The fraction of a job's epochs done, counting the current epoch's steps."""
    epochs = int(progress.get("epochs") or 0)
    if epochs <= 0:
        return 0.0
    epoch = int(progress.get("epoch") or 0)
    step, steps = int(progress.get("step") or 0), int(progress.get("steps") or 0)
    done = epoch - 1 + step / steps if steps > 0 else epoch
    return min(max(done / epochs, 0.0), 1.0)


def _bound(bound: float) -> str:
    """A bucket's `le` as prometheus-client writes its own histograms' (`1.0`, `+Inf`)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def durations(metrics: list[dict[str, Any]]) -> list[float]:
    return [float(m["duration_s"]) for m in metrics if m.get("duration_s") is not None]


class JobMetrics:
    """A prometheus-client collector over the job queue."""

    def __init__(self, jobs: JobQueue) -> None:
        self._jobs = jobs
        self._lock = threading.Lock()
        # Ended jobs: id -> (model, epoch durations), read once.
        self._ended: dict[str, tuple[str, list[float]]] = {}

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            rows = self._jobs.overview()
            running = [(job_id, model) for job_id, model, status in rows if status == "running"]
            ended = {job_id: model for job_id, model, status in rows if status in FINAL}
            unread = [job_id for job_id in ended if job_id not in self._ended]
            details = self._jobs.progress_of([job_id for job_id, _ in running] + unread)
            for job_id in unread:
                if job_id in details:
                    self._ended[job_id] = (ended[job_id], durations(details[job_id][1]))
            for job_id in self._ended.keys() - ended.keys():  # deleted with their model
                del self._ended[job_id]
            samples: dict[str, list[float]] = {}
            for model, epoch_durations in self._ended.values():
                samples.setdefault(model, []).extend(epoch_durations)

        by_status = GaugeMetricFamily(
            "bnserve_jobs", "Training jobs in the database, by status", labels=["status"]
        )
        counts = dict.fromkeys((*ACTIVE, *FINAL), 0)
        for _, _, status in rows:
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status

        ratio = GaugeMetricFamily(
            "bnserve_job_progress_ratio",
            "Fraction of a running job's epochs done, steps of the current epoch included",
            labels=["job", "model"],
        )
        epoch = GaugeMetricFamily(
            "bnserve_job_epoch",
            "The epoch a running job is in (or has just finished)",
            labels=["job", "model"],
        )
        for job_id, model in running:
            progress, metrics = details.get(job_id, ({}, []))
            ratio.add_metric([job_id, model], progress_ratio(progress))
            epoch.add_metric([job_id, model], int(progress.get("epoch") or 0))
            samples.setdefault(model, []).extend(durations(metrics))
        yield ratio
        yield epoch

        histogram = HistogramMetricFamily(
            "bnserve_epoch_duration_seconds",
            "Wall time of each training epoch reported by the workers (validation included)",
            labels=["model"],
        )
        for model, values in sorted(samples.items()):
            values.sort()
            buckets = [
                (_bound(bound), float(bisect.bisect_right(values, bound)))
                for bound in EPOCH_BUCKETS
            ]
            histogram.add_metric([model], buckets, sum(values))
        yield histogram
