"""The Open Inference Protocol (v2, KServe/Triton REST) over the same handles and batcher as /v1.

Health, server and model metadata, model readiness and infer, also under
`/v2/models/{name}/versions/{v}/...` (a pinned version, as `?version=N` on /v1). Errors here have
the protocol's form `{"error": ..., "code": ...}`, and bad requests answer 400 where /v1 answers
422 (the protocol's status for a bad request); every other status is /v1's (see
`service.api.errors`), and the document says so (`v2_errors`). Tensors are read and written by
`service.api.v2_codec`; an infer body in the binary tensor extension is documented as binary
(`application/octet-stream`), which is all OpenAPI can say of a JSON header followed by raw bytes.

A `BYTES` input (encoded images, for a model created with `preprocess.image`) is decoded through
the model's pipeline in a thread, as /v1's image bodies are, and its samples join the same
dynamic batches. An image format bnserve does not take is 400 here, not /v1's 415: the request's
own media type is right, one of its tensors is not. Model metadata shows the pipeline in its
`parameters` (the protocol's metadata has no place for it): `preprocess`, and `image_input`, the
BYTES form `input` also takes.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models import get_architecture
from service.api.deps import ReadAuth, Services, ServicesDep
from service.api.openapi import component_ref, v2_errors
from service.api.routes.health import server_readiness
from service.api.v2_codec import (
    INPUT_NAME,
    Decoded,
    InferRequest,
    InferResponse,
    classifications,
    decode_request,
    decompress,
    encode_response,
)
from service.errors import BNServeError, InvalidInput, NotFound, UnsupportedMediaType
from service.preprocess.decode import decode_images
from service.registry import MAX_VERSION
from service.serving.loaded import LoadedModel
from service.serving.manager import response_too_large

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

# Bodies and outputs above this are decoded/encoded in a worker thread; below it the thread hop
# costs more than the work, so it runs on the event loop.
OFFLOAD_BYTES = 64 * 1024

# At most SQLite's largest integer: a larger one was a 500 (OverflowError) in the registry.
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="a stored version number")]

_BINARY = {"type": "string", "format": "binary"}
_BYTE_COUNT = {"type": "integer", "minimum": 0}
# The infer body is read by `_infer` itself (no pydantic body parameter), so it is documented here.
_INFER_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": _BYTE_COUNT,
            "description": "binary tensor extension: the length of the JSON header that the "
            "raw input tensors follow",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": component_ref(InferRequest)},
            "application/octet-stream": {
                "schema": _BINARY,
                "description": "binary tensor extension: the JSON request "
                "(Inference-Header-Content-Length bytes), then each input's raw little-endian "
                "bytes (its parameters.binary_data_size); a BYTES input's elements (encoded "
                "images) each as a 4-byte little-endian length, then that many bytes",
            },
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs: JSON, or with binary outputs a JSON header and raw tensors",
        "content": {"application/octet-stream": {"schema": _BINARY}},
        "headers": {
            "X-Model-Version": {"schema": {"type": "integer"}},
            "Inference-Header-Content-Length": {
                "schema": _BYTE_COUNT,
                "description": "with binary outputs: the length of the JSON header",
            },
        },
    },
    **v2_errors(400, 404, 409, 413, 503),
}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerReadiness(BaseModel):
    ready: bool
    models: dict[str, dict[str, Any]]


class ModelReadiness(BaseModel):
    name: str
    version: str
    ready: bool


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="only for a model created with preprocess.image: `preprocess` (its "
        "pipeline, as in the model's JSON) and `image_input`, the BYTES form `input` also takes "
        "(N encoded images)",
    )


def output_names(is_classifier: bool) -> list[str]:
    """`output` (the raw outputs) and, for classifiers, their softmax `probabilities`."""
    return ["output", "probabilities"] if is_classifier else ["output"]


@router.get("", dependencies=[ReadAuth])
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(
        name="bnserve",
        version=request.app.version,
        extensions=["binary_tensor_data", "classification"],
    )


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """Like /healthz: answers while the process runs (no token, as a probe)."""
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=ServerReadiness,
    responses={400: {"model": ServerReadiness, "description": "not ready"}},
)
async def ready(services: ServicesDep, request: Request) -> JSONResponse:
    """Like /readyz, but 400 when not ready: the protocol's (and Triton's) status for false."""
    report = await server_readiness(services, request)
    ok = report.status == "ready"
    return JSONResponse({"ready": ok, "models": report.models}, status_code=200 if ok else 400)


async def _metadata(services: Services, name: str, version: int | None) -> ModelMetadata:
    row = await services.db.run(services.registry.get_model, name)
    if version is not None:
        await services.db.run(services.registry.get_version, name, version)  # 404 if absent
        versions = [str(version)]
    else:
        versions = [str(v.version) for v in row.versions]
    config = get_architecture(row.architecture).parse_config(row.config)
    outputs = [
        TensorMetadata(name=n, datatype="FP32", shape=[-1, config.num_outputs()])
        for n in output_names(config.task == "classification")
    ]
    parameters = None
    if row.preprocess:
        image_input = TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])
        parameters = {"preprocess": row.preprocess, "image_input": image_input.model_dump()}
    return ModelMetadata(
        name=row.name,
        versions=versions,
        platform="pytorch",
        inputs=[
            TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, *config.input_shape()])
        ],
        outputs=outputs,
        parameters=parameters,
    )


def _metadata_response(meta: ModelMetadata) -> JSONResponse:
    """The metadata, `parameters` left out for a tensor model (not null: clients read keys)."""
    return JSONResponse(meta.model_dump(exclude_none=meta.parameters is None))


@router.get(
    "/models/{name}",
    dependencies=[ReadAuth],
    response_model=ModelMetadata,
    responses=v2_errors(404),
)
async def model_metadata(name: str, services: ServicesDep) -> JSONResponse:
    """Inputs and outputs of the model; `versions` lists every stored version."""
    return _metadata_response(await _metadata(services, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    dependencies=[ReadAuth],
    response_model=ModelMetadata,
    responses=v2_errors(404),
)
async def model_version_metadata(
    name: str, version: VersionPath, services: ServicesDep
) -> JSONResponse:
    return _metadata_response(await _metadata(services, name, version))


async def _model_ready(services: Services, name: str, version: int | None) -> ModelReadiness:
    """Ready when an infer would be answered now: the serving (or pinned) version is loaded,
    loading it first if this process does not hold it yet, exactly as infer would."""
    try:
        handle = await services.manager.handle_for(name, version)
    except NotFound:
        raise
    except BNServeError as exc:
        # The base error answers 400: the protocol's "not ready".
        raise BNServeError(f"model {name!r} is not ready: {exc.detail}", code=exc.code) from None
    return ModelReadiness(name=name, version=str(handle.version), ready=True)


@router.get("/models/{name}/ready", dependencies=[ReadAuth], responses=v2_errors(400, 404))
async def model_ready(name: str, services: ServicesDep) -> ModelReadiness:
    return await _model_ready(services, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    dependencies=[ReadAuth],
    responses=v2_errors(400, 404),
)
async def model_version_ready(
    name: str, version: VersionPath, services: ServicesDep
) -> ModelReadiness:
    return await _model_ready(services, name, version)


def _decode(body: bytes, request: Request, loaded: LoadedModel, services: Services) -> Decoded:
    settings = services.settings
    body = decompress(body, request.headers.get("content-encoding"), settings.MAX_UPLOAD_BYTES)
    return decode_request(
        body,
        request.headers.get("inference-header-content-length"),
        input_shape=loaded.input_shape,
        output_names=output_names(loaded.is_classifier),
        max_batch=settings.MAX_REQUEST_BATCH,
        model=loaded.name,
        takes_images=loaded.image_pipeline is not None,
    )


def _decode_images(images: list[bytes], loaded: LoadedModel, services: Services) -> torch.Tensor:
    """The batch of a BYTES input through the model's pipeline (blocking: call from a thread)."""
    assert loaded.image_pipeline is not None  # decode_request refused BYTES otherwise
    try:
        return decode_images(
            images,
            loaded.image_pipeline,
            loaded.input_shape,
            max_pixels=services.settings.MAX_IMAGE_PIXELS,
        )
    except UnsupportedMediaType as exc:  # the body's media type is fine; an image in it is not
        raise InvalidInput(exc.detail, code=exc.code) from None


