"""v2 `infer` with encoded images (a BYTES input) and Triton's classification extension, through
tritonclient against a real server: the answers must be /v1's image answers for the same files.
"""

from __future__ import annotations

import base64
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

from tests.conftest import AUTH, ThreadServer, pt_bytes, trained_state_dict, upload
from tests.helpers_api import serve
from tests.test_images import MNIST, _bomb_png, _gif, _picture, _png


@pytest.fixture
def tc(server: ThreadServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture
def digits(client: httpx.Client) -> None:
    body = {"name": "digits", "architecture": "mnist_cnn", "preprocess": {"image": MNIST}}
    assert client.post("/v1/models", json=body, headers=AUTH).status_code == 201
    assert upload(client, "digits", pt_bytes(trained_state_dict("mnist_cnn"))).status_code == 201


def images_input(blobs: list[bytes], *, binary: bool, shape: list[int] | None = None) -> Any:
    """As a Triton or KServe client sends images: raw bytes in binary, base64 in JSON."""
    items = blobs if binary else [base64.b64encode(b) for b in blobs]
    array = np.array(items, dtype=np.object_).reshape(shape or [len(blobs)])
    tensor = triton.InferInput("input", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def v2_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code, body
    assert "detail" not in body
    message: str = body["error"]
    return message


def test_bytes_images_answer_as_v1_with_classification(
    client: httpx.Client, tc: triton.InferenceServerClient, digits: None
) -> None:
    blobs = [_png(_picture((28, 28), "L", seed=1)), _png(_picture((40, 30), "RGB", seed=2))]
    files = [(f"f{i}", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    r = client.post("/v1/models/digits/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    v1 = r.json()
    meta = tc.get_model_metadata("digits")
    assert meta["parameters"]["preprocess"] == {"image": MNIST}
    assert meta["parameters"]["image_input"] == {
        "name": "input",
        "datatype": "BYTES",
        "shape": [-1],
    }
    assert "classification" in tc.get_server_metadata()["extensions"]
    for binary, shape in ((True, [2]), (False, [2, 1])):
        result = tc.infer(
            "digits",
            [images_input(blobs, binary=binary, shape=shape)],
            outputs=[
                triton.InferRequestedOutput("output", binary_data=binary),
                triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2),
            ],
        )
        out = torch.from_numpy(result.as_numpy("output").copy())
        torch.testing.assert_close(out, torch.tensor(v1["outputs"]), rtol=1e-5, atol=1e-5)
        classes = result.as_numpy("probabilities")
        assert classes.shape == (2, 2)
        for row, top in zip(classes.tolist(), v1["top_k"], strict=True):
            # tritonclient gives bytes from the binary form, str from JSON
            parsed = [(item if isinstance(item, str) else item.decode()).split(":") for item in row]
            assert [(int(i), label) for _, i, label in parsed] == [
                (e["index"], e["label"]) for e in top
            ]
            assert [float(v) for v, _, _ in parsed] == pytest.approx(
                [e["probability"] for e in top], abs=1e-6
            )
    # By hand, JSON out: the strings are Triton's "<value>:<index>:<label>" with 9 decimals.
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(blobs[0]).decode()],
            }
        ],
        "outputs": [{"name": "output", "parameters": {"classification": 20}}],
    }
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [1, 10]  # at most the number of classes, as Triton
    value, index, label = output["data"][0].split(":")
    assert len(value.split(".")[1]) == 9
    assert int(index) == v1["predictions"][0]
    assert label == v1["labels"][0]


def test_bad_images_and_bytes_are_4xx_and_the_model_keeps_serving(
    client: httpx.Client, tc: triton.InferenceServerClient, digits: None
) -> None:
    good = _png(_picture((28, 28), "L"))
    corrupt = good[:60]
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as info:
            tc.infer("digits", [images_input([good, corrupt], binary=binary)])
        assert info.value.status() == "400"
        assert "image 1" in info.value.message()
    started = time.perf_counter()
    with pytest.raises(InferenceServerException) as info:
        tc.infer("digits", [images_input([_bomb_png(50_000, 50_000)], binary=True)])
    assert info.value.status() == "413"
    assert time.perf_counter() - started < 2.0

    def send(data: Any, shape: list[int], **params: Any) -> httpx.Response:
        tensor = {"name": "input", "shape": shape, "datatype": "BYTES", "parameters": params}
        return client.post("/v2/models/digits/infer", json={"inputs": [{**tensor, "data": data}]})

    b64 = base64.b64encode(good).decode()
    v2_error(send([b64[:40] + "!!" + b64[40:]], [1]), 400, "invalid_image")  # not base64
    v2_error(send([base64.b64encode(corrupt).decode()], [1]), 400, "invalid_image")
    v2_error(send([base64.b64encode(_gif()).decode()], [1]), 400, "unsupported_image_format")
    v2_error(
        send([base64.b64encode(_bomb_png(50_000, 50_000)).decode()], [1]), 413, "image_too_large"
    )
    v2_error(send([b64], [1, 2]), 400, "invalid_input_shape")
    v2_error(send([b64, b64], [1]), 400, "invalid_input_shape")
    v2_error(send([7], [1]), 400, "invalid_input_type")
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(good) + 2},
                }
            ]
        }
    ).encode()
    raw = struct.pack("<I", len(good)) + good + b"\x05\x00"  # a second length cut short
    r = client.post(
        "/v2/models/digits/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    v2_error(r, 400, "invalid_binary_data")
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64]}]
    }
    bad_count = {**body, "outputs": [{"name": "output", "parameters": {"classification": "2"}}]}
    v2_error(client.post("/v2/models/digits/infer", json=bad_count), 400, "invalid_parameter")
    serve(client, "vec")  # a tensor model: BYTES is refused, naming it
    message = v2_error(client.post("/v2/models/vec/infer", json=body), 400, "images_not_accepted")
    assert "'vec'" in message
    assert "parameters" not in tc.get_model_metadata("vec")
    result = tc.infer("digits", [images_input([good], binary=True)])
    assert result.as_numpy("output").shape == (1, 10)
