"""POST /v1/models/{name}/versions: what uploads are refused, and what accepted uploads report.

A refused upload answers with the right status and `code`, and leaves no trace: the model keeps
serving the same version with the same outputs, no version is added, and no file is left in the
checkpoint store or the upload folder. Accepted uploads strip wrapper prefixes and report the
BatchNorm layers and whether their running statistics look trained.
"""

from __future__ import annotations

import io
import pathlib
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from models import get_architecture
from tests.conftest import AUTH, pt_bytes, reference_model, upload
from tests.helpers_api import (
    assert_error,
    predict_ok,
    running,
    samples,
    serve,
    stored_files,
    version_numbers,
)

StateDict = dict[str, torch.Tensor]


class TouchOnLoad:
    """Unpickling this calls `Path.touch(path)`: the classic pickle payload, made harmless."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def _changed(state_dict: StateDict, edit: Callable[[StateDict], None]) -> StateDict:
    copy = {k: v.clone() for k, v in state_dict.items()}
    edit(copy)
    return copy


def _set(key: str, index: tuple[int, ...], value: float) -> Callable[[StateDict], None]:
    def edit(sd: StateDict) -> None:
        sd[key][index] = value

    return edit


def _whole_module(_: StateDict, __: Path) -> bytes:
    arch = get_architecture("mlp_bn")
    return pt_bytes(arch.build(arch.parse_config({})).eval())


def _touching_pickle(sd: StateDict, tmp_path: Path) -> bytes:
    return pt_bytes({**sd, "extra": TouchOnLoad(tmp_path / "pwned")})


# Each case: (make the file bytes, file name, status, code, extra check of the error body).
Case = tuple[Callable[[StateDict, Path], bytes], str, int, str, Callable[[dict[str, Any]], None]]


def _nested(key: str) -> Callable[[StateDict, Path], bytes]:
    """The state_dict with `key` (new or not) a nested tensor, which has no `.shape`."""

    def make(sd: StateDict, _: Path) -> bytes:
        with warnings.catch_warnings():  # "nested tensors are in prototype stage"
            warnings.simplefilter("ignore", UserWarning)
            value = torch.nested.nested_tensor([torch.zeros(3), torch.zeros(5)])
        return pt_bytes({**sd, key: value})

    return make


def _no_check(body: dict[str, Any]) -> None:
    pass


def _mentions_state_dict(body: dict[str, Any]) -> None:
    assert "state_dict" in body["detail"], body


def _lists(*expected: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        errors = body["errors"]
        for item in expected:
            assert any(item.items() <= e.items() for e in errors), (item, errors)
        assert len(errors) == len(expected), errors
        for item in expected:
            assert item["key"] in body["detail"], body["detail"]

    return check


REFUSALS: dict[str, Case] = {
    "whole-pickled-module": (_whole_module, "w.pt", 400, "pickled_module", _mentions_state_dict),
    "pickle-running-code": (_touching_pickle, "w.pt", 400, "unsafe_pickle", _no_check),
    "list-of-tensors": (
        lambda sd, _: pt_bytes(list(sd.values())),
        "w.pt",
        422,
        "not_a_state_dict",
        _mentions_state_dict,
    ),
    "bare-tensor": (
        lambda sd, _: pt_bytes(sd["fc1.weight"]),
        "w.pt",
        422,
        "not_a_state_dict",
        _no_check,
    ),
    "empty-mapping": (lambda sd, _: pt_bytes({}), "w.pt", 422, "not_a_state_dict", _no_check),
    "non-tensor-values": (
        lambda sd, _: pt_bytes({k: v.tolist() for k, v in sd.items()}),
        "w.pt",
        422,
        "not_a_state_dict",
        _no_check,
    ),
    "garbage-bytes": (
        lambda sd, _: b"this is not a checkpoint\n" * 40,
        "w.pt",
        422,
        "unreadable_checkpoint",
        _no_check,
    ),
    "truncated-pt": (
        lambda sd, _: pt_bytes(sd)[:2000],
        "w.pt",
        422,
        "unreadable_checkpoint",
        _no_check,
    ),
    "broken-safetensors": (
        lambda sd, _: struct.pack("<Q", 12) + b'{"a": "b"} ' + b"\0" * 16,
        "w.safetensors",
        422,
        "unreadable_checkpoint",
        _no_check,
    ),
    "missing-keys": (
        lambda sd, _: pt_bytes(_changed(sd, lambda d: d.pop("fc3.weight"))),
        "w.pt",
        422,
        "missing_keys",
        _lists({"key": "fc3.weight", "problem": "missing", "expected": [2, 32]}),
    ),
    "unexpected-keys": (
        lambda sd, _: pt_bytes({**sd, "fc4.weight": torch.zeros(2, 2)}),
        "w.pt",
        422,
        "unexpected_keys",
        _lists({"key": "fc4.weight", "problem": "unexpected", "found": [2, 2]}),
    ),
    "shape-mismatches": (
        lambda sd, _: pt_bytes(
            {**sd, "fc1.weight": torch.zeros(64, 3), "bn2.running_mean": torch.zeros(33)}
        ),
        "w.pt",
        422,
        "shape_mismatch",
        _lists(
            {"key": "fc1.weight", "expected": [64, 2], "found": [64, 3]},
            {"key": "bn2.running_mean", "expected": [32], "found": [33]},
        ),
    ),
    "int-weights": (
        lambda sd, _: pt_bytes({**sd, "fc2.weight": torch.ones(32, 64, dtype=torch.int32)}),
        "w.pt",
        422,
        "bad_dtype",
        _lists({"key": "fc2.weight", "problem": "dtype", "expected": "float32", "found": "int32"}),
    ),
    "nan-weight": (
        lambda sd, _: pt_bytes(_changed(sd, _set("fc2.weight", (3, 4), float("nan")))),
        "w.pt",
        422,
        "non_finite",
        _lists({"key": "fc2.weight", "problem": "non_finite", "nan": 1, "inf": 0}),
    ),
    "inf-running-var": (
        lambda sd, _: pt_bytes(_changed(sd, _set("bn1.running_var", (5,), float("inf")))),
        "w.pt",
        422,
        "non_finite",
        _lists({"key": "bn1.running_var", "problem": "non_finite", "nan": 0, "inf": 1}),
    ),
    "nan-in-safetensors": (
        lambda sd, _: safetensors.torch.save(_changed(sd, _set("bn2.weight", (0,), float("nan")))),
        "w.safetensors",
        422,
        "non_finite",
        _lists({"key": "bn2.weight", "problem": "non_finite"}),
    ),
    "negative-running-var": (
        lambda sd, _: pt_bytes(_changed(sd, _set("bn1.running_var", (3,), -0.5))),
        "w.pt",
        422,
        "negative_running_var",
        _lists({"key": "bn1.running_var", "problem": "negative_running_var", "count": 1}),
    ),
    "nested-tensor": (
        _nested("bn1.running_mean"),
        "w.pt",
        422,
        "bad_layout",
        _lists({"key": "bn1.running_mean", "problem": "layout", "found": "nested"}),
    ),
    "nested-tensor-unexpected": (
        _nested("extra"),
        "w.pt",
        422,
        "unexpected_keys",
        _lists({"key": "extra", "problem": "unexpected", "found": "nested"}),
    ),
    "negative-num-batches-tracked": (
        lambda sd, _: pt_bytes({**sd, "bn2.num_batches_tracked": torch.tensor(-1)}),
        "w.pt",
        422,
        "negative_num_batches_tracked",
        _lists({"key": "bn2.num_batches_tracked", "problem": "negative_num_batches_tracked"}),
    ),
}


@pytest.fixture
def served(server, client) -> tuple[StateDict, Path]:
    """`m`: mlp_bn serving version 1; returns its weights and the server's data dir."""
    return serve(client, "m", "mlp_bn"), server.settings.DATA_DIR


