"""The benchmark's arithmetic: hey's CSV, bnserve's metrics as the bench reads them, the ratios.

The full benchmark is too long for the suite (bench/serving.py runs it); these pin what its
figures are made of, including the metric names it reads from the real `service.metrics.Metrics`.
"""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from bench import images, report
from bench.loadgen import summarize
from bench.scrape import parse, served
from service.metrics import Metrics

HEY_HEADER = (
    "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset"
)


def test_summarize_reads_hey_csv():
    rows = [
        # response-time (s), ..., status, offset (s since start)
        "0.0010,0.0001,0,0,0.0009,0,200,0.0000",
        "0.0020,0,0,0,0.0019,0,200,0.0010",
        "0.0030,0,0,0,0.0029,0,503,0.0030",
        "0.0040,0,0,0,0.0039,0,200,0.0060",
    ]
    result = summarize("\n".join([HEY_HEADER, *rows]) + "\n")
    assert result["requests"] == 4
    assert result["non_2xx"] == 1
    assert result["status"] == {"200": 3, "503": 1}
    assert result["p50_ms"] == pytest.approx(2.5)
    assert result["mean_ms"] == pytest.approx(2.5)
    # First request starts at 0, last one ends at 0.006 + 0.004 s.
    assert result["rps"] == pytest.approx(4 / 0.010)


def test_summarize_of_no_answers_is_zero_not_an_error():
    result = summarize(HEY_HEADER + "\n")
    assert result["requests"] == 0
    assert result["rps"] == 0.0
    assert result["p50_ms"] is None


def test_served_reads_bnserve_batch_histogram_and_prediction_counter():
    metrics = Metrics()
    metrics.batch_done("m", 4, [0.5] * 4, 1.0)
    metrics.prediction_done("m", 1, "ok", 9.0, 4)
    before = parse(generate_latest(metrics.registry).decode())
    metrics.batch_done("m", 8, [0.001] * 8, 0.004)
    metrics.batch_done("m", 16, [0.002] * 16, 0.006)
    metrics.batch_done("other", 64, [1.0] * 64, 1.0)
    for _ in range(24):
        metrics.prediction_done("m", 1, "ok", 0.010, 1)
    metrics.drift_measured("m", 1, None, 0.002)
    metrics.drift_measured("m", 1, None, 0.003)
    after = parse(generate_latest(metrics.registry).decode())
    got = served(before, after, "m")
    assert got == {
        "mean_batch": 12.0,
        "forward_passes": 2.0,
        "server_predictions": 24.0,
        "mean_compute_ms": pytest.approx(5.0),
        "mean_queue_wait_ms": pytest.approx((8 * 1 + 16 * 2) / 24),
        "mean_server_ms": pytest.approx(10.0),
        "drift_cpu_seconds": pytest.approx(0.005),
    }


def _row(rps, p50=None):
    return {"rps": rps, "p50_ms": p50}


def _round(bnserve_64, malloc_64, litserve_64, limit_64, lone_p50, forward_ms):
    return {
        "models": {
            "resnet18": {
                "http": {
                    "bnserve": {"1": _row(30.0, lone_p50), "64": _row(bnserve_64)},
                    "bnserve+malloc": {"64": _row(malloc_64)},
                    "bnserve+drift": {"64": _row(0.97 * bnserve_64)},
                    "litserve": {"64": _row(litserve_64)},
                },
                "limit": {
                    "batch_1": {"forward_ms": forward_ms},
                    "by_clients": {"64": {"samples_per_s": limit_64}},
                },
            }
        }
    }


def test_ratios_per_round_then_median_and_targets():
    per_round = [
        report.round_ratios(_round(90, 99, 60, 100, 29.0, 28.0)),
        report.round_ratios(_round(80, 96, 40, 100, 31.0, 28.0)),
        report.round_ratios(_round(95, 95, 50, 100, 29.5, 28.0)),
    ]
    first = per_round[0]["resnet18"]
    assert first["bnserve/limit@64"] == pytest.approx(0.9)
    assert first["bnserve/litserve@64"] == pytest.approx(1.5)
    # A variant is reported as its gain over the default bnserve.
    assert first["bnserve+malloc/bnserve@64"] == pytest.approx(1.1)
    assert first["lone_p50_minus_forward_ms@1"] == pytest.approx(1.0)

    median = report.median_ratios(per_round)["resnet18"]
    assert median["bnserve/limit@64"] == pytest.approx(0.9)
    assert median["bnserve/litserve@64"] == pytest.approx(1.9)
    assert median["lone_p50_minus_forward_ms@1"] == pytest.approx(1.5)

    met = {t["target"]: t["met"] for t in report.targets({"resnet18": median})}
    assert met == {
        "resnet18@64 bnserve/limit >= 0.9": True,
        "resnet18@64 bnserve/litserve >= 1.5": True,
        "resnet18@1 lone_p50_minus_forward_ms <= 1.5": True,
        "resnet18@64 bnserve+drift/bnserve >= 0.95": True,
    }
    low = report.targets({"resnet18": {**median, "bnserve/limit@64": 0.89}})
    assert [t["met"] for t in low if "limit" in t["target"]] == [False]


def test_image_row_is_the_median_of_per_round_png_over_tensor_ratios() -> None:
    def rps(png: float, tensor: float) -> dict[str, dict[str, float]]:
        return {"png": {"rps": png}, "tensor": {"rps": tensor}}

    rounds = [{"16": rps(50, 100)}, {"16": rps(90, 100)}, {"16": rps(160, 200)}]
    row = images.summarize(rounds)["medians"]["16"]
    assert row["png/tensor"] == pytest.approx(0.8)  # of 0.5, 0.9 and 0.8
    assert (row["png_rps"], row["tensor_rps"]) == (90, 100)
    assert images.round_order(0) != images.round_order(1)  # each body goes first in turn
    assert "0.80" in images.table(images.summarize(rounds))
