"""Helpers shared by the dataset, job and worker tests: generated data, uploads, bounded waits."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save as safetensors_save

from service.settings import Settings
from tests.conftest import AUTH, REPO, TOKEN

T = TypeVar("T")

FINAL = ("succeeded", "failed", "cancelled")

# Fast worker loops keep the multi-process tests short (shared by servers and standalone workers).
# One intra-op thread per process: the tests' models are tiny, and several processes share the
# test machine's cores, where PyTorch's OpenMP threads would only spin against each other.
FAST_WORKER_ENV = {
    "BNSERVE_WORKER_POLL_S": "0.2",
    "BNSERVE_WORKER_HEARTBEAT_S": "0.3",
    "OMP_NUM_THREADS": "1",
}

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def blobs(n: int, seed: int = 0, *, spread: float = 0.7) -> tuple[FloatArray, IntArray]:
    """Two Gaussian blobs at (-1.5, 0) and (1.5, 0): class = which blob (Bayes accuracy ~0.98)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centers = np.where(y[:, None] == 0, [[-1.5, 0.0]], [[1.5, 0.0]])
    x = centers + rng.normal(0.0, spread, (n, 2))
    return x.astype(np.float32), y.astype(np.int64)


def ring_points(radius: float, count: int = 8) -> list[list[float]]:
    """`count` points evenly spaced on a circle of `radius` around the origin."""
    return [
        [radius * math.cos(2 * math.pi * k / count), radius * math.sin(2 * math.pi * k / count)]
        for k in range(count)
    ]


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def safetensors_bytes(**arrays: Any) -> bytes:
    return safetensors_save({k: torch.as_tensor(v).contiguous() for k, v in arrays.items()})


def upload_dataset(
    client: httpx.Client, data: bytes, filename: str = "d.npz", name: str | None = None
) -> httpx.Response:
    form = {"name": name} if name is not None else {}
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=form, headers=AUTH)


def dataset_id(client: httpx.Client, x: Any, y: Any, name: str = "d") -> str:
    r = upload_dataset(client, npz_bytes(x=x, y=y), f"{name}.npz", name)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def post_job(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=AUTH)


def start_job(client: httpx.Client, **body: Any) -> str:
    r = post_job(client, **body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return str(r.json()["id"])


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns something other than None, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_job(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 60
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        job = get_job(client, job_id)
        return job if job["status"] in statuses else None

    return wait_until(probe, timeout, f"job {job_id} to reach {statuses}")


def without_durations(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's epochs minus their wall times: what two runs with one seed have in common."""
    return [{k: v for k, v in m.items() if k != "duration_s"} for m in metrics]


def versions(client: httpx.Client, model: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/models/{model}/versions")
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()
    return rows


def serving_version(client: httpx.Client, model: str) -> int | None:
    r = client.get(f"/v1/models/{model}")
    assert r.status_code == 200, r.text
    version: int | None = r.json()["serving_version"]
    return version


def weights(client: httpx.Client, model: str, version: int) -> dict[str, torch.Tensor]:
    """A stored version's tensors, read back from the server as safetensors bytes."""
    from safetensors.torch import load as safetensors_load

    r = client.get(f"/v1/models/{model}/versions/{version}/weights")
    assert r.status_code == 200, r.text
    tensors: dict[str, torch.Tensor] = safetensors_load(r.content)
    return tensors


class WorkerProcess:
    """`python -m service.worker` as a child process, with its output in a log file."""

    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        full_env = {
            **os.environ,
            "BNSERVE_DATA_DIR": str(data_dir),
            "BNSERVE_API_TOKEN": TOKEN,
            "BNSERVE_DEVICE": "cpu",
            "BNSERVE_LOG_LEVEL": "info",
            **FAST_WORKER_ENV,
            **env,
        }
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.worker"],
                cwd=REPO,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`: every process in /proc whose parent (stat field 4) is `pid`."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_children(pid: int) -> list[int]:
    """Children of the server `pid` that run `python -m service.worker`."""
    workers = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"service.worker" in cmdline:
            workers.append(child)
    return workers


class WorkerThread:
    """A real training `Worker` in a thread of the test process: jobs run with no second process.

    It shares the server's data dir and database (the settings of the `server` fixture). PyTorch
    runs on one intra-op thread meanwhile, as `python -m service.worker` does here with
    FAST_WORKER_ENV: two threads made a tiny MLP's step 30x slower on the loaded 2-core machine.
    """

    def __init__(self, settings: Settings) -> None:
        from service.worker.runner import Worker

        fast = settings.model_copy(update={"WORKER_POLL_S": 0.1, "WORKER_HEARTBEAT_S": 0.1})
        self.worker = Worker(fast)
        self.thread = threading.Thread(target=self.worker.run_forever, daemon=True)
        self._threads = torch.get_num_threads()

    def start(self) -> WorkerThread:
        torch.set_num_threads(1)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.worker.shutdown.set()
        self.thread.join(timeout=30)
        torch.set_num_threads(self._threads)
