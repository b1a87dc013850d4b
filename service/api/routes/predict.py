"""Predictions: one sample or a batch, gathered with concurrent requests into one forward pass.

This is the hot path, and it is written for it (issue #8, measured with `bench/serving.py`):
the body is read and decoded here rather than through a pydantic body model, small bodies are
parsed on the event loop (a thread hop costs more than parsing a few KB with orjson), large ones
in a thread, and the answer is serialized by orjson straight from NumPy arrays. Its only
dependencies are async, so FastAPI runs none of them on its thread pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import orjson
import torch
from fastapi import APIRouter, Query, Request, Response

from service.api.deps import ReadAuth, Services, ServicesDep
from service.api.encoding import json_array
from service.api.json_arrays import numeric_inputs
from service.api.openapi import errors
from service.api.schemas import PredictRequest, PredictResponse
from service.errors import (
    BNServeError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.preprocess.decode import MEDIA_TYPES, decode_images, image_parts
from service.registry import MAX_VERSION
from service.serving.inputs import (
    decode_npy,
    decode_raw_float32,
    parse_inputs,
    parse_shape_header,
)
from service.serving.loaded import LoadedModel
from service.settings import Settings

router = APIRouter(prefix="/v1/models/{name}", tags=["predictions"], dependencies=[ReadAuth])

# Bodies and answers up to this size are handled on the event loop: orjson parses 64 KiB in
# ~0.1 ms, less than the ~0.1-0.2 ms a round trip through a thread costs. Larger ones go to a
# thread, so one big request cannot stall every other connection.
INLINE_BYTES = 64 * 1024
# From this body size `json_arrays` decodes faster than orjson + NumPy (measured: 4 us against
# 1 us for a 2-value body, 91 against 207 us for 3x32x32).
NUMPY_JSON_BYTES = 2048
INLINE_OUTPUT_VALUES = 4096
MAX_TOP_K = 1000

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PredictRequest.model_json_schema()},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "little-endian float32, batch shape in the X-Shape header",
            },
            **{
                media: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "one image, for a model created with preprocess.image",
                }
                for media in sorted(MEDIA_TYPES)
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "additionalProperties": {"type": "string", "format": "binary"},
                },
                "description": "a batch of images, one part each, answered in order",
            },
        },
    }
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` before reading it (or as soon as it passes it)."""
    length = request.headers.get("content-length")
    message = (
        f"prediction body is larger than the limit of {limit} bytes "
        "(BNSERVE_MAX_PREDICT_BODY_BYTES); split the batch, or send it as binary float32"
    )
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(message, limit=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(message, limit=limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _json_inputs(body: bytes) -> Any:
    """The `inputs` value of a JSON body; 422 `validation_error` as FastAPI would give.

    A body of an image's size or more that is exactly `{"inputs": <numbers>}` becomes an array
    without a Python float per value (`json_arrays`: 2.3x faster for a 3x32x32 sample); below
    that size orjson is the faster of the two, and any other body is parsed here as before.
    """
    if len(body) >= NUMPY_JSON_BYTES:
        array = numeric_inputs(body)
        if array is not None:
            return array
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # NaN and Infinity are not JSON, but Python clients send them: name them instead
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(
                f"invalid request: body: JSON decode error ({exc})",
                code="validation_error",
                errors=[{"field": "", "message": f"JSON decode error: {exc}", "type": "json"}],
            ) from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise InvalidInput(
            'invalid request: inputs: Field required (send {"inputs": [...]})',
            code="validation_error",
            errors=[{"field": "inputs", "message": "Field required", "type": "missing"}],
        )
    extra = sorted(set(document) - {"inputs"})
    if extra:
        raise InvalidInput(
            f"invalid request: {extra[0][:64]}: Extra inputs are not permitted",
            code="validation_error",
            errors=[
                {"field": k[:64], "message": "Extra inputs are not permitted", "type": "extra"}
                for k in extra[:5]
            ],
        )
    return document["inputs"]


def _decode(
    kind: str, body: bytes, inputs: Any, shape_header: str | None, loaded: LoadedModel, limit: int
) -> torch.Tensor:
    """The request's batch as a float32 tensor (blocking for large bodies: call from a thread)."""
    shape = loaded.input_shape
    if kind == "json":
        return parse_inputs(inputs, shape, limit)[0]
    if kind == "npy":
        return decode_npy(body, shape, limit)[0]
    return decode_raw_float32(body, parse_shape_header(shape_header, shape), shape, limit)[0]


def _decode_images(
    kind: str, body: bytes, content_type: str, loaded: LoadedModel, settings: Settings
) -> torch.Tensor:
    """The batch of an image or multipart body through the model's own pipeline (blocking)."""
    if loaded.image_pipeline is None:
        raise UnsupportedMediaType(
            f"model {loaded.name!r} takes tensors, not images: send JSON, .npy or float32, or "
            "create a model with preprocess.image",
            code="images_not_accepted",
        )
    limit = settings.MAX_REQUEST_BATCH
    blobs = [body] if kind == "image" else image_parts(body, content_type, limit)
    return decode_images(
        blobs, loaded.image_pipeline, loaded.input_shape, max_pixels=settings.MAX_IMAGE_PIXELS
    )


IMAGE_KINDS = ("image", "multipart")


def _media_kind(content_type: str | None) -> str:
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media in ("application/json", ""):
        return "json"
    if media == "application/x-npy":
        return "npy"
    if media == "application/octet-stream":
        return "raw"
    if media in MEDIA_TYPES:
        return "image"
    if media == "multipart/form-data":
        return "multipart"
    raise UnsupportedMediaType(
        f"Content-Type {media[:64]!r} is not accepted for predictions: send application/json "
        '({"inputs": [...]}), application/x-npy, application/octet-stream (float32) with '
        "X-Shape, or for an image model image/png, image/jpeg, image/webp or multipart/form-data",
    )


def encode_answer(
    loaded: LoadedModel,
    out: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: int | None = None,
    large: bool = False,
) -> bytes:
    """The JSON answer, from the output tensors without a detour through Python lists; a
    `large` one (encoded in a thread) in blocks, so it never holds the GIL for long."""
    outputs: Any = out.numpy()
    answer: dict[str, Any] = {
        "model": loaded.name,
        "version": loaded.version,
        "outputs": json_array(outputs) if large else outputs,
    }
    if probs is not None:
        probabilities = probs.numpy()
        predictions = probabilities.argmax(axis=1)
        answer["predictions"] = predictions
        answer["probabilities"] = json_array(probabilities) if large else probabilities
        if loaded.labels is not None:
            answer["labels"] = [loaded.labels[i] for i in predictions.tolist()]
        else:
            answer["labels"] = None
        if top_k is not None:
            answer["top_k"] = _top_k(probabilities, top_k, loaded.labels)
    else:
        answer.update(predictions=None, probabilities=None, labels=None)
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=_BODY_DOC,
    responses={
        200: {"headers": {"X-Model-Version": {"schema": {"type": "integer"}}}},
        **errors(404, 409, 413, 415, 422, 503),
    },
)
async def predict(
    name: str,
    request: Request,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    top_k: Annotated[int | None, Query(ge=1, le=MAX_TOP_K)] = None,
) -> Response:
    """Outputs of the serving version (or `?version=N`), one row per sample.

    In a running server `service/api/fastpath.py` answers this route before FastAPI's router
    sees it, with the same `answer` below; this declaration documents it and serves any app
    built without the fast path.
    """
    return await answer(request, services, name, version, top_k)


async def answer(
    request: Request,
    services: Services,
    name: str,
    version: int | None,
    top_k: int | None = None,
) -> Response:
    """The prediction for one request: read, decode, batch, forward, encode."""
    started = time.perf_counter()
    settings = services.settings
    content_type = request.headers.get("content-type")
    kind = _media_kind(content_type)
    body = await read_body(request, settings.MAX_PREDICT_BODY_BYTES)
    large = len(body) > INLINE_BYTES
    inputs = None
    if kind == "json":  # syntax first, so a malformed body is a 422 whatever the model's state
        inputs = await asyncio.to_thread(_json_inputs, body) if large else _json_inputs(body)
    handle = await services.manager.handle_for(name, version)
    loaded = handle.loaded
    metrics = services.metrics
    outcome = "error"
    x: torch.Tensor | None = None
    try:
        if top_k is not None and not loaded.is_classifier:
            raise InvalidInput(
                f"top_k needs a classifier; model {name!r} is a {loaded.task} model",
                code="not_a_classifier",
            )
        limit = settings.MAX_REQUEST_BATCH
        if kind in IMAGE_KINDS:
            x = await asyncio.to_thread(
                _decode_images, kind, body, content_type or "", loaded, settings
            )
        else:
            args = (kind, body, inputs, request.headers.get("x-shape"), loaded)
            x = await _decode_async(*args, limit) if large else _decode(*args, limit)
        if x.shape[0] > handle.max_rows:  # the answer's size, known before the forward
            raise handle.too_large(int(x.shape[0]), settings.MAX_RESPONSE_VALUES)
        out, probs = await handle.predict(x, settings.PREDICT_TIMEOUT_S)
        if out.numel() * (1 if probs is None else 2) > INLINE_OUTPUT_VALUES:
            payload = await asyncio.to_thread(encode_answer, loaded, out, probs, top_k, True)
        else:
            payload = encode_answer(loaded, out, probs, top_k)
        outcome = "ok"
    except BNServeError as exc:
        outcome = exc.code
        raise
    finally:
        n = int(x.shape[0]) if outcome == "ok" and x is not None else 0
        metrics.prediction_done(name, loaded.version, outcome, time.perf_counter() - started, n)
    return Response(
        payload,
        media_type="application/json",
        headers={"X-Model-Version": str(loaded.version)},
    )


async def _decode_async(
    kind: str, body: bytes, inputs: Any, shape_header: str | None, loaded: LoadedModel, limit: int
) -> torch.Tensor:
    return await asyncio.to_thread(_decode, kind, body, inputs, shape_header, loaded, limit)


def _top_k(probabilities: Any, k: int, labels: list[str] | None) -> list[list[dict[str, Any]]]:
    """Per sample, the `k` most probable classes, best first (ties: the lower index first)."""
    k = min(k, probabilities.shape[1])
    best = (-probabilities).argsort(axis=1, kind="stable")[:, :k]
    return [
        [
            {
                "index": int(i),
                "label": labels[i] if labels is not None else None,
                "probability": row[i],  # float32, written as the probabilities are
            }
            for i in order.tolist()
        ]
        for row, order in zip(probabilities, best, strict=True)
    ]
