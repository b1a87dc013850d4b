"""What requests can make a server hold, answer or reveal (issue #17, points 3-5).

No request leaves state behind for names that do not exist, a deleted model leaves none, job
listings stay small and old jobs go; answers are bounded like requests; and with
BNSERVE_PROTECT_READS nothing about the models shows without the token, which is checked before
any body is read.
"""

from __future__ import annotations

import io
import socket
import uuid
from pathlib import Path

import httpx
import numpy as np
import torch

from tests.conftest import AUTH, reference_model
from tests.helpers_api import (
    assert_error,
    batch_size_histogram,
    close,
    predict_ok,
    running,
    samples,
    serve,
)
from tests.helpers_jobs import blobs, dataset_id, start_job, wait_until

TRAIN = {"epochs": 3, "batch_size": 8, "lr": 0.05, "seed": 0}


def _model_series(client: httpx.Client, name: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if f'model="{name}"' in line]


# --- 3. No state for names that do not exist, none left by a deleted model ---------------------


def test_unknown_names_leave_no_state_and_a_deleted_model_leaves_none(server, client):
    serve(client, "m", "mlp_bn")
    predict_ok(client, "m", samples((2,), 2))
    for _ in range(20):
        ghost = "g" * 60 + uuid.uuid4().hex
        body = {"inputs": [[0.0, 1.0]]}
        assert client.post(f"/v1/models/{ghost}/predict?version=1", json=body).status_code == 404
        assert client.post(f"/v2/models/{ghost}/versions/1/infer", json={}).status_code == 404
        assert client.get(f"/v2/models/{ghost}/versions/1/ready").status_code == 404
        assert client.delete(f"/v1/models/{ghost}", headers=AUTH).status_code == 404
    services = server.app_services
    assert len(services.manager._locks) == 0  # locks exist only while held
    assert len(services.upload_locks) == 0
    assert _model_series(client, "m")
    assert not [line for line in client.get("/metrics").text.splitlines() if "ggg" in line]

    assert client.delete("/v1/models/m", headers=AUTH).status_code == 204
    assert _model_series(client, "m") == []
    assert len(services.manager._locks) == 0
    assert len(services.upload_locks) == 0


def test_job_listings_leave_out_epoch_metrics_and_old_jobs_are_pruned(tmp_path: Path):
    with running(tmp_path / "data", JOB_RETENTION_S=1.0) as (srv, client):
        serve(client, "m", "mlp_bn")
        data = dataset_id(client, *blobs(40))
        old = start_job(client, model="m", dataset=data, **TRAIN)
        kept = start_job(client, model="m", dataset=data, **TRAIN)
        # A worker's view of the queue: claim the job and record two epochs, as training does.
        queue = srv.app_services.jobs
        assert queue.claim("w1").id == old
        for epoch in (1, 2):
            queue.add_epoch(old, "w1", {"epoch": epoch, "train_loss": 0.5, "val_loss": 0.5})
        listed = {job["id"]: job for job in client.get("/v1/jobs").json()}
        assert set(listed) == {old, kept}
        assert all("metrics" not in job for job in listed.values())
        assert [m["epoch"] for m in client.get(f"/v1/jobs/{old}").json()["metrics"]] == [1, 2]

        assert queue.finish(old, "w1", "failed", error="stopped by the test")
        wait_until(
            lambda: True if client.get(f"/v1/jobs/{old}").status_code == 404 else None,
            30,
            "the ended job to be pruned",
            interval=0.2,
        )
        assert client.get(f"/v1/jobs/{kept}").json()["status"] == "queued"  # not ended: kept


# --- 4. Answers bounded like requests --------------------------------------------------------


