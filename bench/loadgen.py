"""The load generator: Debian's `hey`, closed-loop keep-alive clients, one result row per response.

`hey` is a compiled Go client that costs little CPU per request, so on a small machine most of
the cores stay with the server; its share is measured and reported anyway (its user+sys CPU time
over wall time x cores). `-o csv` gives every response's latency and status code, so the
percentiles are exact rather than read off a histogram. Requests that got no HTTP answer at all
(connection refused or reset, hey's 20 s timeout) are not rows in that CSV; a server that dies is
caught by the harness, and for bnserve the server's own prediction counter is compared.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def ensure_hey() -> str:
    """The path of `hey`; installed with apt-get (as root) when missing."""
    found = shutil.which("hey")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("hey is not installed; install it with `sudo apt-get install -y hey`")
    print("hey not found: installing it with `apt-get install -y hey` (Debian/Ubuntu package)")
    install = ["apt-get", "install", "-y", "-q", "hey"]
    if subprocess.run(install, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(install, check=True)
    found = shutil.which("hey")
    if not found:
        raise SystemExit("apt-get installed hey, but it is not on PATH")
    return found


@dataclass(frozen=True)
class Load:
    """What one `hey` run sends: the URL, the body file and its content type."""

    url: str
    body: Path
    content_type: str = "application/json"


def run_hey(hey: str, load: Load, *, clients: int, seconds: float) -> dict[str, Any]:
    """Drive `load` with `clients` keep-alive connections for `seconds`; the summary as a dict."""
    argv = [
        hey,
        "-z", f"{seconds}s",
        "-c", str(clients),
        "-m", "POST",
        "-T", load.content_type,
        "-D", str(load.body),
        "-o", "csv",
        load.url,
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = summarize(done.stdout.decode())
    summary["clients"] = clients
    summary["client_cpu_share"] = cpu / (wall * (os.cpu_count() or 1))
    return summary


def summarize(text: str) -> dict[str, Any]:
    """Requests, req/s, latency percentiles (ms) and status codes from hey's CSV output."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return {
            "requests": 0,
            "rps": 0.0,
            "p50_ms": None,
            "p99_ms": None,
            "mean_ms": None,
            "non_2xx": 0,
            "status": {},
        }
    latency = np.array([float(r["response-time"]) for r in rows]) * 1000
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    elapsed = max(ends) - min(float(r["offset"]) for r in rows)
    codes = Counter(r["status-code"] for r in rows)
    return {
        "requests": len(rows),
        "rps": len(rows) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "mean_ms": float(latency.mean()),
        "non_2xx": sum(n for code, n in codes.items() if not code.startswith("2")),
        "status": dict(codes),
    }
