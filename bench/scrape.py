"""bnserve's own view of a measurement, from `/metrics` before and after it.

The batch-size histogram `bnserve_batch_size{model}` gives the batches the server formed (its
`_sum / _count` over the measurement is the mean batch, the size the in-process limit is measured
at), `bnserve_predictions_total{model}` the requests it answered, and the queue-wait, compute and
latency histograms where each request's time went inside the server.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, str], float]


def scrape(base_url: str) -> Samples:
    """Every sample of the server's `/metrics`, summed per (sample name, model label)."""
    return parse(httpx.get(base_url + "/metrics", timeout=30).text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("model", ""))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def delta(before: Samples, after: Samples, name: str, model: str) -> float | None:
    if (name, model) not in after:
        return None
    return after[(name, model)] - before.get((name, model), 0.0)


def served(before: Samples, after: Samples, model: str) -> dict[str, float | None]:
    """Mean batch size, forward passes and answered predictions between two scrapes."""
    total = delta(before, after, "bnserve_batch_size_sum", model)
    passes = delta(before, after, "bnserve_batch_size_count", model)
    compute = delta(before, after, "bnserve_compute_seconds_sum", model)
    waited = delta(before, after, "bnserve_queue_wait_seconds_sum", model)
    waits = delta(before, after, "bnserve_queue_wait_seconds_count", model)
    latency = delta(before, after, "bnserve_prediction_latency_seconds_sum", model)
    answered = delta(before, after, "bnserve_prediction_latency_seconds_count", model)
    return {
        "mean_batch": total / passes if total is not None and passes else None,
        "forward_passes": passes,
        "server_predictions": delta(before, after, "bnserve_predictions_total", model),
        # Where a request's time went inside the server (ms): waiting for its pass, the pass,
        # and the whole handling; what hey's latency adds on top is HTTP and the client.
        "mean_compute_ms": 1e3 * compute / passes if compute is not None and passes else None,
        "mean_queue_wait_ms": 1e3 * waited / waits if waited is not None and waits else None,
        "mean_server_ms": 1e3 * latency / answered if latency is not None and answered else None,
        # CPU seconds the input-drift probe spent (None where it is off).
        "drift_cpu_seconds": delta(before, after, "bnserve_input_drift_cpu_seconds_total", model),
    }
