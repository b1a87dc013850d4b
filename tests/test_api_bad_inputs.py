"""Hostile inputs that used to get 500, a misleading message or a huge echo: now a short, clear 4xx.

Each through a real server: numbers past 64 bits, a `.npz` member that is no `.npy`, a config
whose probe would not fit in memory, an over-long dataset name, a sparse tensor, megabyte names.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from tests.conftest import AUTH, pt_bytes, trained_state_dict, upload
from tests.helpers_api import assert_error, serve
from tests.helpers_jobs import npz_bytes, upload_dataset

HUGE = str(2**64)  # one past what a 64-bit database column holds
HUGER = "9" * 40


@pytest.mark.parametrize("number", [HUGE, HUGER])
def test_version_numbers_past_64_bits_are_4xx(client, number):
    serve(client, "m", "mlp_bn")
    for method, url in (
        ("GET", f"/v1/models/m/versions/{number}"),
        ("GET", f"/v1/models/m/versions/{number}/weights"),
        ("POST", f"/v1/models/m/versions/{number}/promote"),
    ):
        assert_error(client.request(method, url, headers=AUTH), 422, "validation_error")
    r = client.post(f"/v1/models/m/predict?version={number}", json={"inputs": [0.5, -0.5]})
    assert_error(r, 422, "validation_error")  # as the version paths: beyond any version number
    # The serving version is untouched and still answers.
    r = client.post("/v1/models/m/predict", json={"inputs": [0.5, -0.5]})
    assert r.status_code == 200
    assert r.json()["version"] == 1


def test_a_job_on_a_base_version_past_64_bits_is_4xx(client):
    serve(client, "m", "mlp_bn")
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    dataset = upload_dataset(client, npz_bytes(x=x, y=np.arange(20) % 2)).json()["id"]
    body = {"model": "m", "dataset": dataset, "epochs": 1, "lr": 0.1, "base_version": 2**64}
    r = client.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code in (404, 422), r.text
    assert_error(r, r.status_code)


def _zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_npz_member_that_is_not_npy_is_invalid_dataset(client, server):
    y = _npy(np.arange(4) % 2)
    for data in (
        _zip(x=b"not an array at all", **{"y.npy": y}),
        _zip(**{"x.npy": b"\x93NUMPY garbage", "y.npy": y}),
    ):
        body = assert_error(upload_dataset(client, data), 422)
        assert body["code"] in ("invalid_dataset", "unreadable_dataset"), body
    assert client.get("/v1/datasets").json() == []
    assert not list(server.settings.dataset_dir.iterdir())


def test_a_dataset_name_past_its_column_is_refused(client):
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    data = npz_bytes(x=x, y=np.arange(4) % 2)
    body = assert_error(upload_dataset(client, data, name="n" * 256), 422, "invalid_name")
    assert "255" in body["detail"]
    assert client.get("/v1/datasets").json() == []
    r = upload_dataset(client, data, name="n" * 255)
    assert r.status_code == 201, r.text


def test_a_config_whose_probe_would_not_fit_in_memory_is_refused(client):
    config = {"in_channels": 64, "frames": 256, "size": 512}  # the gate once asked for 64 GiB
    r = client.post(
        "/v1/models", json={"name": "big", "architecture": "clip3d", "config": config}, headers=AUTH
    )
    body = assert_error(r, 422, "invalid_config")
    assert "4194304" in body["detail"], body
    assert client.get("/v1/models").json() == []


def test_a_sparse_tensor_is_refused_naming_its_layout(client):
    serve(client, "m", "mlp_bn")
    state = trained_state_dict("mlp_bn", seed=1)
    state["fc1.weight"] = state["fc1.weight"].to_sparse()
    body = assert_error(upload(client, "m", pt_bytes(state)), 422, "bad_layout")
    assert "sparse_coo" in body["detail"], body
    assert "float32, expected float32" not in body["detail"]
    assert [e["key"] for e in body["errors"]] == ["fc1.weight"]


def test_megabyte_names_are_not_echoed_back(client):
    serve(client, "m", "mlp_bn")
    long_key = "k" * 1_000_000
    state = {**trained_state_dict("mlp_bn", seed=1), long_key: torch.zeros(1)}
    r = upload(client, "m", pt_bytes(state))
    body = assert_error(r, 422, "unexpected_keys")
    assert len(r.content) < 10_000, len(r.content)
    assert body["errors"][0]["key"].startswith("kkkk")
    assert body["errors"][0]["key"].endswith("\u2026")

    config = {"x" * 200_000: 1}
    r = client.post(
        "/v1/models", json={"name": "n", "architecture": "mlp_bn", "config": config}, headers=AUTH
    )
    assert_error(r, 422, "invalid_config")
    assert len(r.content) < 10_000, len(r.content)