def assert_untouched(
    client: httpx.Client, data_dir: Path, files: list[str], x: torch.Tensor, outputs: torch.Tensor
) -> None:
    """Version 1 still serves the same outputs; no version and no file was added."""
    again, version = predict_ok(client, "m", x)
    assert version == 1
    assert torch.equal(again, outputs)
    assert version_numbers(client, "m") == [1]
    assert client.get("/v1/models/m").json()["serving_version"] == 1
    assert stored_files(data_dir) == files


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_upload_changes_nothing(client, served, tmp_path, case):
    state_dict, data_dir = served
    make, filename, status, code, check = REFUSALS[case]
    x = samples((2,), 4)
    outputs, _ = predict_ok(client, "m", x)
    files = stored_files(data_dir)
    assert len(files) == 1
    assert files[0].endswith("v1.safetensors")

    r = upload(client, "m", make(state_dict, tmp_path), filename)
    body = assert_error(r, status, code)
    check(body)
    assert not (tmp_path / "pwned").exists()
    assert_untouched(client, data_dir, files, x, outputs)

    # The next accepted upload gets the next number: the refusal consumed none.
    r = upload(client, "m", pt_bytes(state_dict), promote="false")
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2


def test_pickle_payload_is_real_but_never_runs(client, served, tmp_path):
    """The payload above does create its file when unpickled: the server must never do that."""
    _, data_dir = served
    control = tmp_path / "control"
    torch.load(io.BytesIO(pt_bytes({"x": TouchOnLoad(control)})), weights_only=False)
    assert control.exists()

    files = stored_files(data_dir)
    target = tmp_path / "pwned"
    # As a bare object, wrapped like a Lightning checkpoint, and under a .safetensors name.
    payloads = [
        ("w.pt", pt_bytes(TouchOnLoad(target))),
        ("w.ckpt", pt_bytes({"state_dict": {"fc1.weight": TouchOnLoad(target)}})),
        ("w.safetensors", pt_bytes({"x": TouchOnLoad(target)})),
    ]
    for filename, data in payloads:
        body = assert_error(upload(client, "m", data, filename), 400, "unsafe_pickle")
        assert any("touch" in g or "getattr" in g for g in body.get("globals", [])), body
        assert not target.exists()
    assert version_numbers(client, "m") == [1]
    assert stored_files(data_dir) == files


