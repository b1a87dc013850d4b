"""Every error is the contract's JSON `{"detail", "code"}`, FastAPI's and Starlette's own too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import AUTH
from tests.helpers_api import assert_error

# (request keyword arguments, status, code or None for any)
ERRORS: dict[str, tuple[dict[str, Any], int, str | None]] = {
    "malformed-json": (
        {
            "method": "POST",
            "url": "/v1/models",
            "content": b'{"name": "m", ',
            "headers": {**AUTH, "content-type": "application/json"},
        },
        422,
        "validation_error",
    ),
    "json-not-an-object": (
        {"method": "POST", "url": "/v1/models", "json": ["m", "mlp_bn"], "headers": AUTH},
        422,
        "validation_error",
    ),
    "missing-name": (
        {
            "method": "POST",
            "url": "/v1/models",
            "json": {"architecture": "mlp_bn"},
            "headers": AUTH,
        },
        422,
        "validation_error",
    ),
    "extra-field": (
        {
            "method": "POST",
            "url": "/v1/models",
            "json": {"name": "m", "architecture": "mlp_bn", "colour": "red"},
            "headers": AUTH,
        },
        422,
        "validation_error",
    ),
    "predict-malformed-json": (
        {
            "method": "POST",
            "url": "/v1/models/m/predict",
            "content": b"{inputs: [1, 2]}",
            "headers": {"content-type": "application/json"},
        },
        422,
        "validation_error",
    ),
    "predict-no-body": ({"method": "POST", "url": "/v1/models/m/predict"}, 422, None),
    "unknown-route": ({"method": "GET", "url": "/v1/nothing-here"}, 404, "not_found"),
    "unknown-root-route": ({"method": "GET", "url": "/"}, 404, "not_found"),
    "unknown-model": ({"method": "GET", "url": "/v1/models/ghost"}, 404, "model_not_found"),
    "method-not-allowed": (
        {"method": "PUT", "url": "/v1/models", "headers": AUTH},
        405,
        "method_not_allowed",
    ),
    "delete-architectures": (
        {"method": "DELETE", "url": "/v1/architectures", "headers": AUTH},
        405,
        "method_not_allowed",
    ),
    "get-predict": ({"method": "GET", "url": "/v1/models/m/predict"}, 405, "method_not_allowed"),
    "unauthorized": (
        {"method": "POST", "url": "/v1/models", "json": {"name": "m", "architecture": "mlp_bn"}},
        401,
        "unauthorized",
    ),
    "path-param-type": ({"method": "GET", "url": "/v1/models/m/versions/abc"}, 422, None),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_bodies_are_json_with_detail_and_code(client, case):
    request, status, code = ERRORS[case]
    assert client.post(
        "/v1/models", json={"name": "m", "architecture": "mlp_bn"}, headers=AUTH
    ).status_code in (201, 409)
    body = assert_error(client.request(**request), status, code)
    if body["code"] == "validation_error":
        assert body["errors"], body
        for error in body["errors"]:
            assert set(error) >= {"field", "message"}


def test_validation_error_names_the_missing_field(client):
    r = client.post("/v1/models", json={"architecture": "mlp_bn"}, headers=AUTH)
    body = assert_error(r, 422, "validation_error")
    assert "name" in body["detail"]
    assert [e["field"] for e in body["errors"]] == ["name"]
