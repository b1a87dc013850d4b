"""Uploading checkpoints as versions, reading them back, and promoting (or rolling back)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam

from service.api.deps import ReadAuth, ServicesDep, WriteAuth
from service.api.schemas import PromoteResult, VersionPublic
from service.api.uploads import received_file, upload_form
from service.errors import BNServeError, InvalidInput
from service.publishing import prepare_upload, publish
from service.serving.optimize import OptimizeOptions

router = APIRouter(prefix="/v1/models/{name}/versions", tags=["versions"])

VersionNumber = Annotated[int, PathParam(ge=1)]


def _parse_bool(value: str | None, field: str, default: bool) -> bool:
    if value is None:
        return default
    text = value.strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise InvalidInput(f"form field {field!r} must be true or false, got {value!r}")


@router.post(
    "",
    status_code=201,
    dependencies=[WriteAuth],
    openapi_extra=upload_form(
        promote={"type": "boolean", "default": True}, note={"type": "string"}
    ),
)
async def upload_version(name: str, request: Request, services: ServicesDep) -> VersionPublic:
    """Check a state_dict upload, store it as the next version and (by default) serve it."""
    registry = services.registry
    model = await asyncio.to_thread(registry.get_model, name)
    expected = (
        "the state_dict saved with torch.save(model.state_dict(), path) (.pt/.pth) "
        "or a .safetensors file"
    )
    outcome = "error"
    try:
        async with received_file(request, services, expected=expected) as received:
            promote = _parse_bool(received.text("promote"), "promote", default=True)
            async with services.upload_lock(name):
                prepared = await asyncio.to_thread(
                    prepare_upload,
                    model,
                    received.path,
                    received.filename,
                    services.device,
                    OptimizeOptions.from_settings(services.settings),
                )
                row = await asyncio.to_thread(
                    publish, registry, prepared, source="upload", note=received.text("note")
                )
                serving = model.serving_version
                # Still under the upload lock, so concurrent uploads are promoted in the order
                # of their version numbers and the newest one ends up serving.
                if promote:
                    await services.manager.install(prepared.loaded)
                    serving = row.version
        outcome = "ok"
    except BNServeError as exc:
        outcome = exc.code
        raise
    finally:
        services.metrics.uploads.labels(outcome).inc()
    return VersionPublic.of(row, serving, services.manager.loaded_report(name, row.version))


@router.get("", dependencies=[ReadAuth])
async def list_versions(name: str, services: ServicesDep) -> list[VersionPublic]:
    model = await asyncio.to_thread(services.registry.get_model, name)
    report = services.manager.loaded_report
    return [
        VersionPublic.of(v, model.serving_version, report(name, v.version)) for v in model.versions
    ]


@router.get("/{version}", dependencies=[ReadAuth])
async def get_version(name: str, version: VersionNumber, services: ServicesDep) -> VersionPublic:
    model = await asyncio.to_thread(services.registry.get_model, name)
    row = await asyncio.to_thread(services.registry.get_version, name, version)
    optimizations = services.manager.loaded_report(name, version)
    return VersionPublic.of(row, model.serving_version, optimizations)


@router.get(
    "/{version}/weights",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def get_weights(name: str, version: VersionNumber, services: ServicesDep) -> Response:
    """The stored tensors as safetensors bytes, verified against the recorded sha256."""
    _, row, data = await asyncio.to_thread(services.registry.read_checkpoint, name, version)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"',
            "X-Checkpoint-SHA256": row.sha256,
        },
    )


@router.post("/{version}/promote", dependencies=[WriteAuth])
async def promote_version(
    name: str, version: VersionNumber, services: ServicesDep
) -> PromoteResult:
    """Serve `version` from now on (also how to roll back); it is loaded and gated first."""
    model = await asyncio.to_thread(services.registry.get_model, name)
    await services.manager.promote(name, version)
    return PromoteResult(
        model=name, serving_version=version, previous_version=model.serving_version
    )
