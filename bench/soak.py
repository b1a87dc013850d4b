"""Soak run (not CI): minutes of mixed traffic at a fixed rate against a real `python -m service`.

Starts one server (`BNSERVE_WORKERS=1`: the API process and one training worker) on loopback
with a fresh data dir, then for `--minutes` runs, all at once and each at its own fixed pace:
prediction clients on the serving version, one on `?version=N` of recent versions, one on the
model the training jobs promote; an uploader of new versions; a promoter that moves the serving
version forward and back (roll-backs); a training job now and then; and a reader of the GET
endpoints. Every loop stops by itself at the deadline.

It reports, per minute, each operation's count, p50/p99/max latency and status codes, and the
RSS of every process of the server (the API and its worker children, read from /proc), and writes
all of it as JSON. It exits 1 on any 5xx or transport error, a failed training job, a server
process that died, or an RSS that grew after warm-up by more than `--rss-bound-mib` (the lowest
RSS of the last window against the lowest of the first window after warm-up, per process, so a
transient peak from a training job or an upload does not count but a rising floor does); the
reasons are printed and in the JSON's `failures`.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 20] [--out soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import get_architecture

REPO = Path(__file__).resolve().parent.parent

TOKEN = "soak-token-0123456789"  # BNSERVE_API_TOKEN needs 16 characters or more
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVED = "soak"  # seed_cnn: uploads, promotes, roll-backs, predictions
TRAINED = "soak-train"  # mlp_bn: trained by jobs, then predicted
RSS_EVERY_S = 5.0
# /readyz answers 503 by contract while this process catches up with a promote made elsewhere.
EXPECTED = {("readyz", "503")}


@dataclass
class Run:
    """Everything the loops share: the clock, what they record, what the server holds."""

    started: float
    deadline: float
    samples: list[tuple[float, str, str, float]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    trained_serving: bool = False
    jobs: dict[str, str] = field(default_factory=dict)
    # When a training job first ended: a worker's RSS is judged only after its first job.
    first_job_done_s: float | None = None
    rss: list[tuple[float, int, str, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()


async def call(
    run: Run, client: httpx.AsyncClient, op: str, method: str, url: str, **kwargs: Any
) -> httpx.Response | None:
    """One request, recorded as (elapsed, op, status, latency); transport errors too."""
    began = time.monotonic()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        run.samples.append((began - run.started, op, f"transport:{type(exc).__name__}", 0.0))
        return None
    run.samples.append(
        (began - run.started, op, str(response.status_code), time.monotonic() - began)
    )
    return response


async def paced(
    run: Run, period: float, body: Callable[[], Awaitable[Any]], first_after: float = 0.0
) -> None:
    """Call `body()` every `period` seconds until the deadline; a late call never bunches up."""
    next_at = time.monotonic() + first_after
    while True:
        now = time.monotonic()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if run.left() <= 0:
            return
        await body()
        next_at = max(next_at + period, time.monotonic() - period)


# --- traffic -----------------------------------------------------------------------------------


def cnn_weights(seed: int) -> bytes:
    """seed_cnn weights whose BN statistics moved (a few train-mode batches), as a .pt file."""
    arch = get_architecture("seed_cnn")
    torch.manual_seed(seed)
    model = arch.build(arch.default_config()).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def json_body(shape: tuple[int, ...], seed: int) -> bytes:
    # Encoded once per client: the client's own JSON work would compete with the server.
    g = torch.Generator().manual_seed(seed)
    return json.dumps({"inputs": torch.rand(1, *shape, generator=g).tolist()}).encode()


async def predictor(run: Run, client: httpx.AsyncClient, period: float, seed: int) -> None:
    body = json_body((3, 32, 32), seed)
    headers = {"Content-Type": "application/json"}
    url = f"/v1/models/{SERVED}/predict"
    await paced(
        run,
        period,
        lambda: call(run, client, "predict", "POST", url, content=body, headers=headers),
    )


async def versioned_predictor(run: Run, client: httpx.AsyncClient, period: float) -> None:
    body = json_body((3, 32, 32), 99)
    headers = {"Content-Type": "application/json"}
    rng = random.Random(1)

    async def one() -> None:
        # Recent versions only: the cache holds a few, and the point is churn, not a thrash test.
        version = rng.choice(run.versions[-3:])
        url = f"/v1/models/{SERVED}/predict?version={version}"
        await call(run, client, "predict_version", "POST", url, content=body, headers=headers)

    await paced(run, period, one)


async def trained_predictor(run: Run, client: httpx.AsyncClient, period: float) -> None:
    body = json.dumps({"inputs": [[-1.5, 0.0], [1.5, 0.0]]}).encode()
    headers = {"Content-Type": "application/json"}

    async def one() -> None:
        if run.trained_serving:  # nothing to predict before the first job promotes
            url = f"/v1/models/{TRAINED}/predict"
            await call(run, client, "predict_trained", "POST", url, content=body, headers=headers)

    await paced(run, period, one)


async def uploader(run: Run, client: httpx.AsyncClient, period: float) -> None:
    count = 0

    async def one() -> None:
        nonlocal count
        count += 1
        data = await asyncio.to_thread(cnn_weights, 1000 + count)
        promote = "true" if count % 2 else "false"
        r = await call(
            run,
            client,
            "upload",
            "POST",
            f"/v1/models/{SERVED}/versions",
            files={"file": ("w.pt", data)},
            data={"promote": promote, "note": f"soak {count}"},
            headers=AUTH,
        )
        if r is not None and r.status_code == 201:
            run.versions.append(int(r.json()["version"]))

    await paced(run, period, one, first_after=period / 2)


async def promoter(run: Run, client: httpx.AsyncClient, period: float) -> None:
    rng = random.Random(2)

    async def one() -> None:
        version = rng.choice(run.versions[-4:])  # forward to a newer one, or back to an older
        url = f"/v1/models/{SERVED}/versions/{version}/promote"
        await call(run, client, "promote", "POST", url, headers=AUTH)

    await paced(run, period, one, first_after=period / 3)


async def trainer(run: Run, client: httpx.AsyncClient, period: float, dataset: str) -> None:
    count = 0

    async def one() -> None:
        nonlocal count
        if run.left() < 30:  # leave a job the time to finish inside the run
            return
        count += 1
        body = {
            "model": TRAINED,
            "dataset": dataset,
            "epochs": 4,
            "batch_size": 32,
            "lr": 0.05,
            "optimizer": "adamw",
            "seed": count,
            "promote": "always" if count == 1 else "if_better",
        }
        r = await call(run, client, "train", "POST", "/v1/jobs", json=body, headers=AUTH)
        if r is not None and r.status_code == 202:
            run.jobs[r.json()["id"]] = "queued"

    await paced(run, period, one, first_after=5)


async def reader(run: Run, client: httpx.AsyncClient, period: float) -> None:
    async def one() -> None:
        await call(run, client, "read", "GET", f"/v1/models/{SERVED}")
        await call(run, client, "read", "GET", f"/v1/models/{SERVED}/versions")
        await call(run, client, "readyz", "GET", "/readyz")
        await call(run, client, "read", "GET", "/metrics")
        for job_id, status in list(run.jobs.items()):
            if status in ("succeeded", "failed", "cancelled"):
                continue
            r = await call(run, client, "read", "GET", f"/v1/jobs/{job_id}")
            if r is not None and r.status_code == 200:
                job = r.json()
                run.jobs[job_id] = job["status"]
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    run.first_job_done_s = run.first_job_done_s or run.elapsed()
                if job["status"] == "succeeded" and job["promoted"]:
                    run.trained_serving = True
                if job["status"] == "failed":
                    run.failures.append(f"training job {job_id} failed: {job['error']}")

    await paced(run, period, one)


# --- processes ---------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """`pid`'s children, grandchildren, ...: parents read from /proc/<pid>/stat (field 4)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parent_of.items() if pp == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return "worker" if b"service.worker" in cmdline else "child"


