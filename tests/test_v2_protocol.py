"""The Open Inference Protocol (v2) through a real client of it (tritonclient), and by hand.

The outputs must be the /v1 outputs of the same version, and those of plain eval-mode PyTorch,
whether the tensors travel as JSON or in the binary extension.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import AUTH, TOKEN, ThreadServer, create_model, pt_bytes, trained_state_dict
from tests.conftest import upload as upload_version
from tests.helpers_api import (
    arch_cases,
    batch_size_histogram,
    close,
    input_shape,
    is_classifier,
    predict,
    reference_outputs,
    running,
    samples,
    serve,
)
from tests.helpers_serving import hold_forwards, marked

CASES = [
    *arch_cases({"mnist_cnn"}),
    *arch_cases({"mlp_bn"}),  # a classifier and a regression
]


def triton_client(srv: ThreadServer, concurrency: int = 1) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        url=srv.url.removeprefix("http://"), concurrency=concurrency, network_timeout=60
    )


@pytest.fixture
def tc(server: ThreadServer) -> Iterator[triton.InferenceServerClient]:
    c = triton_client(server)
    yield c
    c.close()


def infer_input(x: np.ndarray[Any, Any], *, binary: bool, datatype: str = "FP32") -> Any:
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def v1_outputs(client: httpx.Client, name: str, x: torch.Tensor, version: int | None = None) -> Any:
    r = predict(client, name, x.tolist(), version)
    assert r.status_code == 200, r.text
    return r.json()


def v2_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The protocol's error body: `error` with a message, plus our `code`; no v1 `detail`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("error"), str), body
    assert body["error"].strip(), body
    assert "detail" not in body, body
    assert body["code"] == code, body
    return body


def binary_body(header: dict[str, Any], *raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(raw), {"Inference-Header-Content-Length": str(len(head))}


def test_health_and_server_metadata(client, tc):
    assert tc.is_server_live()
    assert tc.is_server_ready()
    meta = tc.get_server_metadata()
    assert meta["name"] == "bnserve"
    assert meta["version"] == client.get("/openapi.json").json()["info"]["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json()["ready"] is True


def test_server_not_ready_is_400_like_readyz(server, client, tc):
    serve(client, "m")
    r = upload_version(client, "m", pt_bytes(trained_state_dict("mlp_bn", seed=1)), promote="false")
    assert r.status_code == 201, r.text
    # Version 2's file loses a bit, then the database names it serving (as another replica's
    # promote would): this process cannot follow, so /readyz stays 503 and v2 ready stays 400.
    folder = next(p for p in (server.settings.DATA_DIR / "checkpoints").iterdir() if p.is_dir())
    path = folder / "v2.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    server.app_services.registry.set_serving("m", 2)
    assert client.get("/readyz").status_code == 503
    r = client.get("/v2/health/ready")
    assert r.status_code == 400, r.text
    assert r.json()["ready"] is False
    assert not tc.is_server_ready()
    assert tc.is_server_live()
    err = v2_error(client.get("/v2/models/m/versions/2/ready"), 400, "corrupt_checkpoint")
    assert "not ready" in err["error"]
    assert not tc.is_model_ready("m", "2")
    assert tc.is_model_ready("m", "1")


@pytest.mark.parametrize(("architecture", "config"), CASES)
def test_model_metadata(client, tc, architecture, config):
    state_dict = serve(client, "m", architecture, **config)
    shape = list(input_shape(architecture, config))
    x = samples(tuple(shape), 1)
    width = reference_outputs(architecture, state_dict, x, **config).shape[1]
    meta = tc.get_model_metadata("m")
    assert meta["name"] == "m"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}]
    names = ["output", "probabilities"] if is_classifier(architecture, config) else ["output"]
    assert [o["name"] for o in meta["outputs"]] == names
    for output in meta["outputs"]:
        assert output == {"name": output["name"], "datatype": "FP32", "shape": [-1, width]}
    assert tc.get_model_metadata("m", "1") == meta
    assert tc.is_model_ready("m")
    assert tc.is_model_ready("m", "1")


@pytest.mark.parametrize(("architecture", "config"), CASES)
def test_infer_json_and_binary_equals_v1_and_pytorch(client, tc, architecture, config):
    state_dict = serve(client, "m", architecture, **config)
    shape = input_shape(architecture, config)
    x = samples(shape, 5, seed=3)
    expected = reference_outputs(architecture, state_dict, x, **config)
    v1 = v1_outputs(client, "m", x)
    assert close(torch.tensor(v1["outputs"]), expected)
    classifier = is_classifier(architecture, config)
    names = ["output", "probabilities"] if classifier else ["output"]
    for binary_in in (False, True):
        for binary_out in (False, True):
            result = tc.infer(
                "m",
                [infer_input(x.numpy(), binary=binary_in)],
                outputs=[triton.InferRequestedOutput(n, binary_data=binary_out) for n in names],
                request_id=f"req-{binary_in}-{binary_out}",
            )
            response = result.get_response()
            assert response["model_name"] == "m"
            assert response["model_version"] == "1"
            assert response["id"] == f"req-{binary_in}-{binary_out}"
            for output in response["outputs"]:
                assert ("data" in output) is not binary_out, output
                assert output["datatype"] == "FP32"
                assert output["shape"] == list(expected.shape)
            out = torch.from_numpy(result.as_numpy("output").copy())
            assert close(out, expected), (out - expected).abs().max()
            assert close(out, torch.tensor(v1["outputs"]))
            if classifier:
                probabilities = torch.from_numpy(result.as_numpy("probabilities").copy())
                assert close(probabilities, torch.tensor(v1["probabilities"]))
                assert close(probabilities, torch.softmax(expected, dim=1))
    # No outputs named: tritonclient asks for all of them, in binary.
    result = tc.infer("m", [infer_input(x.numpy(), binary=True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    assert close(torch.from_numpy(result.as_numpy("output").copy()), expected)


def test_infer_other_datatypes_compression_and_version_header(client, tc):
    state_dict = serve(client, "m", "mlp_bn")
    x64 = samples((2,), 4, seed=5).double().numpy()
    expected = reference_outputs("mlp_bn", state_dict, torch.from_numpy(x64).float())
    for binary in (False, True):
        result = tc.infer("m", [infer_input(x64, binary=binary, datatype="FP64")])
        assert close(torch.from_numpy(result.as_numpy("output").copy()), expected)
    ints = np.array([[1, -2], [3, 0]], dtype=np.int32)
    expected_ints = reference_outputs("mlp_bn", state_dict, torch.from_numpy(ints).float())
    for binary in (False, True):
        result = tc.infer("m", [infer_input(ints, binary=binary, datatype="INT32")])
        assert close(torch.from_numpy(result.as_numpy("output").copy()), expected_ints)
    x = x64.astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        result = tc.infer(
            "m", [infer_input(x, binary=True)], request_compression_algorithm=algorithm
        )
        assert close(torch.from_numpy(result.as_numpy("output").copy()), expected)
    # By hand: JSON in and out, nested `data` accepted too, and X-Model-Version set.
    body = {
        "id": "7",
        "inputs": [{"name": "input", "shape": [4, 2], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "output"}],
    }
    r = client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    assert r.headers["content-type"].startswith("application/json")
    assert "inference-header-content-length" not in r.headers
    got = r.json()
    assert got["id"] == "7"
    assert [o["name"] for o in got["outputs"]] == ["output"]
    assert close(torch.tensor(got["outputs"][0]["data"]).reshape(4, -1), expected)
    # By hand, binary: the response's header length splits JSON from the raw float32 rows.
    content, headers = binary_body(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [4, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        x.astype("<f4").tobytes(),
    )
    r = client.post("/v2/models/m/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sum(sizes) == len(r.content) - n
    raw = np.frombuffer(r.content[n : n + sizes[0]], dtype="<f4").reshape(
        head["outputs"][0]["shape"]
    )
    assert close(torch.from_numpy(raw.copy()), expected)


def test_pinned_version_through_versioned_paths(client, tc):
    first = serve(client, "m", "mlp_bn", seed=0)
    second = trained_state_dict("mlp_bn", seed=1)
    r = upload_version(client, "m", pt_bytes(second))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2
    x = samples((2,), 3, seed=9)
    for version, weights in (("1", first), ("2", second), ("", second)):
        result = tc.infer("m", [infer_input(x.numpy(), binary=True)], model_version=version)
        assert result.get_response()["model_version"] == (version or "2")
        out = torch.from_numpy(result.as_numpy("output").copy())
        assert close(out, reference_outputs("mlp_bn", weights, x))
        if version:
            assert close(out, torch.tensor(v1_outputs(client, "m", x, int(version))["outputs"]))
    assert tc.get_model_metadata("m")["versions"] == ["1", "2"]
    assert tc.get_model_metadata("m", "1")["versions"] == ["1"]
    assert tc.is_model_ready("m", "1")
    assert not tc.is_model_ready("m", "3")
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}
    r = client.post("/v2/models/m/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    v2_error(client.post("/v2/models/m/versions/3/infer", json=body), 404, "version_not_found")
    v2_error(client.get("/v2/models/m/versions/3"), 404, "version_not_found")
    v2_error(client.get("/v2/models/m/versions/one"), 400, "validation_error")


def test_concurrent_infers_are_batched_and_stay_per_sample_correct(tmp_path):
    """Infers that arrive while a pass runs share the next one (a first, marked infer is held
    in its forward pass so that the others surely queue behind it)."""
    n_requests = 32
    with running(tmp_path / "data") as (srv, client), hold_forwards() as hold:
        state_dict = serve(client, "m", "mlp_bn")
        batches = [samples((2,), 1 + i % 3, seed=200 + i) for i in range(n_requests)]
        passes_before, samples_before = batch_size_histogram(client, "m")
        batcher = srv.app_services.manager._serving["m"].batcher
        tc = triton_client(srv, concurrency=n_requests + 1)
        try:
            held = tc.async_infer(
                "m", [infer_input(marked(torch.zeros(1, 2)).numpy(), binary=True)]
            )
            assert hold.entered.wait(10)
            pending = [
                tc.async_infer(
                    "m",
                    [infer_input(b.numpy(), binary=i % 2 == 0)],
                    outputs=[triton.InferRequestedOutput("output", binary_data=i % 2 == 1)],
                    request_id=str(i),
                )
                for i, b in enumerate(batches)
            ]
            deadline = time.monotonic() + 20
            while batcher.in_flight < n_requests + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            hold.release()
            held.get_result()
            results = [p.get_result() for p in pending]
        finally:
            tc.close()
        passes_after, samples_after = batch_size_histogram(client, "m")
    assert samples_after - samples_before == 1 + sum(len(b) for b in batches)
    assert passes_after - passes_before < n_requests, (passes_after - passes_before, n_requests)
    for i, (result, x) in enumerate(zip(results, batches, strict=True)):
        assert result.get_response()["id"] == str(i)
        out = torch.from_numpy(result.as_numpy("output").copy())
        assert close(out, reference_outputs("mlp_bn", state_dict, x)), i


def test_unknown_and_not_ready_models(client, tc):
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}
    v2_error(client.post("/v2/models/nope/infer", json=body), 404, "model_not_found")
    v2_error(client.get("/v2/models/nope"), 404, "model_not_found")
    v2_error(client.get("/v2/models/nope/ready"), 404, "model_not_found")
    with pytest.raises(InferenceServerException) as info:
        tc.get_model_metadata("nope")
    assert info.value.status() == "404"
    assert "nope" in info.value.message()
    create_model(client, "empty", "mlp_bn")  # no version yet: exists, cannot answer
    v2_error(client.get("/v2/models/empty/ready"), 400, "no_serving_version")
    assert not tc.is_model_ready("empty")
    assert tc.get_model_metadata("empty")["versions"] == []
    v2_error(client.post("/v2/models/empty/infer", json=body), 409, "no_serving_version")
    serve(client, "m")
    r = client.get("/v2/models/m/ready")
    assert r.status_code == 200, r.text
    assert r.json()["ready"] is True


def test_bad_requests_are_400_with_the_expected_shape(client, tc):
    serve(client, "m", "mlp_bn")  # sample shape (2,)
    with pytest.raises(InferenceServerException) as info:
        tc.infer("m", [infer_input(np.zeros((3, 5), np.float32), binary=True)])
    assert info.value.status() == "400"
    assert "[-1, 2]" in info.value.message()

    def send(inputs: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        return client.post("/v2/models/m/infer", json={"inputs": inputs, **extra})

    def tensor(shape: list[int], data: Any, datatype: str = "FP32") -> dict[str, Any]:
        return {"name": "input", "shape": shape, "datatype": datatype, "data": data}

    err = v2_error(send([tensor([1, 3], [0, 1, 2])]), 400, "invalid_input_shape")
    assert "[-1, 2]" in err["error"]
    assert err["expected_shape"] == [-1, 2]
    err = v2_error(send([tensor([2], [0, 1])]), 400, "invalid_input_shape")  # no batch dim
    assert "[-1, 2]" in err["error"]
    v2_error(send([tensor([2, 2], [0, 1, 2])]), 400, "invalid_input_shape")  # 3 values for 4
    v2_error(send([tensor([0, 2], [])]), 400, "empty_batch")
    v2_error(send([tensor([1, 2], ["a", "b"])]), 400, "invalid_input_type")
    v2_error(send([tensor([1, 2], [True, False], "BOOL")]), 400, "invalid_input_type")
    v2_error(send([tensor([1, 2], ["a", "b"], "BYTES")]), 400, "images_not_accepted")
    v2_error(send([tensor([1025, 2], [0.5] * 2050)]), 400, "batch_too_large")
    v2_error(send([{**tensor([1, 2], [0, 1]), "name": "x"}]), 400, "invalid_input_name")
    v2_error(send([tensor([1, 2], [0, 1]), tensor([1, 2], [0, 1])]), 400, "invalid_input_name")
    err = v2_error(
        send([tensor([1, 2], [0, 1])], outputs=[{"name": "logits"}]), 400, "unknown_output"
    )
    assert "logits" in err["error"]
    assert err["outputs"] == ["output", "probabilities"]
    v2_error(send([{"name": "input", "shape": [1, 2]}]), 400, "validation_error")
    v2_error(client.post("/v2/models/m/infer", content=b"{not json"), 400, "validation_error")
    # Binary tensors: NaN refused as in /v1, sizes must add up.
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    content, headers = binary_body(header, struct.pack("<2f", float("nan"), 1.0))
    r = client.post("/v2/models/m/infer", content=content, headers=headers)
    v2_error(r, 400, "non_finite_input")
    content, headers = binary_body(header, struct.pack("<3f", 0.0, 1.0, 2.0))
    r = client.post("/v2/models/m/infer", content=content, headers=headers)
    v2_error(r, 400, "invalid_binary_data")
    r = client.post(
        "/v2/models/m/infer",
        content=content,
        headers={"Inference-Header-Content-Length": str(len(content) + 1)},
    )
    v2_error(r, 400, "invalid_header_length")
    r = client.post(
        "/v2/models/m/infer", content=b"\x00garbage", headers={"Content-Encoding": "gzip"}
    )
    v2_error(r, 400, "invalid_encoding")
    # /v1 keeps its own form and status for the same mistake.
    r = predict(client, "m", [[0.0, 1.0, 2.0]])
    assert r.status_code == 422
    assert "detail" in r.json()
    assert "error" not in r.json()


def test_reads_and_infer_need_the_token_when_reads_are_protected(tmp_path):
    with running(tmp_path / "data", PROTECT_READS=True) as (srv, client):
        serve(client, "m")
        x = np.zeros((1, 2), np.float32)
        v2_error(client.get("/v2/models/m"), 401, "unauthorized")
        v2_error(client.get("/v2"), 401, "unauthorized")
        body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]}
        v2_error(client.post("/v2/models/m/infer", json=body), 401, "unauthorized")
        assert client.get("/v2/health/live").status_code == 200  # probes need no token
        assert client.get("/v2/health/ready").status_code == 200
        tc = triton_client(srv)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            assert tc.is_model_ready("m", headers=headers)
            result = tc.infer("m", [infer_input(x, binary=True)], headers=headers)
            assert result.as_numpy("output").shape == (1, 2)
        finally:
            tc.close()
        assert client.get("/v2/models/m", headers=AUTH).status_code == 200


def test_body_limits_hold_for_v2_bodies_compressed_or_not(tmp_path):
    with running(tmp_path / "data", MAX_UPLOAD_BYTES=64 * 1024) as (srv, client):
        serve(client, "m")
        rows = 9000  # 72,000 bytes of float32: above the limit raw, far below it gzipped
        x = np.zeros((rows, 2), np.float32)
        header = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
        content, headers = binary_body(header, x.tobytes())
        r = client.post("/v2/models/m/infer", content=content, headers=headers)
        v2_error(r, 413, "payload_too_large")
        tc = triton_client(srv)
        try:
            with pytest.raises(InferenceServerException) as info:
                tc.infer("m", [infer_input(x, binary=True)], request_compression_algorithm="gzip")
            assert info.value.status() == "413"
            assert "decompressed" in info.value.message()
            small = np.ones((3, 2), np.float32)
            result = tc.infer(
                "m", [infer_input(small, binary=True)], request_compression_algorithm="gzip"
            )
            assert result.as_numpy("output").shape == (3, 2)
        finally:
            tc.close()
