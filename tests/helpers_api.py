"""Helpers shared by the end-to-end API tests (`test_api_*.py`); fixtures stay in conftest.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import Architecture, get_architecture, list_architectures
from tests.conftest import (
    AUTH,
    ThreadServer,
    create_model,
    make_settings,
    pt_bytes,
    reference_model,
    trained_state_dict,
    upload,
)

RTOL = 1e-4
ATOL = 1e-5

# Small configs keep the suite fast (ResNet-18 at 8x8 and 16x16, short tiny clips) while covering
# both ResNet stems and both MLP tasks. An architecture without an entry runs with its defaults.
SMALL_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "seed_cnn": [{}],
    "mnist_cnn": [{"num_classes": 4}],
    "mlp_bn": [{}, {"in_features": 5, "out_features": 3, "task": "regression"}],
    "resnet18": [
        {"stem": "cifar", "image_size": 8, "num_classes": 3},
        {"stem": "imagenet", "image_size": 16, "num_classes": 3},
    ],
    "clip3d": [{"frames": 4, "size": 8, "num_classes": 3}],
}
BUILTIN_NAMES = {"seed_cnn", "mnist_cnn", "mlp_bn", "resnet18", "clip3d"}


def builtin_architectures() -> list[Architecture]:
    """The registry's architectures defined in `models/` (not ones tests or plugins register)."""
    return [a for a in list_architectures() if a.builder.__module__.split(".")[0] == "models"]


def _case_id(name: str, config: dict[str, Any]) -> str:
    parts = [str(config[k]) for k in ("stem", "task") if k in config]
    return "-".join([name, *parts])


def arch_cases(names: set[str] | None = None, *, every_config: bool = True) -> list[Any]:
    """`pytest.param(architecture, config)` per built-in architecture and small config.

    `every_config=False` takes one config per architecture, for the slower tests.
    """
    return [
        pytest.param(arch.name, config, id=_case_id(arch.name, config))
        for arch in builtin_architectures()
        if names is None or arch.name in names
        for config in SMALL_CONFIGS.get(arch.name, [{}])[: None if every_config else 1]
    ]


@contextmanager
def running(data_dir: Path, **overrides: Any) -> Iterator[tuple[ThreadServer, httpx.Client]]:
    """A ThreadServer with extra settings on `data_dir`, and a client for it; both closed after."""
    srv = ThreadServer(make_settings(data_dir, **overrides)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield srv, client
    finally:
        srv.stop()


def input_shape(architecture: str, config: dict[str, Any]) -> tuple[int, ...]:
    arch = get_architecture(architecture)
    return tuple(arch.parse_config(config).input_shape())


def is_classifier(architecture: str, config: dict[str, Any]) -> bool:
    arch = get_architecture(architecture)
    return bool(arch.parse_config(config).task == "classification")


def samples(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator) * 1.5 + 0.25


def reference_outputs(
    architecture: str, state_dict: dict[str, torch.Tensor], x: torch.Tensor, **config: Any
) -> torch.Tensor:
    """What serving must answer: the uploaded weights in a plain eval-mode module."""
    module = reference_model(architecture, state_dict, **config)
    assert not module.training
    with torch.inference_mode():
        out: torch.Tensor = module(x)
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def predict(
    client: httpx.Client, name: str, inputs: Any, version: int | None = None
) -> httpx.Response:
    params = {"version": version} if version is not None else None
    return client.post(f"/v1/models/{name}/predict", json={"inputs": inputs}, params=params)


def predict_ok(
    client: httpx.Client, name: str, x: torch.Tensor, version: int | None = None
) -> tuple[torch.Tensor, int]:
    """Outputs for the batch `x` and the version that computed them (header and body agree)."""
    r = predict(client, name, x.tolist(), version)
    assert r.status_code == 200, r.text
    body = r.json()
    assert int(r.headers["x-model-version"]) == body["version"]
    return torch.tensor(body["outputs"]), body["version"]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The contract's error body: JSON with a non-empty `detail` and a snake_case `code`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("detail"), str), body
    assert body["detail"].strip(), body
    assert isinstance(body.get("code"), str), body
    assert re.fullmatch(r"[a-z][a-z0-9_]*", body["code"]), body
    if code is not None:
        assert body["code"] == code, body
    return body


def serve(
    client: httpx.Client,
    name: str,
    architecture: str = "mlp_bn",
    seed: int = 0,
    **config: Any,
) -> dict[str, torch.Tensor]:
    """Create `name` and upload (and serve) a trained state_dict as its version 1."""
    create_model(client, name, architecture, **config)
    state_dict = trained_state_dict(architecture, seed=seed, **config)
    r = upload(client, name, pt_bytes(state_dict))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    return state_dict


def snapshot(client: httpx.Client) -> Any:
    """Everything the API says about models, versions and serving (for "nothing changed")."""
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def version_numbers(client: httpx.Client, name: str) -> list[int]:
    r = client.get(f"/v1/models/{name}/versions")
    assert r.status_code == 200, r.text
    return [v["version"] for v in r.json()]


def stored_files(data_dir: Path) -> list[str]:
    """Every file under the checkpoint store and the upload folder, relative to the data dir."""
    return sorted(
        str(p.relative_to(data_dir))
        for folder in (data_dir / "checkpoints", data_dir / "uploads")
        if folder.exists()
        for p in folder.rglob("*")
        if p.is_file()
    )


def batch_size_histogram(client: httpx.Client, model: str) -> tuple[float, float]:
    """(forward passes, samples) recorded by `bnserve_batch_size` for `model`."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    count = total = 0.0
    for family in text_string_to_metric_families(r.text):
        if family.name != "bnserve_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


def bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every running_mean, running_var and num_batches_tracked of `module`."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {
        key: buf.detach().clone()
        for key, buf in module.named_buffers()
        if key.rsplit(".", 1)[-1] in names
    }