async def rss_sampler(run: Run, server: subprocess.Popen[bytes]) -> None:
    async def one() -> None:
        if server.poll() is not None:
            run.failures.append(f"the API process exited with {server.returncode}")
            run.deadline = time.monotonic()
            return
        now = run.elapsed()
        for pid in [server.pid, *descendants(server.pid)]:
            rss = rss_bytes(pid)
            if rss is not None:
                run.rss.append((now, pid, "api" if pid == server.pid else role(pid), rss))

    await paced(run, RSS_EVERY_S, one)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    data_dir: Path, log_path: Path, log_level: str, worker_threads: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "BNSERVE_HOST": "127.0.0.1",
        "BNSERVE_PORT": str(port),
        "BNSERVE_DATA_DIR": str(data_dir),
        "BNSERVE_API_TOKEN": TOKEN,
        "BNSERVE_WORKERS": "1",
        "BNSERVE_DEMO": "false",
        "BNSERVE_DEVICE": "cpu",
        "BNSERVE_LOG_LEVEL": log_level,
        "BNSERVE_WORKER_THREADS": str(worker_threads),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start; its log:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def setup(url: str) -> str:
    """The two models, a first version of the served one, and the training dataset's id."""
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
        for name, arch in ((SERVED, "seed_cnn"), (TRAINED, "mlp_bn")):
            c.post("/v1/models", json={"name": name, "architecture": arch}).raise_for_status()
        files = {"file": ("w.pt", cnn_weights(0))}
        c.post(f"/v1/models/{SERVED}/versions", files=files).raise_for_status()
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 600)
        x = (rng.normal(0, 0.7, (600, 2)) + np.where(y[:, None] == 1, 1.5, -1.5)).astype("f4")
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        r = c.post("/v1/datasets", files={"file": ("blobs.npz", buffer.getvalue())})
        r.raise_for_status()
        return str(r.json()["id"])


