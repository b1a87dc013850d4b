"""POST/GET /v1/datasets against a real in-thread server: accepted formats, refusals, storage."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from tests.conftest import AUTH, ThreadServer, make_settings
from tests.helpers_jobs import blobs, npz_bytes, safetensors_bytes, upload_dataset

UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this runs `_record`: the server shares this process, so the list would show it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("unpickled",))


def _stored_files(server: ThreadServer) -> list[str]:
    root = server.settings.dataset_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _leftover_uploads(server: ThreadServer) -> list[str]:
    root = server.settings.upload_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize(
    ("filename", "encode"),
    [("blobs.npz", npz_bytes), ("blobs.safetensors", safetensors_bytes)],
)
def test_upload_answers_shapes_and_the_files_sha256(client, server, filename, encode):
    x, y = blobs(50)
    data = encode(x=x, y=y)
    r = upload_dataset(client, data, filename, name="two-blobs")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"]
    assert body["name"] == "two-blobs"
    assert body["num_samples"] == 50
    assert body["x_shape"] == [50, 2]
    assert body["y_shape"] == [50]
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert _stored_files(server) == [body["sha256"] + "." + filename.rsplit(".", 1)[1]]
    assert _leftover_uploads(server) == []


def test_name_defaults_to_the_filename(client):
    x, y = blobs(10)
    r = upload_dataset(client, npz_bytes(x=x, y=y), "from-disk.npz")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "from-disk.npz"


def test_float_targets_are_accepted_for_regression(client):
    x, _ = blobs(20)
    r = upload_dataset(client, npz_bytes(x=x, y=x.sum(axis=1, keepdims=True)), "reg.npz")
    assert r.status_code == 201, r.text
    assert r.json()["y_shape"] == [20, 1]
    assert r.json()["y_kind"] == "target"


def test_identical_content_shares_storage(client, server):
    x, y = blobs(30)
    data = npz_bytes(x=x, y=y)
    first = upload_dataset(client, data, "a.npz", name="a").json()
    second = upload_dataset(client, data, "b.npz", name="b").json()
    assert first["id"] != second["id"]
    assert first["sha256"] == second["sha256"]
    assert _stored_files(server) == [first["sha256"] + ".npz"]
    other = upload_dataset(client, npz_bytes(x=x[:20], y=y[:20]), "c.npz").json()
    assert len(_stored_files(server)) == 2
    listed = {d["id"]: d["sha256"] for d in client.get("/v1/datasets").json()}
    assert listed == {
        first["id"]: first["sha256"],
        second["id"]: second["sha256"],
        other["id"]: other["sha256"],
    }


def _garbage(**_: Any) -> bytes:
    return b"this is neither a zip archive nor safetensors" * 10


def _object_arrays() -> bytes:
    payload = np.empty(4, dtype=object)
    payload[:] = [_Payload() for _ in range(4)]
    return npz_bytes(x=payload, y=payload)


REFUSED = [
    pytest.param(lambda: _object_arrays(), "bad_dtype", id="object-array"),
    pytest.param(
        lambda: npz_bytes(x=np.array([[0.0, np.nan], [1.0, 2.0]], np.float32), y=np.array([0, 1])),
        "non_finite",
        id="nan",
    ),
    pytest.param(
        lambda: npz_bytes(x=np.ones((1, 2), np.float32), y=np.array([0])),
        "too_few_samples",
        id="one-sample",
    ),
    pytest.param(
        lambda: npz_bytes(x=np.ones((5, 2), np.float32), y=np.array([0, 1, 0])),
        "length_mismatch",
        id="length-mismatch",
    ),
    pytest.param(
        lambda: npz_bytes(x=np.ones((5, 2), np.float32)), "missing_arrays", id="missing-y"
    ),
    pytest.param(
        lambda: safetensors_bytes(x=np.ones((5, 2), np.float32)),
        "missing_arrays",
        id="missing-y-safetensors",
    ),
    pytest.param(lambda: _garbage(), "unreadable_dataset", id="garbage"),
    pytest.param(lambda: b"PK\x03\x04" + b"\0" * 200, "unreadable_dataset", id="broken-zip"),
]


@pytest.mark.parametrize(("make", "code"), REFUSED)
def test_refused_uploads_name_the_problem_and_store_nothing(client, server, make, code):
    UNPICKLED.clear()
    r = upload_dataset(client, make(), "bad.npz")
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == code
    assert body["detail"]
    assert UNPICKLED == []
    assert client.get("/v1/datasets").json() == []
    assert _stored_files(server) == []
    assert _leftover_uploads(server) == []


def test_upload_without_a_file_is_refused(client):
    r = client.post("/v1/datasets", data={"name": "nothing"}, files={}, headers=AUTH)
    assert r.status_code in (400, 422), r.text
    assert "code" in r.json()


def test_upload_needs_the_token(client):
    x, y = blobs(10)
    r = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x, y=y))})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert client.get("/v1/datasets").json() == []


def test_upload_over_the_size_limit_is_413(tmp_path):
    srv = ThreadServer(make_settings(tmp_path / "data", MAX_UPLOAD_BYTES=4096)).start()
    try:
        import httpx

        x, y = blobs(2000)
        data = npz_bytes(x=x, y=y)
        assert len(data) > 4096
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = upload_dataset(c, data, "big.npz")
            assert r.status_code == 413, r.text
            assert r.json()["code"] == "payload_too_large"
            assert c.get("/v1/datasets").json() == []
            small_x, small_y = blobs(10)
            assert upload_dataset(c, npz_bytes(x=small_x, y=small_y)).status_code == 201
    finally:
        srv.stop()
    assert _stored_files(srv) != []


def test_get_one_and_list(client):
    x, y = blobs(12)
    created = upload_dataset(client, npz_bytes(x=x, y=y), "one.npz", name="one").json()
    r = client.get(f"/v1/datasets/{created['id']}")
    assert r.status_code == 200
    assert r.json() == created
    listed = client.get("/v1/datasets")
    assert listed.status_code == 200
    assert listed.json() == [created]


def test_unknown_dataset_is_404(client):
    r = client.get("/v1/datasets/0123456789abcdef")
    assert r.status_code == 404
    assert r.json()["code"] == "dataset_not_found"