def _infer(client: httpx.Client, name: str, x: np.ndarray, *, binary: bool) -> httpx.Response:
    """A v2 infer of `x` (JSON), asking for `output` as JSON or in the binary extension."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    body = {
        "inputs": [{**tensor, "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "output", "parameters": {"binary_data": binary}}],
    }
    return client.post(f"/v2/models/{name}/infer", json=body)


def test_answers_are_capped_before_the_forward_and_large_ones_are_exact(tmp_path: Path):
    width = 2000  # a regression MLP with 2,000 outputs: 25 samples fill a 50,000-value answer
    with running(tmp_path / "data", MAX_RESPONSE_VALUES=50_000) as (_, client):
        config = {"task": "regression", "out_features": width}
        state = serve(client, "wide", "mlp_bn", **config)
        reference = reference_model("mlp_bn", state, **config)
        x = samples((2,), 26)
        before = batch_size_histogram(client, "wide")
        for r in (
            client.post("/v1/models/wide/predict", json={"inputs": x.tolist()}),
            _infer(client, "wide", x.numpy(), binary=True),
        ):
            assert r.status_code == 413, r.text[:300]
            assert r.json()["code"] == "response_too_large"
            assert r.json()["max_samples"] == 25
        assert batch_size_histogram(client, "wide") == before  # refused before any forward

        # 25 samples: answered exactly, the JSON encoded in blocks (more than BLOCK_VALUES).
        expected = reference(x[:25])
        outputs, _ = predict_ok(client, "wide", x[:25])
        assert close(outputs, expected)
        r = _infer(client, "wide", x[:25].numpy(), binary=False)
        assert r.status_code == 200, r.text
        data = torch.tensor(r.json()["outputs"][0]["data"]).reshape(25, width)
        assert close(data, expected)


def test_outputs_that_overflow_are_an_error_never_nulls(client):
    serve(client, "m", "mlp_bn")
    x = np.array([[0.0, 1.0], [3.4e38, -3.4e38]], np.float32)  # the second overflows
    npy = io.BytesIO()
    np.save(npy, x)
    answers = {
        "v1-json": client.post("/v1/models/m/predict", json={"inputs": x.tolist()}),
        "v1-npy": client.post(
            "/v1/models/m/predict",
            content=npy.getvalue(),
            headers={"content-type": "application/x-npy"},
        ),
        "v2-json": _infer(client, "m", x, binary=False),
        "v2-binary": _infer(client, "m", x, binary=True),
    }
    for kind, r in answers.items():
        assert r.status_code == (400 if kind.startswith("v2") else 422), (kind, r.text)
        assert r.json()["code"] == "non_finite_output", kind
        assert r.json()["samples"] == [1], kind
    predict_ok(client, "m", torch.from_numpy(x[:1]))  # the finite sample alone is answered


# --- 5. Read protection that protects ------------------------------------------------------------

# Every route that takes a body, as (method, path, content type): the token must be checked from
# the head, before a byte of the body is read.
BODY_ROUTES = [
    ("POST", "/v1/models", "application/json"),
    ("POST", "/v1/jobs", "application/json"),
    ("POST", "/v1/models/secret-model/versions", "multipart/form-data; boundary=x"),
    ("POST", "/v1/datasets", "multipart/form-data; boundary=x"),
    ("POST", "/v1/models/secret-model/versions/1/promote", "application/json"),
    ("POST", "/v1/models/secret-model/predict", "application/json"),
    ("POST", "/v2/models/secret-model/infer", "application/json"),
    ("POST", "/v2/models/secret-model/versions/1/infer", "application/octet-stream"),
]


def _head_only(port: int, method: str, path: str, content_type: str) -> bytes:
    """Send a request head that announces a 1 MB body, send none of it, and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 1000000\r\n\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # a server waiting for the body never answers: timeout
            if not chunk:
                break
            answer += chunk
        return answer


def test_protected_reads_reveal_no_models_and_the_token_comes_before_any_body(tmp_path: Path):
    with running(tmp_path / "data", PROTECT_READS=True) as (srv, client):
        serve(client, "secret-model", "mlp_bn")
        for path in ("/readyz", "/v2/health/ready"):
            r = client.get(path)
            assert r.status_code == 200, r.text
            assert "secret-model" not in r.text
            assert r.json()["models"] == {}
            assert "secret-model" in client.get(path, headers=AUTH).json()["models"]
        assert client.get("/healthz").status_code == 200
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert 'model="secret-model"' in client.get("/metrics", headers=AUTH).text

        # A malformed body without the token is a 401, not a 422 about the body.
        for path in ("/v1/models", "/v1/jobs"):
            r = client.post(
                path, content=b"{not json", headers={"content-type": "application/json"}
            )
            assert_error(r, 401, "unauthorized")
        for method, path, content_type in BODY_ROUTES:
            answer = _head_only(srv.port, method, path, content_type)
            assert answer.startswith(b"HTTP/1.1 401 "), (path, answer[:200])


def test_a_metrics_token_opens_metrics_and_nothing_else(tmp_path: Path):
    scraper = {"Authorization": "Bearer metrics-token-0123456789"}
    with running(tmp_path / "data", METRICS_TOKEN="metrics-token-0123456789") as (_, client):
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/metrics", headers=scraper).status_code == 200
        assert client.get("/metrics", headers=AUTH).status_code == 200
        body = {"name": "m", "architecture": "mlp_bn"}
        assert_error(client.post("/v1/models", json=body, headers=scraper), 401, "unauthorized")
        assert client.get("/readyz").status_code == 200  # reads are not protected here