def _encode(
    loaded: LoadedModel,
    decoded: Decoded,
    out: torch.Tensor,
    probs: torch.Tensor | None,
    large: bool,
) -> tuple[bytes, int | None]:
    tensors = []
    for output in decoded.outputs:
        value = probs if output.name == "probabilities" and probs is not None else out
        array = value.numpy()
        if output.classes is not None:
            array = classifications(array, output.classes, loaded.labels)
        tensors.append((output.name, array, output.binary))
    return encode_response(
        model_name=loaded.name,
        model_version=loaded.version,
        request_id=decoded.id,
        tensors=tensors,
        in_blocks=large,
    )


async def _infer(request: Request, services: Services, name: str, version: int | None) -> Response:
    started = time.perf_counter()
    handle = await services.manager.handle_for(name, version)
    loaded = handle.loaded
    settings = services.settings
    metrics = services.metrics
    outcome = "error"
    x: torch.Tensor | None = None
    try:
        body = await request.body()
        decode = partial(_decode, body, request, loaded, services)
        decoded = decode() if len(body) <= OFFLOAD_BYTES else await asyncio.to_thread(decode)
        n = int(decoded.x.shape[0]) if decoded.x is not None else len(decoded.images)
        per_sample = loaded.config.num_outputs() * len(decoded.outputs)
        if n * per_sample > settings.MAX_RESPONSE_VALUES:
            raise response_too_large(n, per_sample, settings.MAX_RESPONSE_VALUES)
        x = decoded.x
        if x is None:
            x = await asyncio.to_thread(_decode_images, decoded.images, loaded, services)
        out, probs = await handle.predict(x, settings.PREDICT_TIMEOUT_S)
        large = out.numel() * 4 * len(decoded.outputs) > OFFLOAD_BYTES
        encode = partial(_encode, loaded, decoded, out, probs, large)
        content, header_length = await asyncio.to_thread(encode) if large else encode()
        outcome = "ok"
    except BNServeError as exc:
        outcome = exc.code
        raise
    finally:
        n = int(x.shape[0]) if outcome == "ok" and x is not None else 0
        metrics.prediction_done(name, loaded.version, outcome, time.perf_counter() - started, n)
    headers = {"X-Model-Version": str(loaded.version)}
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


@router.post(
    "/models/{name}/infer",
    dependencies=[ReadAuth],
    response_model=InferResponse,
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
async def infer(request: Request, name: str, services: ServicesDep) -> Response:
    """Outputs of the serving version for the request's `input` batch (JSON or binary)."""
    return await _infer(request, services, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[ReadAuth],
    response_model=InferResponse,
    openapi_extra=_INFER_DOC,
    responses=_INFER_RESPONSES,
)
async def infer_version(
    request: Request, name: str, version: VersionPath, services: ServicesDep
) -> Response:
    """Outputs of a pinned version (loaded on demand, as `?version=N` on /v1)."""
    return await _infer(request, services, name, version)
