"""Helpers for the swap, replica and crash tests (`test_swap.py`, `test_replicas.py`,
`test_crash.py`): versions known by their bytes, checked predictions, waits and forward holds."""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from tests.conftest import AUTH, pt_bytes, reference_model, trained_state_dict, upload

RTOL = 1e-4
ATOL = 1e-5
# Inputs whose first value is this are held by `hold_forwards` (the gate's probes never are).
MARKER = 4242.0


class Book:
    """The weights a test uploads, each known by the sha256 the server records for it.

    The server stores canonical safetensors, not the uploaded .pt, so a version is matched to its
    weights by the sha256 of the stored file, which a test learns from the upload's answer or from
    GET /versions.
    """

    def __init__(self, architecture: str = "mlp_bn", **config: Any) -> None:
        self.architecture = architecture
        self.config = config
        self.by_seed: dict[int, dict[str, torch.Tensor]] = {}
        self.seed_of_sha: dict[str, int] = {}
        self._refs: dict[int, nn.Module] = {}

    def weights(self, seed: int) -> bytes:
        sd = trained_state_dict(self.architecture, seed=seed, **self.config)
        self.by_seed[seed] = sd
        return pt_bytes(sd)

    def upload(self, client: httpx.Client, name: str, seed: int, **form: str) -> dict[str, Any]:
        r = upload(client, name, self.weights(seed), **form)
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        self.seed_of_sha[body["sha256"]] = seed
        return body

    def learn(self, sha256: str, seed: int) -> None:
        self.seed_of_sha[sha256] = seed

    def expected(self, seed: int, x: torch.Tensor) -> torch.Tensor:
        if seed not in self._refs:
            self._refs[seed] = reference_model(self.architecture, self.by_seed[seed], **self.config)
        with torch.inference_mode():
            out: torch.Tensor = self._refs[seed](x)
        return out


class Served:
    """Which version answered a prediction, checked to be named the same in header and body."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.text
        body = response.json()
        self.version = int(response.headers["x-model-version"])
        assert body["version"] == self.version
        self.outputs = torch.tensor(body["outputs"])


def predict(
    client: httpx.Client, name: str, x: torch.Tensor, version: int | None = None
) -> httpx.Response:
    params = {"version": str(version)} if version is not None else None
    return client.post(f"/v1/models/{name}/predict", json={"inputs": x.tolist()}, params=params)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def versions_by_number(client: httpx.Client, name: str) -> dict[int, str]:
    """Version number -> recorded sha256."""
    r = client.get(f"/v1/models/{name}/versions")
    assert r.status_code == 200, r.text
    return {v["version"]: v["sha256"] for v in r.json()}


def serving_version(client: httpx.Client, name: str) -> int | None:
    r = client.get(f"/v1/models/{name}")
    assert r.status_code == 200, r.text
    version: int | None = r.json()["serving_version"]
    return version


def promote(client: httpx.Client, name: str, version: int) -> httpx.Response:
    return client.post(f"/v1/models/{name}/versions/{version}/promote", headers=AUTH)


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.02) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - start


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marked(x: torch.Tensor) -> torch.Tensor:
    """`x` with the marker that makes `hold_forwards` hold its forward pass."""
    x = x.clone()
    x.view(-1)[0] = MARKER
    return x


class ForwardHold:
    """Forward passes that contain a marked sample wait until `release()`."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.entered = threading.Event()
        # Weak, so that holding a forward does not keep its version alive afterwards.
        self.held_modules: list[weakref.ref[nn.Module]] = []

    def release(self) -> None:
        self.released.set()

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.released.is_set() or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        if x.dim() == 0 or not bool((x.reshape(x.shape[0], -1)[:, 0] == MARKER).any()):
            return
        self.held_modules.append(weakref.ref(module))
        self.entered.set()
        self.released.wait(timeout=30)


@contextmanager
def hold_forwards() -> Iterator[ForwardHold]:
    """Hold the forward passes of marked inputs in every module of this process (thread servers).

    A global forward pre-hook (`torch.nn.modules.module.register_module_forward_pre_hook`), so
    the test needs no access to the server's objects; the outermost module sees the marker first.
    """
    hold = ForwardHold()
    handle = nn.modules.module.register_module_forward_pre_hook(hold._hook)
    try:
        yield hold
    finally:
        hold.release()
        handle.remove()