# --- the size limit -----------------------------------------------------------------------------

LIMIT = 64 * 1024


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """A server with MAX_UPLOAD_BYTES=64 KiB serving mlp_bn as `m` (its weights fit)."""
    with running(tmp_path / "data", MAX_UPLOAD_BYTES=LIMIT) as (srv, client):
        serve(client, "m", "mlp_bn")
        yield client, srv.settings.DATA_DIR


def test_upload_above_limit_with_content_length_is_413(small):
    client, data_dir = small
    x = samples((2,), 3)
    outputs, _ = predict_ok(client, "m", x)
    files = stored_files(data_dir)
    r = upload(client, "m", b"\0" * (LIMIT + 1))
    body = assert_error(r, 413, "payload_too_large")
    assert "MAX_UPLOAD_BYTES" in body["detail"]
    assert_untouched(client, data_dir, files, x, outputs)


def test_chunked_upload_above_limit_is_413(small):
    """Without a Content-Length the limit must hold while the body streams in."""
    client, data_dir = small
    x = samples((2,), 3)
    outputs, _ = predict_ok(client, "m", x)
    files = stored_files(data_dir)
    boundary = "bnserve-test-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.pt"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(2 * LIMIT // 8192):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    request = client.build_request(
        "POST",
        "/v1/models/m/versions",
        content=body(),
        headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    r = client.send(request)
    assert_error(r, 413, "payload_too_large")
    assert_untouched(client, data_dir, files, x, outputs)


def _chunked(head: bytes, filler: bytes, tail: bytes) -> Iterator[bytes]:
    yield head
    for _ in range(2 * LIMIT // len(filler)):
        yield filler
    yield tail


_FORM_HEAD = (
    b'--bnserve-test-boundary\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
)
_FORM = (
    "multipart/form-data; boundary=bnserve-test-boundary",
    _FORM_HEAD,
    b"\r\n--bnserve-test-boundary--\r\n",
)
_JSON = ("application/json", b'{"name": "', b'"}')


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/m/versions", _FORM),
        ("/v1/datasets", _FORM),
        ("/v1/models", _JSON),
        ("/v1/jobs", _JSON),
    ],
    ids=["versions", "datasets", "models", "jobs"],
)
def test_chunked_body_above_limit_is_413_on_every_route(small, path, body):
    """Each route that takes a body answers 413 past the limit, as with a Content-Length; JSON
    bodies answered 400 "error parsing the body" once."""
    client, _ = small
    content_type, head, tail = body
    request = client.build_request(
        "POST",
        path,
        content=_chunked(head, b"a" * 8192, tail),
        headers={**AUTH, "content-type": content_type},
    )
    assert "content-length" not in request.headers
    answer = assert_error(client.send(request), 413, "payload_too_large")
    assert answer["limit"] == LIMIT


