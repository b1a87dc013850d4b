"""The served OpenAPI document tells the truth, and the server keeps to it.

Each test here pins down one thing that schemathesis (`test_fuzz_openapi.py`) found wrong: errors
documented as FastAPI's `HTTPValidationError` or not at all, no bearer scheme, a 405 whose
`Allow` named one method of several, upload forms and job bodies that took what the document
says they refuse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, pt_bytes, trained_state_dict
from tests.helpers_api import assert_error, running, serve, snapshot, stored_files, version_numbers
from tests.helpers_jobs import blobs, dataset_id, npz_bytes

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
V2_ERROR_REF = {"$ref": "#/components/schemas/V2ErrorBody"}
# Their non-2xx answers are readiness reports, not errors.
READINESS = {("get", "/readyz"), ("get", "/v2/health/ready")}
WRITES = {
    ("post", "/v1/models"),
    ("delete", "/v1/models/{name}"),
    ("post", "/v1/models/{name}/versions"),
    ("post", "/v1/models/{name}/versions/{version}/promote"),
    ("post", "/v1/datasets"),
    ("post", "/v1/jobs"),
    ("post", "/v1/jobs/{job_id}/cancel"),
}


def _document(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()
    return document


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _error_schema(operation: dict[str, Any], status: str) -> Any:
    return operation["responses"][status]["content"]["application/json"]["schema"]


def test_every_documented_error_is_the_contract_body(client):
    document = _document(client)
    assert "HTTPValidationError" not in str(document)
    body = document["components"]["schemas"]["ErrorBody"]
    assert set(body["required"]) == {"detail", "code"}
    assert body["additionalProperties"] is True
    v2_body = document["components"]["schemas"]["V2ErrorBody"]
    assert set(v2_body["required"]) == {"error", "code"}
    for key, operation in _operations(document).items():
        v2 = key[1].startswith("/v2")
        for status in operation["responses"]:
            if status.startswith(("4", "5")) and key not in READINESS:
                assert _error_schema(operation, status) == (V2_ERROR_REF if v2 else ERROR_REF), (
                    key,
                    status,
                )
        if v2:  # the protocol answers a bad request with 400, never 422
            assert "422" not in operation["responses"], key


def test_v2_errors_are_the_documented_protocol_body_with_400(client):
    serve(client, "m")
    r = client.post("/v2/models/m/infer", json={"inputs": []})
    assert r.status_code == 400, r.text
    assert set(r.json()) >= {"error", "code"}, r.json()
    assert "detail" not in r.json(), r.json()
    infer = _operations(_document(client))[("post", "/v2/models/{name}/infer")]
    assert {"400", "404", "409", "413", "503"} <= infer["responses"].keys()
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]["200"]["content"]) == {
        "application/json",
        "application/octet-stream",
    }


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/m/versions/9223372036854775808",
        "/v1/models/m/versions/99999999999999999999/weights",
        "/v2/models/m/versions/9223372036854775808",
        "/v2/models/m/versions/99999999999999999999/ready",
    ],
)
def test_a_version_beyond_sqlite_integers_is_refused_not_a_500(client, path):
    serve(client, "m")
    r = client.get(path)
    if path.startswith("/v2"):
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "validation_error", r.json()
    else:
        assert_error(r, 422, "validation_error")


def test_writes_document_the_bearer_scheme_and_401_and_reads_do_not(client):
    document = _document(client)
    assert document["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "BNSERVE_API_TOKEN, or the file api-token in the data dir",
        }
    }
    operations = _operations(document)
    assert operations.keys() > WRITES
    for key, operation in operations.items():
        if key in WRITES:
            assert operation["security"] == [{"bearerAuth": []}], key
            assert _error_schema(operation, "401") == ERROR_REF, key
        else:
            assert "security" not in operation, key
            assert "401" not in operation["responses"], key


def test_with_protect_reads_every_v1_operation_documents_the_token(tmp_path: Path):
    with running(tmp_path / "data", PROTECT_READS=True) as (_, client):
        operations = _operations(_document(client))
        for (method, path), operation in operations.items():
            # /v2 as /v1, but its health probes answer without a token, as /healthz does;
            # /metrics needs it too (issue #17).
            protected = (
                path.startswith("/v1/")
                or path == "/metrics"
                or (path.startswith("/v2") and not path.startswith("/v2/health/"))
            )
            assert ("security" in operation) is protected, (method, path)
            assert ("401" in operation["responses"]) is protected, (method, path)
        r = client.get("/v1/models")
        assert_error(r, 401, "unauthorized")


def test_bodies_document_400_and_413_and_routes_their_own_errors(client):
    operations = _operations(_document(client))
    for key, operation in operations.items():
        if "requestBody" in operation:
            refused = "400" if key[1].startswith("/v2") else "422"
            assert {"400", "413", refused} <= operation["responses"].keys(), key
    predict = operations[("post", "/v1/models/{name}/predict")]["responses"]
    assert {"404", "409", "422", "503"} <= predict.keys()
    assert {"404", "409"} <= operations[("post", "/v1/jobs/{job_id}/cancel")]["responses"].keys()
    metrics = operations[("get", "/metrics")]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/models", "GET, POST"),
        ("PUT", "/v1/models/m", "DELETE, GET"),
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("GET", "/v1/models/m/versions/1/promote", "POST"),
    ],
)
def test_405_allows_every_method_of_the_path(client, method, path, allowed):
    r = client.request(method, path, headers=AUTH)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allowed


def test_upload_forms_refuse_fields_they_do_not_document(client, server):
    data_dir = server.settings.DATA_DIR
    serve(client, "m")
    before = snapshot(client), stored_files(data_dir)
    checkpoint = pt_bytes(trained_state_dict("mlp_bn", seed=1))
    r = client.post(
        "/v1/models/m/versions",
        files={"file": ("w.pt", checkpoint)},
        data={"promte": "false"},
        headers=AUTH,
    )
    body = assert_error(r, 422, "unknown_field")
    assert "'promte'" in body["detail"], body
    assert "promote" in body["detail"], body
    assert (snapshot(client), stored_files(data_dir)) == before
    assert version_numbers(client, "m") == [1]

    x, y = blobs(20)
    r = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", npz_bytes(x=x, y=y))},
        data={"nmae": "typo"},
        headers=AUTH,
    )
    assert_error(r, 422, "unknown_field")
    assert client.get("/v1/datasets").json() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("momentum", False), ("epochs", "2"), ("lr", "0.1"), ("batch_size", 8.0), ("seed", False)],
)
def test_job_fields_take_json_numbers_not_booleans_or_strings(client, field, value):
    serve(client, "m")
    x, y = blobs(40)
    job = {"model": "m", "dataset": dataset_id(client, x, y), "epochs": 1, "lr": 0.1}
    r = client.post("/v1/jobs", json={**job, field: value}, headers=AUTH)
    body = assert_error(r, 422, "validation_error")
    assert body["errors"][0]["field"].startswith(field), body
    assert client.get("/v1/jobs").json() == []


def test_every_operation_is_in_one_declared_group_that_never_mixes_v1_and_v2(client):
    document = _document(client)
    declared = [tag["name"] for tag in document["tags"]]
    assert all(tag.get("description") for tag in document["tags"])
    paths_of: dict[str, set[str]] = {name: set() for name in declared}
    for (_, path), operation in _operations(document).items():
        (tag,) = operation["tags"]
        paths_of[tag].add(path)
    for tag, paths in paths_of.items():
        assert paths, f"tag {tag!r} is declared but has no operation"
        families = {
            path.split("/")[1] if path.startswith(("/v1/", "/v2")) else "" for path in paths
        }
        assert len(families) == 1, (tag, sorted(paths))


_ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_this_server_serves(client, page):
    r = client.get(page)
    assert r.status_code == 200, r.text
    html = r.text
    # Nothing from a CDN or any other host: the page works offline.
    assert not re.search(r"""(https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", html, re.IGNORECASE), html
    assets = _ASSET.findall(html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        assert asset.startswith("/docs/assets/"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 1000, asset
    assert "/openapi.json" in html
    if page == "/docs":
        assert any(a.endswith(".css") for a in assets), html
        assert '"persistAuthorization": true' in html  # the Authorize token survives a reload
        assert client.get("/docs/oauth2-redirect").status_code == 200


def test_the_training_options_are_documented(client):
    schemas = _document(client)["components"]["schemas"]
    create = schemas["JobCreate"]["properties"]
    for field in ("keep", "early_stopping", "lr_schedule", "bn", "precise_bn", "augment"):
        assert create[field].get("description"), field
    assert {"kind", "warmup_epochs", "step_size", "gamma"} <= schemas["LRSchedule"][
        "properties"
    ].keys()
    assert {"patience", "min_delta"} <= schemas["EarlyStopping"]["properties"].keys()
    assert schemas["PreciseBN"]["required"] == ["batches"]
    assert {"random_crop", "random_resized_crop", "hflip", "vflip", "rotation"} <= schemas[
        "Augment"
    ]["properties"].keys()
    assert {"kept_epoch", "stop_reason"} <= schemas["JobPublic"]["properties"].keys()