# --- report ------------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def per_minute(run: Run, minutes: int) -> list[dict[str, Any]]:
    rows = []
    for minute in range(minutes):
        lo, hi = minute * 60, (minute + 1) * 60
        ops: dict[str, Any] = {}
        by_op: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for t, op, status, latency in run.samples:
            if lo <= t < hi:
                by_op[op].append((status, latency))
        for op, items in sorted(by_op.items()):
            ok = [latency * 1000 for status, latency in items if status.startswith("2")]
            ops[op] = {
                "count": len(items),
                "statuses": dict(Counter(status for status, _ in items)),
                "p50_ms": round(percentile(ok, 50), 2) if ok else None,
                "p99_ms": round(percentile(ok, 99), 2) if ok else None,
                "max_ms": round(max(ok), 2) if ok else None,
            }
        rss: dict[str, Any] = {}
        for t, pid, kind, value in run.rss:
            if lo <= t < hi:
                entry = rss.setdefault(str(pid), {"role": kind, "max_mib": 0.0, "last_mib": 0.0})
                entry["max_mib"] = max(entry["max_mib"], round(value / 2**20, 1))
                entry["last_mib"] = round(value / 2**20, 1)
        rows.append({"minute": minute + 1, "ops": ops, "rss": rss})
    return rows


def check_rss(run: Run, warmup_s: float, end_s: float, bound_mib: float) -> dict[str, Any]:
    """Per process: floor of the last window minus floor of the first window after warm-up.

    A worker's warm-up lasts until a first training job has ended too: its first job builds
    what every later one reuses (allocator pools, autograd, thread pools), which is not a leak.
    """
    window = max(RSS_EVERY_S * 3, min(60.0, (end_s - warmup_s) / 3))
    by_pid: dict[int, list[tuple[float, str, int]]] = defaultdict(list)
    for t, pid, kind, value in run.rss:
        by_pid[pid].append((t, kind, value))
    report: dict[str, Any] = {"window_s": window, "bound_mib": bound_mib, "processes": {}}
    for pid, points in by_pid.items():
        kind = points[0][1]
        start = warmup_s
        if kind == "worker":
            start = max(warmup_s, run.first_job_done_s or end_s)
            if start + window > end_s - window:
                reason = "no training job ended early enough to judge it (run longer)"
                report["processes"][str(pid)] = {"role": kind, "checked": False, "why": reason}
                continue
        first = [v for t, _, v in points if start <= t < start + window]
        last = [v for t, _, v in points if end_s - window <= t <= end_s]
        if not first or not last or points[-1][0] < end_s - window:
            # Born after warm-up or gone before the end: a restarted worker, or a dead one.
            report["processes"][str(pid)] = {"role": kind, "checked": False}
            if points[-1][0] < end_s - RSS_EVERY_S * 2:
                run.failures.append(f"{kind} process {pid} exited during the run")
            continue
        growth = (min(last) - min(first)) / 2**20
        report["processes"][str(pid)] = {
            "role": kind,
            "checked": True,
            "from_s": round(start, 1),
            "floor_after_warmup_mib": round(min(first) / 2**20, 1),
            "floor_at_end_mib": round(min(last) / 2**20, 1),
            "growth_mib": round(growth, 1),
        }
        if growth > bound_mib:
            run.failures.append(
                f"{kind} process {pid}: RSS floor grew {growth:.1f} MiB after warm-up "
                f"(bound {bound_mib} MiB)"
            )
    return report