def test_upload_just_under_limit_is_not_413(small):
    client, _ = small
    r = upload(client, "m", b"\0" * (LIMIT - 1024))
    assert_error(r, 422, "unreadable_checkpoint")


# --- malformed requests -------------------------------------------------------------------------


def test_upload_without_file_field_is_refused_with_json(client, served):
    _, data_dir = served
    x = samples((2,), 3)
    outputs, _ = predict_ok(client, "m", x)
    files = stored_files(data_dir)
    url = "/v1/models/m/versions"
    attempts = [
        client.post(url, files={"weights": ("w.pt", b"abc")}, data={"note": "x"}, headers=AUTH),
        client.post(url, data={"note": "no file"}, headers=AUTH),
        client.post(url, json={"file": "w.pt"}, headers=AUTH),
        client.post(url, headers=AUTH),
    ]
    for r in attempts:
        body = assert_error(r, 422)
        assert "file" in body["detail"], body
    assert_untouched(client, data_dir, files, x, outputs)


def test_upload_with_bad_promote_field_or_unknown_model(client, served):
    state_dict, data_dir = served
    files = stored_files(data_dir)
    r = upload(client, "m", pt_bytes(state_dict), promote="maybe")
    assert "promote" in assert_error(r, 422)["detail"]
    assert_error(upload(client, "ghost", pt_bytes(state_dict)), 404, "model_not_found")
    assert version_numbers(client, "m") == [1]
    assert stored_files(data_dir) == files


# --- accepted uploads and their report ----------------------------------------------------------


@pytest.mark.parametrize(
    "prefixes",
    [["module."], ["_orig_mod."], ["module.", "_orig_mod."], ["_orig_mod.", "module."]],
    ids=["dataparallel", "compiled", "compiled-inside-ddp", "ddp-inside-compiled"],
)
def test_wrapper_prefixes_are_stripped_and_reported(client, served, prefixes):
    state_dict, _ = served
    outer = "".join(prefixes)
    wrapped = {outer + k: v for k, v in state_dict.items()}
    r = upload(client, "m", pt_bytes(wrapped))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["version"] == 2
    assert created["report"]["renamed"] == [
        {"prefix": p, "count": len(state_dict)} for p in prefixes
    ]
    weights = client.get("/v1/models/m/versions/2/weights")
    assert weights.status_code == 200
    stored = safetensors.torch.load(weights.content)
    assert stored.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(stored[key], value), key
    x = samples((2,), 3)
    outputs, version = predict_ok(client, "m", x)
    assert version == 2
    with torch.inference_mode():
        expected = reference_model("mlp_bn", state_dict)(x)
    assert torch.allclose(outputs, expected, rtol=1e-4, atol=1e-5)


