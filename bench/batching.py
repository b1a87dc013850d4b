"""Dynamic batching: prediction throughput with and without it, measured in one run.

Starts two real servers (`python -m service`) on loopback, one with BNSERVE_MAX_BATCH_SIZE=1
(every request its own forward pass) and one with batching on, uploads the same weights
(resnet18 by default: a model whose forward pass, not HTTP, dominates) to both,
drives each with the same number of concurrent single-sample clients for a fixed time, and
prints requests/s, latency and the ratio.

    .venv/bin/python bench/batching.py [--architecture resnet18] [--clients 32] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import get_architecture

TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=Path(__file__).resolve().parent.parent,
        env={
            **os.environ,
            "BNSERVE_DATA_DIR": str(data_dir),
            "BNSERVE_PORT": str(port),
            "BNSERVE_API_TOKEN": TOKEN,
            "BNSERVE_WORKERS": "0",
            "BNSERVE_DEMO": "false",
            "BNSERVE_DEVICE": "cpu",
            "BNSERVE_LOG_LEVEL": "warning",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def weights(architecture: str) -> tuple[bytes, tuple[int, ...]]:
    arch = get_architecture(architecture)
    config = arch.default_config()
    torch.manual_seed(0)
    model = arch.build(config).train()
    with torch.no_grad():
        model(torch.randn(16, *config.input_shape()))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue(), tuple(config.input_shape())


async def drive(
    url: str, clients: int, seconds: float, shape: tuple[int, ...]
) -> tuple[int, list[float]]:
    # Encoded once: the client's own JSON work would otherwise compete with the server for CPU.
    body = json.dumps({"inputs": torch.rand(*shape).tolist()}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            r = await client.post("/v1/models/bench/predict", content=body, headers=headers)
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
    return len(latencies), latencies


def measure(architecture: str, batch: int, clients: int, seconds: float) -> dict[str, float]:
    data, shape = weights(architecture)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(
            Path(tmp), BNSERVE_MAX_BATCH_SIZE=str(batch), BNSERVE_MAX_BATCH_WAIT_MS="2"
        )
        try:
            httpx.post(
                url + "/v1/models",
                headers=AUTH,
                json={"name": "bench", "architecture": architecture},
            ).raise_for_status()
            httpx.post(
                url + "/v1/models/bench/versions",
                headers=AUTH,
                files={"file": ("w.pt", data)},
                timeout=60,
            ).raise_for_status()
            asyncio.run(drive(url, clients, 1.0, shape))  # warm-up
            count, latencies = asyncio.run(drive(url, clients, seconds, shape))
            metrics = httpx.get(url + "/metrics").text
        finally:
            proc.terminate()
            proc.wait()
    sums = [line for line in metrics.splitlines() if line.startswith("bnserve_batch_size_")]
    total = float(next(s.split()[-1] for s in sums if s.startswith("bnserve_batch_size_sum")))
    passes = float(next(s.split()[-1] for s in sums if s.startswith("bnserve_batch_size_count")))
    return {
        "rps": count / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000,
        "mean_batch": total / passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--architecture", default="resnet18")
    args = parser.parse_args()
    off = measure(args.architecture, 1, args.clients, args.seconds)
    on = measure(args.architecture, 64, args.clients, args.seconds)
    for name, r in (("batching off (max 1)", off), ("batching on (max 64)", on)):
        print(
            f"{name:22} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  mean batch {r['mean_batch']:5.1f}"
        )
    print(
        f"throughput ratio on/off: {on['rps'] / off['rps']:.2f}x  "
        f"({args.architecture}, {args.clients} concurrent single-sample clients, "
        f"{args.seconds:.0f} s each)"
    )


if __name__ == "__main__":
    main()
