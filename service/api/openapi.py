"""What the OpenAPI document says beyond FastAPI's defaults, so that it tells the truth.

Routes name the error statuses they can answer with `responses=errors(...)`. `install_openapi`
adds what follows from the app as a whole: the bearer scheme (the Authorize button of `/docs`)
with `security` and a 401 on exactly the operations that check the token (FastAPI marks those
whose dependencies declare it; reads keep the mark only with BNSERVE_PROTECT_READS); a 400 on
every operation (any request can be malformed) and a 413 on every one with a body; and the
contract's error body in place of FastAPI's `HTTPValidationError` for 422. On the Open Inference
Protocol's paths (`/v2...`) errors are its `V2ErrorBody` and a bad request is a 400, never a 422
(`service.api.errors`), so those routes name theirs with `v2_errors(...)` and the completion
follows suit. Models that a route documents by hand (`openapi_extra`, for bodies it reads itself)
come in through `component_ref`.
`tests/test_fuzz_openapi.py` holds every response of a real server to this document.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import compile_path

from service.api.deps import BEARER_SCHEME, READ_BEARER_SCHEME
from service.api.schemas import ErrorBody, V2ErrorBody
from service.settings import Settings

_MEANINGS = {
    400: "Malformed request (headers or body), or an uploaded file refused as unsafe",
    401: "Missing or wrong bearer token",
    404: "No such model, version, dataset or job",
    409: "Conflicts with the current state (exists already, nothing serving, job finished)",
    413: "Request body larger than the limit",
    415: "Content-Type not accepted here",
    422: "Invalid input: the body names every problem (`errors` for field-level ones)",
    500: "A stored file failed its integrity check",
    503: "Overloaded: retry after the `Retry-After` header's seconds",
    507: "The data dir's disk is full; nothing partial was kept",
}
_V2_MEANINGS = {
    **_MEANINGS,
    400: "Bad request: invalid input or path, a malformed body, or the model is not ready "
    "(the protocol answers each with 400)",
}
# The groups of `/docs`, in its order: the v1 API by resource, then the v2 protocol, then the
# probes. Every operation has one of these tags (tests/test_openapi.py), no tag mixes v1 and v2.
TAGS: list[dict[str, str]] = [
    {
        "name": "architectures",
        "description": "v1: the BatchNorm architectures models are built from",
    },
    {"name": "models", "description": "v1: create, list, inspect and delete models"},
    {
        "name": "versions",
        "description": "v1: upload checkpoints as versions, download their weights, promote one",
    },
    {
        "name": "predictions",
        "description": "v1: predict with a model's serving (or a pinned) version",
    },
    {"name": "datasets", "description": "v1: upload and list training datasets"},
    {"name": "jobs", "description": "v1: background training and BN recalibration jobs"},
    {
        "name": "open inference protocol (v2)",
        "description": "v2: the Open Inference Protocol's REST API (Triton, KServe clients)",
    },
    {
        "name": "health",
        "description": "liveness, readiness and Prometheus metrics; no token needed",
    },
]
_REF = "#/components/schemas/{model}"
# Models a route documents by hand, added to the document's components by `install_openapi`.
_COMPONENTS: dict[str, type[BaseModel]] = {}


def is_v2_path(path: str) -> bool:
    """Whether `path` (a request's, or a template) is the Open Inference Protocol's."""
    return path == "/v2" or path.startswith("/v2/")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status answered with the contract's error body."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


def v2_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a `/v2` route: each status answered with the protocol's error body."""
    return {
        status: {"model": V2ErrorBody, "description": _V2_MEANINGS[status]} for status in statuses
    }


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to `model` for `openapi_extra`; the model (and those it nests) become components."""
    _COMPONENTS[model.__name__] = model
    return {"$ref": _REF.format(model=model.__name__)}


def _error_response(status: int, v2: bool) -> dict[str, Any]:
    body = V2ErrorBody if v2 else ErrorBody
    content = {"application/json": {"schema": {"$ref": _REF.format(model=body.__name__)}}}
    return {"description": (_V2_MEANINGS if v2 else _MEANINGS)[status], "content": content}


def _complete(schema: dict[str, Any], settings: Settings) -> None:
    components = schema.setdefault("components", {})
    schemes = components.setdefault("securitySchemes", {})
    schemes.pop(READ_BEARER_SCHEME, None)
    schemas = components.setdefault("schemas", {})
    for body in (ErrorBody, V2ErrorBody):
        schemas.setdefault(body.__name__, body.model_json_schema(ref_template=_REF))
    if _COMPONENTS:
        _, extra = models_json_schema(
            [(model, "validation") for model in _COMPONENTS.values()], ref_template=_REF
        )
        for name, definition in extra.get("$defs", {}).items():
            schemas.setdefault(name, definition)
    guarded = {BEARER_SCHEME, READ_BEARER_SCHEME} if settings.PROTECT_READS else {BEARER_SCHEME}
    for path, path_item in schema.get("paths", {}).items():
        v2 = is_v2_path(path)
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if any(guarded & requirement.keys() for requirement in operation.pop("security", [])):
                operation["security"] = [{BEARER_SCHEME: []}]
                responses["401"] = _error_response(401, v2)
            # Any request can be malformed (headers uvicorn cannot parse, an undecodable body).
            responses.setdefault("400", _error_response(400, v2))
            if "requestBody" in operation:
                responses.setdefault("413", _error_response(413, v2))
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                if v2:  # a request FastAPI refuses is a 400 there
                    del responses["422"]
                    responses.setdefault("400", _error_response(400, v2))
                else:
                    responses["422"] = _error_response(422, v2)
    if "#/components/schemas/HTTPValidationError" not in json.dumps(schema):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Generate the app's document as FastAPI does, then complete it (once per generation)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        cached = app.openapi_schema
        schema = generate()
        if schema is not cached:
            _complete(schema, settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the document lists for a concrete path, for the `Allow` header of a 405.

    Starlette names only the methods of the first route that matched the path, while FastAPI
    makes one route per method (so `GET /v1/models` answered `Allow: POST`).
    """
    methods: set[str] = set()
    for template, path_item in app.openapi().get("paths", {}).items():
        regex, _, _ = compile_path(template)
        if regex.match(path):
            methods.update(method.upper() for method in path_item)
    return sorted(methods)
