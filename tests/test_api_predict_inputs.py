"""Refused prediction inputs: each is a 422 with a `code` and a detail naming the expected shape.

Also unknown models (404), models without a serving version (409) and bad `?version=`; after
every refusal the model still answers exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import create_model, pt_bytes, trained_state_dict, upload
from tests.helpers_api import assert_error, predict, predict_ok, running, samples, serve

MAX_REQUEST_BATCH = 8


def names_shape(detail: str, shape: tuple[int, ...]) -> bool:
    """Whether a detail speaks of a shape and spells out `shape` (1x28x28, [1, 28, 28]...)."""
    forms = ["x".join(map(str, shape)), str(list(shape)), str(tuple(shape))]
    spelled = any(re.search(rf"(?<![\w.]){re.escape(f)}(?![\w.])", detail) for f in forms)
    return spelled and "shape" in detail


def _json(inputs: Any) -> dict[str, Any]:
    return {"json": {"inputs": inputs}}


def _raw(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


# (request, expected code); mlp_bn with in_features=3, so a sample is [3].
INPUT_REFUSALS = {
    "wrong-sample-shape": (_json([[1.0, 2.0]]), "invalid_input_shape"),
    "wrong-bare-shape": (_json([1.0, 2.0, 3.0, 4.0]), "invalid_input_shape"),
    "too-deep": (_json([[[1.0, 2.0, 3.0]]]), "invalid_input_shape"),
    "ragged": (_json([[1.0, 2.0, 3.0], [1.0, 2.0]]), "invalid_input_shape"),
    "ragged-deep": (_json([[1.0, [2.0], 3.0]]), "invalid_input_shape"),
    "strings": (_json([["a", "b", "c"]]), "invalid_input_type"),
    "numeric-strings": (_json([["1", "2", "3"]]), "invalid_input_type"),
    "booleans": (_json([[True, False, True]]), "invalid_input_type"),
    "null-value": (_json([[None, 1.0, 2.0]]), "invalid_input_type"),
    "nan": (_raw('{"inputs": [[NaN, 1, 2]]}'), "non_finite_input"),
    "infinity": (_raw('{"inputs": [[1, Infinity, 2]]}'), "non_finite_input"),
    "minus-infinity": (_raw('{"inputs": [1, 2, -Infinity]}'), "non_finite_input"),
    "beyond-float32": (_json([[1e39, 0.0, 1.0]]), "non_finite_input"),
    "empty-batch": (_json([]), "empty_batch"),
}


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[httpx.Client]:
    """A server with MAX_REQUEST_BATCH=8 serving mlp_bn(in_features=3) as `m`."""
    with running(tmp_path / "data", MAX_REQUEST_BATCH=MAX_REQUEST_BATCH) as (_, client):
        serve(client, "m", "mlp_bn", in_features=3)
        yield client


def still_answers(client: httpx.Client, x: torch.Tensor, expected: torch.Tensor) -> None:
    outputs, version = predict_ok(client, "m", x)
    assert version == 1
    assert torch.equal(outputs, expected)


@pytest.mark.parametrize("case", list(INPUT_REFUSALS))
def test_bad_inputs_are_refused_naming_the_expected_shape(limited, case):
    x = samples((3,), 2)
    before, _ = predict_ok(limited, "m", x)
    request, code = INPUT_REFUSALS[case]
    r = limited.post("/v1/models/m/predict", **request)
    body = assert_error(r, 422, code)
    assert names_shape(body["detail"], (3,)), body["detail"]
    still_answers(limited, x, before)


@pytest.mark.parametrize(
    "inputs", [None, "1, 2, 3", 5, {"x": [1, 2, 3]}], ids=["null", "string", "number", "object"]
)
def test_inputs_that_are_not_a_list_are_refused(limited, inputs):
    x = samples((3,), 2)
    before, _ = predict_ok(limited, "m", x)
    assert_error(limited.post("/v1/models/m/predict", json={"inputs": inputs}), 422)
    assert_error(limited.post("/v1/models/m/predict", json={"samples": [[1, 2, 3]]}), 422)
    still_answers(limited, x, before)


def test_batch_above_max_request_batch_is_refused(limited):
    x = samples((3,), MAX_REQUEST_BATCH + 1)
    before, _ = predict_ok(limited, "m", x[:MAX_REQUEST_BATCH])  # at the limit: fine
    body = assert_error(predict(limited, "m", x.tolist()), 422, "batch_too_large")
    assert str(MAX_REQUEST_BATCH) in body["detail"]
    assert "MAX_REQUEST_BATCH" in body["detail"]
    still_answers(limited, x[:MAX_REQUEST_BATCH], before)


def test_image_model_refusal_names_its_image_shape(client):
    serve(client, "digits", "mnist_cnn", num_classes=4)
    body = assert_error(predict(client, "digits", [[[0.0] * 27] * 28]), 422, "invalid_input_shape")
    assert names_shape(body["detail"], (1, 28, 28)), body["detail"]
    body = assert_error(predict(client, "digits", [[[["x"] * 28] * 28]]), 422)
    assert names_shape(body["detail"], (1, 28, 28)), body["detail"]
    outputs, version = predict_ok(client, "digits", samples((1, 28, 28), 2))
    assert (outputs.shape, version) == ((2, 4), 1)


def test_unknown_model_is_404_and_model_without_serving_version_is_409(client):
    assert_error(predict(client, "ghost", [1.0, 2.0]), 404, "model_not_found")

    create_model(client, "empty", "mlp_bn")
    body = assert_error(predict(client, "empty", [1.0, 2.0]), 409, "no_serving_version")
    assert "upload" in body["detail"]

    # A version uploaded with promote=false does not make the model serve.
    r = upload(client, "empty", pt_bytes(trained_state_dict("mlp_bn")), promote="false")
    assert r.status_code == 201, r.text
    assert r.json()["serving"] is False
    assert_error(predict(client, "empty", [1.0, 2.0]), 409, "no_serving_version")
    # ... but it can be asked for by number.
    outputs, version = predict_ok(client, "empty", samples((2,), 1), version=1)
    assert (outputs.shape, version) == ((1, 2), 1)


def test_unknown_or_invalid_version_parameter(client):
    serve(client, "m", "mlp_bn")
    x = samples((2,), 2)
    before, _ = predict_ok(client, "m", x)
    assert_error(predict(client, "m", x.tolist(), version=2), 404, "version_not_found")
    assert_error(predict(client, "m", x.tolist(), version=0), 422)
    r = client.post("/v1/models/m/predict", params={"version": "latest"}, json={"inputs": [1, 2]})
    assert_error(r, 422)
    assert_error(predict(client, "ghost", x.tolist(), version=1), 404, "model_not_found")
    outputs, version = predict_ok(client, "m", x)
    assert version == 1
    assert torch.equal(outputs, before)
