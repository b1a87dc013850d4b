"""Prometheus metrics: a registry per app, or prometheus-client's multiprocess mode.

One API process (and the in-process apps of the tests) keeps its metrics in memory, on a registry
of its own, so several apps can live in one process. With BNSERVE_API_WORKERS > 1 a scrape lands
on one process out of several, so each writes its values to mmap files in its server's folder
under `Settings.metrics_dir` (prometheus-client's multiprocess mode, chosen when the library is
first imported, hence the environment variable that `python -m service` sets before it starts
the API processes) and the scraped process merges every process's files. Gauges say how they
merge (`multiprocess_mode`): per live process (`liveall`, with a `pid` label) or summed over live
processes (`livesum`).

Label sets cannot be removed from those files, so in multiprocess mode a gauge is "removed" by
setting it to NaN, and the scrape drops NaN gauge samples.

Job metrics (by status, progress, epoch durations) come from the database at scrape time: training
workers are other processes, possibly on other machines, and the job rows are the one place that
sees them all. The scrape runs in a thread, off the event loop.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import math
import os
import shutil
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from service.settings import Settings

# prometheus-client's own variable: read when the library is imported, so it must be set in the
# environment of the API processes before they start (`python -m service` does it).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Queue waits and forward passes of small models are tens of microseconds on a CPU.
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_dir(settings: Settings) -> Path | None:
    """The folder of this process's metric files, or None for an in-memory registry.

    Multiprocess mode needs both several API processes and the library switched to it at import;
    an app built in-process with API_WORKERS > 1 (a test) keeps its own registry.
    """
    named = os.environ.get(MULTIPROC_ENV)
    if settings.API_WORKERS > 1 and named and Path(named).parent == settings.metrics_dir:
        return Path(named)
    return None


def prepare_multiprocess_dir(root: Path) -> Path:
    """A fresh folder under `root` for the API processes about to be started, set for
    prometheus-client in the environment they inherit.

    One per server (host name and pid): replicas share the data dir, and one must neither empty
    nor merge another's files. Folders of servers on this host that are gone are removed.
    """
    host = socket.gethostname()
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.glob(f"{host}-*"):
        pid = folder.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    path = root / f"{host}-{os.getpid()}"
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie: an API process killed a moment ago stays a zombie until uvicorn's
    parent reaps it, which can take its health-check timeout (30 s) when a ping was in flight."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return _alive(pid) if not Path("/proc/self").exists() else False
    except OSError:
        return _alive(pid)
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def sweep_dead_processes(path: Path) -> None:
    """Drop the live gauges of API processes that are gone (`mark_process_dead` for each)."""
    pids = {f.stem.rpartition("_")[2] for f in path.glob("gauge_live*_*.db")}
    for pid in pids:
        if pid.isdigit() and not _running(int(pid)):
            process_gone(path, int(pid))


def process_gone(path: Path, pid: int) -> None:
    """Drop an ended API process's live gauges (its counters and histograms stay in the totals).

    Called by the parent when uvicorn replaces the process, and by a scrape that finds it gone,
    whichever comes first."""
    with contextlib.suppress(FileNotFoundError):  # the other one removed them meanwhile
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each of `values`, with one write per bucket touched.

    In multiprocess mode each write is an mmap update (~2 us on the 2-core test machine): a batch
    of 8 requests' queue waits is then about 3 writes instead of 16. Same samples as `observe`
    (tests/test_metrics.py checks it against the library).
    """
    if len(values) <= 1:
        for value in values:
            histogram.observe(value)
        return
    bounds = histogram._upper_bounds
    buckets = collections.Counter(bisect.bisect_left(bounds, value) for value in values)
    histogram._sum.inc(sum(values))
    for index, count in buckets.items():
        histogram._buckets[index].inc(count)


