"""Creating, listing and deleting models."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from models import get_architecture
from service.api.deps import ReadAuth, ServicesDep, WriteAuth
from service.api.openapi import errors
from service.api.schemas import ModelCreate, ModelPublic
from service.architectures import check_architecture
from service.db.tables import ModelRow
from service.registry import parse_config

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(row: ModelRow) -> ModelPublic:
    arch = get_architecture(row.architecture)
    config = arch.parse_config(row.config)
    return ModelPublic.of(row, tuple(config.input_shape()), config.task, config.labels())


def _check_servable(body: ModelCreate) -> None:
    """422 for a config or architecture bnserve could not serve, before the model exists."""
    check_architecture(*parse_config(body.architecture, body.config))


@router.post("", status_code=201, dependencies=[WriteAuth], responses=errors(409, 422))
async def create_model(body: ModelCreate, services: ServicesDep) -> ModelPublic:
    await asyncio.to_thread(_check_servable, body)
    serving = body.serving.model_dump(exclude_none=True) or None
    row = await services.db.run(
        services.registry.create_model,
        body.name,
        body.architecture,
        body.config,
        serving,
        body.preprocess,
    )
    return model_public(row)


@router.get("", dependencies=[ReadAuth])
async def list_models(services: ServicesDep) -> list[ModelPublic]:
    rows = await services.db.run(services.registry.list_models)
    return [model_public(row) for row in rows]


@router.get("/{name}", dependencies=[ReadAuth], responses=errors(404))
async def get_model(name: str, services: ServicesDep) -> ModelPublic:
    return model_public(await services.db.run(services.registry.get_model, name))


@router.delete("/{name}", status_code=204, dependencies=[WriteAuth], responses=errors(404))
async def delete_model(name: str, services: ServicesDep) -> Response:
    """Delete the model, its versions and files; its active jobs end `cancelled`.

    Under the upload lock and the manager's lock, the ones uploads, loads and promotes hold: a
    load in flight finishes first and its handle goes with the rest, so nothing of the deleted
    model stays in memory for a model created again under the same name.
    """
    async with services.upload_lock(name), services.manager.lock(name):
        await services.db.run(services.registry.delete_model, name)
        services.manager.forget(name)
    return Response(status_code=204)
