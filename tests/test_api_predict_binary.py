"""Binary prediction bodies (.npy, raw float32 with X-Shape) and the prediction body limit.

A binary batch gives exactly the JSON batch's answer, is refused with the same codes, and a body
past `BNSERVE_MAX_PREDICT_BODY_BYTES` is refused with 413 before it is read, chunked or not.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests.helpers_api import (
    arch_cases,
    assert_error,
    close,
    input_shape,
    predict_ok,
    reference_outputs,
    running,
    samples,
    serve,
)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def post_npy(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post(
        f"/v1/models/{name}/predict", content=data, headers={"content-type": "application/x-npy"}
    )


def post_raw(client: httpx.Client, name: str, data: bytes, shape: str | None) -> httpx.Response:
    headers = {"content-type": "application/octet-stream"}
    if shape is not None:
        headers["x-shape"] = shape
    return client.post(f"/v1/models/{name}/predict", content=data, headers=headers)


@pytest.mark.parametrize(
    ("architecture", "config"), arch_cases({"mlp_bn", "mnist_cnn"}, every_config=False)
)
def test_npy_and_raw_float32_bodies_answer_as_json_does(tmp_path, architecture, config):
    shape = input_shape(architecture, config)
    x = samples(shape, 3, seed=1)
    with running(tmp_path / "data") as (_, client):
        state_dict = serve(client, "m", architecture, **config)
        as_json, _ = predict_ok(client, "m", x)

        r = post_npy(client, "m", npy(x.numpy()))
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "1"
        assert torch.equal(torch.tensor(r.json()["outputs"]), as_json)

        r = post_npy(client, "m", npy(x.numpy().astype(np.float64)))  # converted, as JSON is
        assert r.status_code == 200, r.text
        assert close(torch.tensor(r.json()["outputs"]), as_json)

        raw = x.numpy().astype("<f4").tobytes()
        r = post_raw(client, "m", raw, ",".join(map(str, x.shape)))
        assert r.status_code == 200, r.text
        assert torch.equal(torch.tensor(r.json()["outputs"]), as_json)
        assert set(r.json()) == {"model", "version", "outputs", "predictions", "probabilities"} | {
            "labels"
        }
    assert close(as_json, reference_outputs(architecture, state_dict, x, **config))


BAD_BINARY = {
    "raw-without-shape": (lambda: ("raw", b"\0" * 8, None), 422, "missing_shape"),
    "raw-bad-shape-header": (lambda: ("raw", b"\0" * 8, "two,three"), 422, "invalid_shape_header"),
    "raw-wrong-byte-count": (lambda: ("raw", b"\0" * 12, "1,2"), 422, "invalid_input_shape"),
    "raw-wrong-sample-shape": (lambda: ("raw", b"\0" * 12, "1,3"), 422, "invalid_input_shape"),
    "raw-nan": (
        lambda: ("raw", np.array([[np.nan, 1]], "<f4").tobytes(), "1,2"),
        422,
        "non_finite_input",
    ),
    "raw-empty": (lambda: ("raw", b"", "0,2"), 422, "empty_batch"),
    "npy-garbage": (lambda: ("npy", b"not an npy file", None), 422, "invalid_npy"),
    "npy-pickled-objects": (
        lambda: ("npy", npy(np.array([[1, "x"]], dtype=object)), None),
        422,
        "invalid_npy",
    ),
    "npy-strings": (lambda: ("npy", npy(np.array([["a", "b"]])), None), 422, "invalid_input_type"),
    "npy-bare-sample": (lambda: ("npy", npy(np.zeros(2, "f4")), None), 422, "invalid_input_shape"),
    "npy-inf": (
        lambda: ("npy", npy(np.array([[np.inf, 0]], "f4")), None),
        422,
        "non_finite_input",
    ),
    "npy-too-many": (lambda: ("npy", npy(np.zeros((9, 2), "f4")), None), 422, "batch_too_large"),
}


@pytest.fixture
def small(tmp_path) -> Iterator[httpx.Client]:
    """mlp_bn (2 features) as `m`, with MAX_REQUEST_BATCH=8 and a 4 KiB prediction body limit."""
    with running(tmp_path / "data", MAX_REQUEST_BATCH=8, MAX_PREDICT_BODY_BYTES=4096) as (
        _,
        client,
    ):
        serve(client, "m", "mlp_bn")
        yield client


@pytest.mark.parametrize("case", list(BAD_BINARY))
def test_bad_binary_bodies_are_refused_with_the_json_codes(small, case):
    make, status, code = BAD_BINARY[case]
    kind, data, shape = make()
    x = torch.tensor([[0.5, -0.5]])
    before, _ = predict_ok(small, "m", x)
    r = post_raw(small, "m", data, shape) if kind == "raw" else post_npy(small, "m", data)
    body = assert_error(r, status, code)
    if code not in ("invalid_npy", "invalid_shape_header"):
        assert "2" in body["detail"]  # names the expected per-sample shape
    assert torch.equal(predict_ok(small, "m", x)[0], before)


def test_unknown_content_type_is_415(small):
    r = small.post("/v1/models/m/predict", content=b"1,2", headers={"content-type": "text/csv"})
    assert_error(r, 415, "unsupported_media_type")


def test_prediction_body_past_its_limit_is_413_before_it_is_read(small):
    big = b'{"inputs": [' + b"0.0," * 2000 + b"0.0]}"
    r = small.post(
        "/v1/models/m/predict", content=big, headers={"content-type": "application/json"}
    )
    body = assert_error(r, 413, "payload_too_large")
    assert "BNSERVE_MAX_PREDICT_BODY_BYTES" in body["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(8):
            yield b" " * 1024

    r = small.post("/v1/models/m/predict", content=chunks())
    assert_error(r, 413, "payload_too_large")
    r = post_raw(small, "m", b"\0" * 8192, "1024,2")
    assert_error(r, 413, "payload_too_large")
    assert predict_ok(small, "m", torch.zeros(1, 2))[0].shape == (1, 2)


def test_a_large_json_body_is_parsed_off_the_event_loop(tmp_path):
    """A multi-MB predict body must not hold up other connections while it is parsed.

    (Before, it was parsed on the loop: /healthz waited seconds for a 55 MB body.)"""
    with running(tmp_path / "data", MAX_REQUEST_BATCH=4096, MAX_PREDICT_BODY_BYTES=256 << 20) as (
        srv,
        client,
    ):
        serve(client, "m", "mnist_cnn", num_classes=4)
        x = samples((1, 28, 28), 600, seed=3)  # ~10 MB of JSON
        body = ('{"inputs": ' + str(x.tolist()) + "}").encode()
        done = threading.Event()
        slowest = 0.0

        def probe() -> None:
            nonlocal slowest
            with httpx.Client(base_url=srv.url, timeout=60) as own:
                while not done.is_set():
                    started = time.monotonic()
                    assert own.get("/healthz").status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                    time.sleep(0.01)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            for _ in range(2):
                r = client.post(
                    "/v1/models/m/predict",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=120,
                )
                assert r.status_code == 200, r.text[:300]
                assert len(r.json()["outputs"]) == 600
        finally:
            done.set()
            prober.join()
    assert slowest < 1.5, f"/healthz waited {slowest:.2f} s while a large body was parsed"