def test_wrapped_checkpoint_dict_is_unwrapped(client, served):
    state_dict, _ = served
    inner = {f"module.{k}": v for k, v in state_dict.items()}
    checkpoint = {"epoch": torch.tensor(3), "state_dict": inner}
    r = upload(client, "m", pt_bytes(checkpoint))
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["unwrapped_from"] == "state_dict"
    assert report["renamed"] == [{"prefix": "module.", "count": len(state_dict)}]


def test_report_lists_bn_layers_with_trained_statistics(client, served):
    state_dict, _ = served
    report = client.get("/v1/models/m/versions/1").json()["report"]
    assert report["format"] == "pt"
    assert report["renamed"] == []
    assert report["num_tensors"] == len(state_dict)
    assert report["warnings"] == []
    layers = {layer["name"]: layer for layer in report["bn_layers"]}
    assert set(layers) == {"bn1", "bn2"}
    for name, width in (("bn1", 64), ("bn2", 32)):
        layer = layers[name]
        assert layer["kind"] == "BatchNorm1d"
        assert layer["num_features"] == width
        assert layer["stats_trained"] is True
        assert layer["num_batches_tracked"] == int(state_dict[f"{name}.num_batches_tracked"])
        assert layer["running_var_mean"] == pytest.approx(
            float(state_dict[f"{name}.running_var"].double().mean())
        )


def test_fresh_weights_are_accepted_with_untrained_statistics_flagged(client, served):
    arch = get_architecture("mlp_bn")
    fresh = arch.build(arch.parse_config({})).state_dict()
    r = upload(client, "m", pt_bytes(fresh), promote="false")
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert [layer["stats_trained"] for layer in report["bn_layers"]] == [False, False]
    assert [layer["num_batches_tracked"] for layer in report["bn_layers"]] == [0, 0]
    assert len(report["warnings"]) == 1
    warning = report["warnings"][0]
    assert "bn1" in warning
    assert "bn2" in warning
    assert "running statistics" in warning


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_precisions_are_cast_and_reported(client, served, dtype):
    state_dict, _ = served
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    r = upload(client, "m", pt_bytes(converted))
    assert r.status_code == 201, r.text
    casts = r.json()["report"]["dtype_casts"]
    floats = sorted(k for k, v in state_dict.items() if v.is_floating_point())
    assert sorted(c["key"] for c in casts) == floats
    assert {(c["from"], c["to"]) for c in casts} == {(str(dtype).removeprefix("torch."), "float32")}
    cast_back = {k: v.to(state_dict[k].dtype) for k, v in converted.items()}
    x = samples((2,), 3)
    outputs, version = predict_ok(client, "m", x)
    assert version == 2
    with torch.inference_mode():
        expected = reference_model("mlp_bn", cast_back)(x)
    assert torch.allclose(outputs, expected, rtol=1e-4, atol=1e-5)


def test_checkpoint_without_num_batches_tracked_is_filled_and_warned(client, served):
    """Checkpoints from PyTorch < 0.4.1 have no num_batches_tracked buffers."""
    state_dict, _ = served
    old = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    r = upload(client, "m", pt_bytes(old))
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert any("num_batches_tracked" in w for w in report["warnings"]), report["warnings"]
    assert [layer["stats_trained"] for layer in report["bn_layers"]] == [True, True]
    weights = client.get("/v1/models/m/versions/2/weights").content
    stored = safetensors.torch.load(weights)
    assert torch.equal(stored["bn1.num_batches_tracked"], torch.tensor(0))
    assert torch.equal(stored["bn1.running_mean"], state_dict["bn1.running_mean"])
    # bnserve's own copy, with its zero counters, is judged by the statistics' values: trained.
    r = upload(client, "m", weights, "v2.safetensors")
    assert r.status_code == 201, r.text
    layers = r.json()["report"]["bn_layers"]
    assert [(layer["num_batches_tracked"], layer["stats_trained"]) for layer in layers] == [
        (0, True),
        (0, True),
    ]
    assert r.json()["report"]["warnings"] == []
