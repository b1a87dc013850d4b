"""Predictions: one sample or a batch, gathered with concurrent requests into one forward pass."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Response

from service.api.deps import ReadAuth, ServicesDep
from service.api.openapi import errors
from service.api.schemas import PredictRequest, PredictResponse
from service.errors import BNServeError, Overloaded
from service.serving.inputs import parse_inputs
from service.serving.loaded import LoadedModel

router = APIRouter(prefix="/v1/models/{name}", tags=["predictions"], dependencies=[ReadAuth])


def _format(loaded: LoadedModel, out: torch.Tensor) -> PredictResponse:
    response = PredictResponse(model=loaded.name, version=loaded.version, outputs=out.tolist())
    if loaded.is_classifier:
        probabilities = torch.softmax(out, dim=1)
        predictions = probabilities.argmax(dim=1).tolist()
        response.predictions = predictions
        response.probabilities = probabilities.tolist()
        if loaded.labels is not None:
            response.labels = [loaded.labels[i] for i in predictions]
    return response


@router.post("/predict", responses=errors(404, 409, 422, 503))
async def predict(
    name: str,
    body: PredictRequest,
    response: Response,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> PredictResponse:
    """Outputs of the serving version (or `?version=N`), one row per sample."""
    started = time.perf_counter()
    handle = await services.manager.handle_for(name, version)
    loaded = handle.loaded
    metrics = services.metrics
    outcome = "error"
    try:
        x, _ = await asyncio.to_thread(
            parse_inputs, body.inputs, loaded.input_shape, services.settings.MAX_REQUEST_BATCH
        )
        try:
            out = await asyncio.wait_for(
                handle.batcher.submit(x), services.settings.PREDICT_TIMEOUT_S
            )
        except TimeoutError:
            raise Overloaded(
                f"prediction took longer than {services.settings.PREDICT_TIMEOUT_S} s "
                "(BNSERVE_PREDICT_TIMEOUT_S)",
                code="timeout",
                retry_after=1.0,
            ) from None
        result = await asyncio.to_thread(_format, loaded, out)
        outcome = "ok"
    except BNServeError as exc:
        outcome = exc.code
        raise
    finally:
        metrics.predictions.labels(name, str(loaded.version), outcome).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
    metrics.samples.labels(name).inc(x.shape[0])
    response.headers["X-Model-Version"] = str(loaded.version)
    return result
