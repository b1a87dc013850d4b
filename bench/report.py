"""Medians over rounds, the ratios issues 8's and 15's targets name, and the printed table.

A ratio is taken within each round (both sides measured minutes apart on the same machine state)
and the median of those per-round ratios is reported, so drift between rounds cancels.
"""

from __future__ import annotations

import statistics
from typing import Any

# (model, clients, ratio name, comparison, bound) as the issue's Targets state them.
TARGETS: list[tuple[str, int, str, str, float]] = [
    ("resnet18", 64, "bnserve/limit", ">=", 0.9),
    ("resnet18", 64, "bnserve/litserve", ">=", 1.5),
    ("mlp_bn", 64, "bnserve/noop", ">=", 0.8),
    ("resnet18", 1, "lone_p50_minus_forward_ms", "<=", 1.5),
    ("mlp_bn", 1, "lone_p50_minus_forward_ms", "<=", 1.5),
    # Issue 15: the input-drift alarm on (`--drift`) costs under 5% of throughput.
    ("resnet18", 64, "bnserve+drift/bnserve", ">=", 0.95),
    ("mlp_bn", 64, "bnserve+drift/bnserve", ">=", 0.95),
]

NUMERIC = (
    "rps",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "mean_batch",
    "client_cpu_share",
    "mean_queue_wait_ms",
    "mean_compute_ms",
    "mean_server_ms",
    "server_cpu_us_per_request",
    "drift_cpu_share",
)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: each contender's figures at each client count, and the limit's, over rounds."""
    out: dict[str, Any] = {}
    for model in rounds[0]["models"]:
        per = [r["models"][model] for r in rounds]
        http: dict[str, dict[str, Any]] = {}
        for contender, by_clients in per[0]["http"].items():
            http[contender] = {}
            for clients in by_clients:
                runs = [p["http"][contender][clients] for p in per]
                row: dict[str, Any] = {k: _median([run.get(k) for run in runs]) for k in NUMERIC}
                row["requests"] = sum(run["requests"] for run in runs)
                row["non_2xx"] = sum(run["non_2xx"] for run in runs)
                http[contender][clients] = row
        limit = {
            "batch_1": {
                "forward_ms": _median([p["limit"]["batch_1"]["forward_ms"] for p in per]),
                "samples_per_s": _median([p["limit"]["batch_1"]["samples_per_s"] for p in per]),
            },
            "by_clients": {
                clients: {
                    "batch": _median([p["limit"]["by_clients"][clients]["batch"] for p in per]),
                    "samples_per_s": _median(
                        [p["limit"]["by_clients"][clients]["samples_per_s"] for p in per]
                    ),
                }
                for clients in per[0]["limit"]["by_clients"]
            },
        }
        out[model] = {"http": http, "limit": limit}
    return out


def round_ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One round's ratios per model: bnserve (and its variants) against each contender."""
    ratios: dict[str, dict[str, float]] = {}
    for model, figures in result["models"].items():
        http = figures["http"]
        mine: dict[str, float] = {}
        bnserve = http.get("bnserve", {})
        for clients, row in bnserve.items():
            limit = figures["limit"]["by_clients"].get(clients)
            if limit and row["rps"]:
                mine[f"bnserve/limit@{clients}"] = row["rps"] / limit["samples_per_s"]
            for other, by_clients in http.items():
                theirs = by_clients.get(clients)
                if other == "bnserve" or not (theirs and theirs["rps"] and row["rps"]):
                    continue
                if other.startswith("bnserve+"):  # a variant: how much it gains over the default
                    mine[f"{other}/bnserve@{clients}"] = theirs["rps"] / row["rps"]
                else:
                    mine[f"bnserve/{other}@{clients}"] = row["rps"] / theirs["rps"]
        lone = bnserve.get("1")
        if lone and lone["p50_ms"] is not None:
            forward = figures["limit"]["batch_1"]["forward_ms"]
            mine["lone_p50_minus_forward_ms@1"] = lone["p50_ms"] - forward
        ratios[model] = mine
    return ratios


def median_ratios(per_round: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for model in per_round[0]:
        names = sorted({name for r in per_round for name in r.get(model, {})})
        out[model] = {
            name: statistics.median([r[model][name] for r in per_round if name in r[model]])
            for name in names
        }
    return out


def targets(ratios: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The issue's targets that this run measured, each with its value and whether it is met."""
    out = []
    for model, clients, name, op, bound in TARGETS:
        value = ratios.get(model, {}).get(f"{name}@{clients}")
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        out.append(
            {
                "target": f"{model}@{clients} {name} {op} {bound}",
                "value": value,
                "met": met,
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _split(row: dict[str, Any]) -> str:
    """bnserve's own account of a request: queue wait, forward pass, whole handling (ms)."""
    parts = (row.get(k) for k in ("mean_queue_wait_ms", "mean_compute_ms", "mean_server_ms"))
    shown = [_fmt(v, ".2f") for v in parts]
    return "" if shown == ["-"] * 3 else "/".join(shown)


def table(summary: dict[str, Any], title: str) -> str:
    lines = [title]
    header = (
        f"{'':22}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'mean batch':>11}{'non-2xx':>8}{'hey CPU':>8}{'wait/pass/server ms':>22}"
    )
    for model, figures in summary["medians"].items():
        lines += ["", f"{model}", header]
        for contender, by_clients in figures["http"].items():
            for clients, row in by_clients.items():
                lines.append(
                    f"{contender:22}{clients:>8}{_fmt(row['rps'], '.1f'):>10}"
                    f"{_fmt(row['p50_ms'], '.2f'):>9}{_fmt(row['p99_ms'], '.2f'):>9}"
                    f"{_fmt(row['mean_batch'], '.1f'):>11}{row['non_2xx']:>8}"
                    f"{_fmt(row['client_cpu_share'], '.0%'):>8}"
                    f"{_split(row):>22}"
                )
        limit = figures["limit"]
        lines.append(
            f"{'limit, batch 1':22}{'':>8}{_fmt(limit['batch_1']['samples_per_s'], '.1f'):>10}"
            f"{_fmt(limit['batch_1']['forward_ms'], '.3f'):>9}   (samples/s, ms per forward)"
        )
        for clients, row in limit["by_clients"].items():
            label = f"limit, batch {_fmt(row['batch'], '.0f')}"
            lines.append(
                f"{label:22}{clients:>8}{_fmt(row['samples_per_s'], '.1f'):>10}"
                "            (samples/s at bnserve's mean batch)"
            )
        ratios = summary["ratios"]["median"].get(model, {})
        if ratios:
            lines.append("  ratios (median of per-round): " + ", ".join(
                f"{name} {value:.2f}" for name, value in ratios.items()
            ))  # fmt: skip
        probe = [
            f"{contender}@{clients} {row['drift_cpu_share']:.2%}"
            for contender, by_clients in figures["http"].items()
            for clients, row in by_clients.items()
            if row.get("drift_cpu_share") is not None
        ]
        if probe:
            lines.append("  input-drift probe's CPU / the server's: " + ", ".join(probe))
    if summary["targets"]:
        lines += ["", "Targets (issues 8 and 15):"]
        for t in summary["targets"]:
            lines.append(f"  {'met ' if t['met'] else 'MISS'}  {t['target']}: {t['value']:.2f}")
    return "\n".join(lines)