class _LiveSamples:
    """The merged files of every process, without the NaN samples of "removed" gauges."""

    def __init__(self, path: Path) -> None:
        self._files = MultiProcessCollector(None, str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self._files.collect():  # type: ignore[no-untyped-call]
            if metric.type == "gauge":
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            yield metric


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir
        # Collected at scrape time in whichever process answers (job rows from the database).
        self._scrape_collectors: list[Collector] = []
        self.predictions = Counter(
            "bnserve_predictions",
            "Prediction requests answered, by model, version and outcome",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.samples = Counter(
            "bnserve_predicted_samples", "Samples predicted", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            "bnserve_prediction_latency_seconds",
            "Time from request to response for predictions",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "bnserve_queue_wait_seconds",
            "Time a request waits in its model's batcher before its forward pass starts",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "bnserve_compute_seconds",
            "Time of one forward pass (a whole batch) on the forward thread",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bnserve_batch_size",
            "Samples per forward pass after dynamic batching",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queued = Gauge(
            "bnserve_queued_samples",
            "Samples waiting for a forward pass (summed over API processes)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.serving_version = Gauge(
            "bnserve_serving_version",
            "The version each model serves in this process",
            ["model"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.loaded_bytes = Gauge(
            "bnserve_loaded_model_bytes",
            "Bytes of parameters and buffers of each version loaded in this process",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.input_drift = Gauge(
            "bnserve_input_drift",
            "Input-drift score of each loaded version: live inputs of its first BN layers "
            "against their running statistics (mean symmetric KL per channel; with "
            "BNSERVE_DRIFT_SAMPLE_RATE > 0, once enough values are pooled)",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.input_drift_cpu = Counter(
            "bnserve_input_drift_cpu_seconds",
            "CPU seconds the input-drift probe spent measuring sampled batches (its whole cost "
            "but the GIL it shares; compare with process_cpu_seconds_total)",
            ["model"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "bnserve_swaps",
            "Serving-version swaps in this process",
            ["model"],
            registry=self.registry,
        )
        self.version_load_failures = Counter(
            "bnserve_version_load_failures",
            "Failed loads of a model's serving version by this process's sync (retried with "
            "backoff)",
            ["model"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "bnserve_uploads",
            "Checkpoint uploads by outcome code",
            ["outcome"],
            registry=self.registry,
        )
        # Children looked up once: `labels()` costs a tuple, a lock and a dict look-up per call,
        # on the prediction path (issue #8).
        self._answered: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}
        self._batches: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        self._loaded: set[tuple[str, int]] = set()
        # Drift scores are set from the drift thread: the lock keeps one from landing on a
        # version that the loop has just unloaded (a label set no one would remove).
        self._drift_lock = threading.Lock()
        self._drifted: set[tuple[str, int]] = set()

    @property
    def multiprocess(self) -> bool:
        return self._multiprocess_dir is not None

    def add_scrape_collector(self, collector: Collector) -> None:
        """Collect `collector` on every scrape, once, whichever process answers."""
        if self._multiprocess_dir is None:
            self.registry.register(collector)
        self._scrape_collectors.append(collector)

    def exposition(self) -> bytes:
        """The text of a scrape (blocking: it may read files and the database)."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # The parent reaps too (`serve(on_child_exit=...)`), but only once uvicorn notices.
        sweep_dead_processes(self._multiprocess_dir)
        registry = CollectorRegistry()
        registry.register(_LiveSamples(self._multiprocess_dir))
        for collector in self._scrape_collectors:
            registry.register(collector)
        return generate_latest(registry)

    # The prediction path

    def prediction_done(
        self, model: str, version: int, outcome: str, seconds: float, samples: int
    ) -> None:
        """One answered prediction (/v1 predict or v2 infer); `samples` only when it succeeded."""
        key = (model, version, outcome)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.predictions.labels(model, str(version), outcome),
                self.latency.labels(model),
            )
        children[0].inc()
        children[1].observe(seconds)
        if samples:
            self.samples.labels(model).inc(samples)

    def batch_done(
        self, model: str, size: int, waits: Sequence[float], compute_seconds: float
    ) -> None:
        """One forward pass: its size, its time, and how long each of its requests waited."""
        children = self._batches.get(model)
        if children is None:
            children = self._batches[model] = (
                self.batch_size.labels(model),
                self.compute.labels(model),
                self.queue_wait.labels(model),
            )
        children[0].observe(size)
        children[1].observe(compute_seconds)
        observe_all(children[2], waits)

    # Serving state

    def swapped(self, model: str, version: int) -> None:
        self.serving_version.labels(model).set(version)
        self.swaps.labels(model).inc()

    def loaded_changed(self, loaded: dict[tuple[str, int], int]) -> None:
        """The versions loaded in this process now, with their bytes (after a load or eviction)."""
        for key in self._loaded - loaded.keys():
            self._remove(self.loaded_bytes, key[0], str(key[1]))
        for (model, version), nbytes in loaded.items():
            self.loaded_bytes.labels(model, str(version)).set(nbytes)
        with self._drift_lock:
            self._loaded = set(loaded)
            for key in self._drifted - self._loaded:
                self._remove(self.input_drift, key[0], str(key[1]))
                self._drifted.discard(key)

    def drift_measured(
        self, model: str, version: int, score: float | None, cpu_seconds: float
    ) -> None:
        """A version's drift score after a measurement (any thread); None: not enough data yet."""
        self.input_drift_cpu.labels(model).inc(cpu_seconds)
        key = (model, version)
        with self._drift_lock:
            if score is None or key not in self._loaded:
                return
            self.input_drift.labels(model, str(version)).set(score)
            self._drifted.add(key)

    def forget_model(self, model: str) -> None:
        """Drop a deleted model's label sets from this process's metrics.

        Counters and histograms in multiprocess files cannot lose a label set; they stay until the
        processes restart (their values only grow, so a re-created model continues them).
        """
        for answered in [k for k in self._answered if k[0] == model]:
            del self._answered[answered]
        self._batches.pop(model, None)
        self._remove(self.serving_version, model)
        with self._drift_lock:
            for key in [k for k in self._loaded if k[0] == model]:
                self._remove(self.loaded_bytes, key[0], str(key[1]))
                self._loaded.discard(key)
            for key in [k for k in self._drifted if k[0] == model]:
                self._remove(self.input_drift, key[0], str(key[1]))
                self._drifted.discard(key)
        if self._multiprocess_dir is not None:
            return
        for metric in (
            self.samples,
            self.latency,
            self.queue_wait,
            self.compute,
            self.input_drift_cpu,
        ):
            self._remove(metric, model)
        self._remove(self.batch_size, model)
        self._remove(self.swaps, model)
        self._remove(self.version_load_failures, model)
        self.predictions.remove_by_labels({"model": model})

    def _remove(self, metric: Gauge | Counter | Histogram, *labels: str) -> None:
        if self._multiprocess_dir is None:
            metric.remove(*labels)  # an unknown label set is ignored
        elif isinstance(metric, Gauge):
            metric.labels(*labels).set(math.nan)
