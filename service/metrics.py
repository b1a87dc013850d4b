"""Prometheus metrics, on a registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bnserve_batch_size",
            "Samples per forward pass after dynamic batching",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.queued = Gauge(
            "bnserve_queued_samples", "Samples waiting for a forward pass", registry=self.registry
        )
        self.serving_version = Gauge(
            "bnserve_serving_version",
            "The version each model serves in this process",
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

    def prediction_done(
        self, model: str, version: int, outcome: str, seconds: float, samples: int
    ) -> None:
        """One answered prediction (/v1 predict or v2 infer); `samples` only when it succeeded."""
        self.predictions.labels(model, str(version), outcome).inc()
        self.latency.labels(model).observe(seconds)
        if samples:
            self.samples.labels(model).inc(samples)

    def forget_model(self, model: str) -> None:
        """Drop every label set of a deleted model, so deleted names do not pile up here."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and "model" in metric._labelnames:
                metric.remove_by_labels({"model": model})
