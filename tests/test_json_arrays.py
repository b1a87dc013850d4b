"""Tensor-sized JSON bodies decode through simdjson exactly as through orjson, and every body that
is not a plain rectangular array of numbers falls back to the general path and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from service.api.json_arrays import numeric_inputs
from tests.conftest import AUTH, pt_bytes, reference_model, trained_state_dict, upload
from tests.helpers_api import running


def _general(body: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)


@pytest.mark.parametrize("shape", [(3,), (1, 2), (5, 7), (1, 3, 32, 32), (2, 1, 28, 28)])
def test_numbers_decode_exactly_as_the_general_path(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    values = rng.normal(size=shape) * 10.0 ** rng.integers(-40, 39, size=shape)
    body = json.dumps({"inputs": values.tolist()}).encode()
    got = numeric_inputs(body)
    assert got is not None
    assert got.shape == shape
    np.testing.assert_array_equal(got.astype(np.float32), _general(body))


def test_every_json_number_form_decodes_as_orjson_reads_it() -> None:
    text = "[0, -0, -0.0, 1, -17, 3.25, 1e3, 1E-3, -2.5e+2, 4.9e-324, 1.7976931348623157e308, "
    text += "3.4028235e38, 3.5e38, 9007199254740993, 18446744073709551615, -9223372036854775808]"
    body = ('{"inputs": ' + text + "}").encode()
    got = numeric_inputs(body)
    assert got is not None
    want = np.asarray(orjson.loads(body)["inputs"], dtype=np.float64)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[2])


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf{"inputs": [1, 2]}',  # a BOM: orjson refuses it, json.loads reads it
        b'\t{"inputs":[1,2]}\n\n',
        b'{"in\\u0070uts": [1, 2]}',
        b'{"inputs": [-1e-5000, 2]}',
    ],
)
def test_what_it_takes_the_general_path_reads_the_same(body: bytes) -> None:
    got = numeric_inputs(body)
    assert got is not None
    np.testing.assert_array_equal(got, np.asarray(json.loads(body)["inputs"], dtype=np.float64))


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[1, 2], [3, [4]]]}',  # an array among the numbers, same count of values
        b'{"inputs": [[1, 2], [3], [4, 5, 6]]}',  # ragged, same count of values and arrays
        b'{"inputs": [[1, 2], 3]}',
        b'{"inputs": [[[1], [2]], [[3], 4]]}',
        b'{"inputs": []}',
        b'{"inputs": [[]]}',
        b'{"inputs": [1, "2"]}',
        b'{"inputs": [1, true]}',
        b'{"inputs": [1, null]}',
        b'{"inputs": [1, {}]}',
        b'{"inputs": [NaN, 1]}',
        b'{"inputs": [Infinity]}',
        b'{"inputs": [1e400]}',
        b'{"inputs": [123456789012345678901234567890]}',
        b'{"inputs": [1], "extra": 1}',
        b'{"inputs": [1], "inputs": [2]}',  # duplicate keys: orjson keeps the last
        b'{"input": [1]}',
        b'{"inputs": 1}',
        b'{"inputs": "[1]"}',
        b"[1, 2]",
        b'{"inputs": [1, 2]} trailing',
        b'{"inputs": [1, 2]',
        b'{"inputs": [1, 2\xff]}',
        b"",
    ],
)
def test_anything_else_is_left_to_the_general_path(body: bytes) -> None:
    assert numeric_inputs(body) is None
    assert numeric_inputs(b'{"inputs": [1.5, 2]}') is not None  # the parser is still usable


def test_large_bodies_through_a_server_answer_and_refuse_as_small_ones(tmp_path: Path) -> None:
    config = {"num_classes": 3}
    state_dict = trained_state_dict("mnist_cnn", **config)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = x.tolist()
    assert len(json.dumps({"inputs": rows})) > 2048  # the simdjson path
    with running(tmp_path / "data") as (_, client):
        r = client.post(
            "/v1/models",
            json={"name": "m", "architecture": "mnist_cnn", "config": config},
            headers=AUTH,
        )
        assert r.status_code == 201, r.text
        assert upload(client, "m", pt_bytes(state_dict)).status_code == 201

        r = client.post("/v1/models/m/predict", json={"inputs": rows})
        assert r.status_code == 200, r.text
        want = reference_model("mnist_cnn", state_dict, **config)(x).detach()
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]), want, rtol=1e-4, atol=1e-4)

        def refused(inputs: Any, extra: str = "") -> dict[str, Any]:
            body = json.dumps({"inputs": inputs}, allow_nan=True)[:-1] + extra + "}"
            answer = client.post(
                "/v1/models/m/predict",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 422, answer.text
            detail: dict[str, Any] = answer.json()
            return detail

        ragged = [rows[0], [rows[1][0][:-1]]]
        assert refused(ragged)["code"] == "invalid_input_shape"
        nested = [rows[0], [[*rows[1][0][0][:-1], [0.5]], *rows[1][0][1:]]]
        assert refused(nested)["code"] == "invalid_input_shape"
        text = [rows[0], [[[*rows[1][0][0][:-1], "0.5"], *rows[1][0][1:]]]]
        assert refused(text)["code"] == "invalid_input_type"
        with_nan = [rows[0], [[[*rows[1][0][0][:-1], float("nan")], *rows[1][0][1:]]]]
        assert refused(with_nan)["code"] == "non_finite_input"
        assert refused(rows, ', "extra": 1')["code"] == "validation_error"
        wrong = x[:, :, :27].tolist()
        detail = refused(wrong)
        assert detail["code"] == "invalid_input_shape"
        assert detail["found_shape"] == [2, 1, 27, 28]