def summarize(run: Run) -> dict[str, dict[str, int]]:
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    for _, op, status, _ in run.samples:
        errors[op][status] += 1
    for op, counts in errors.items():
        bad = {
            s: n
            for s, n in counts.items()
            if s.startswith(("5", "transport")) and (op, s) not in EXPECTED
        }
        if bad:
            run.failures.append(f"{op}: {bad}")
    return {op: dict(counts) for op, counts in sorted(errors.items())}


async def traffic(run: Run, url: str, dataset: str, args: argparse.Namespace, server: Any) -> None:
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        period = args.clients / args.rate
        tasks = [predictor(run, client, period, seed) for seed in range(args.clients)]
        tasks += [
            versioned_predictor(run, client, 1.0),
            trained_predictor(run, client, 1.0),
            uploader(run, client, args.upload_every),
            promoter(run, client, args.promote_every),
            trainer(run, client, args.train_every, dataset),
            reader(run, client, 2.0),
            rss_sampler(run, server),
        ]
        await asyncio.gather(*tasks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="predictions/s, all clients")
    parser.add_argument("--clients", type=int, default=4, help="prediction clients")
    parser.add_argument("--upload-every", type=float, default=20.0, help="seconds")
    parser.add_argument("--promote-every", type=float, default=15.0, help="seconds")
    parser.add_argument("--train-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--warmup-minutes", type=float, help="default: 20%% of the run, <= 2")
    parser.add_argument("--rss-bound-mib", type=float, default=64.0)
    # One: on a shared machine, OpenMP threads of one worker spin against each other and
    # against the API (a 4-epoch job took over 50 s with 2 threads at load 27, on 2 cores).
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--log-level", default="info", help="the server's; its log is kept")
    parser.add_argument(
        "--out", type=Path, default=Path(f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json")
    )
    args = parser.parse_args()
    warmup_s = 60 * (
        args.warmup_minutes if args.warmup_minutes is not None else min(2, args.minutes * 0.2)
    )

    with tempfile.TemporaryDirectory(prefix="bnserve-soak-") as tmp:
        log_path = Path(tmp) / "server.log"
        server, url = start_server(
            Path(tmp) / "data", log_path, args.log_level, args.worker_threads
        )
        try:
            dataset = setup(url)
            started = time.monotonic()
            run = Run(started=started, deadline=started + 60 * args.minutes, versions=[1])
            print(f"soak: {args.minutes} min against {url} (server pid {server.pid})", flush=True)
            asyncio.run(traffic(run, url, dataset, args, server))
            end_s = run.elapsed()
        finally:
            stop_server(server)
        server_log = log_path.read_text()
    args.out.with_suffix(".log").write_text(server_log)

    statuses = summarize(run)
    rss = check_rss(run, warmup_s, end_s, args.rss_bound_mib)
    minutes = per_minute(run, args.minutes)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "warmup_s": warmup_s,
        "duration_s": round(end_s, 1),
        "statuses": statuses,
        "jobs": dict(Counter(run.jobs.values())),
        "minutes": minutes,
        "rss_check": rss,
        "failures": run.failures,
        "ok": not run.failures,
    }
    args.out.write_text(json.dumps(report, indent=2))
    for row in minutes:
        predict = row["ops"].get("predict", {})
        rss_text = ", ".join(f"{v['role']} {v['max_mib']}" for v in row["rss"].values())
        print(
            f"minute {row['minute']}: predict n={predict.get('count', 0)} "
            f"p99={predict.get('p99_ms')} ms; RSS MiB {rss_text}"
        )
    print(f"statuses: {json.dumps(statuses)}")
    print(f"jobs: {report['jobs']}; RSS check: {json.dumps(rss['processes'])}")
    print(f"report: {args.out}; server log: {args.out.with_suffix('.log')}")
    if run.failures:
        print("FAILED:\n  " + "\n  ".join(run.failures))
        print(f"server log tail:\n{server_log[-3000:]}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
