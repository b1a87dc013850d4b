"""Uploading checkpoints as versions, reading them back, and promoting (or rolling back)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from service.api.deps import ReadAuth, ServicesDep, WriteAuth
from service.api.openapi import errors
from service.api.schemas import PromoteResult, VersionPublic
from service.api.uploads import received_file, upload_form
from service.architectures import check_model
from service.errors import BNServeError, InvalidInput
from service.publishing import prepare_upload, publish
from service.registry import MAX_VERSION
from service.serving.optimize import OptimizeOptions

router = APIRouter(prefix="/v1/models/{name}/versions", tags=["versions"])

# The upload form's text fields beside `file`, as documented and as accepted.
FORM: dict[str, dict[str, Any]] = {
    "promote": {"type": "boolean", "default": True},
    "note": {"type": "string"},
}
# At most SQLite's largest integer: a larger one was a 500 (OverflowError) in the registry.
VersionNumber = Annotated[int, PathParam(ge=1, le=MAX_VERSION)]
# Small enough that many downloads at once hold little, large enough that threads hop rarely.
_CHUNK_BYTES = 256 * 1024


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
    responses=errors(400, 404, 422),
    openapi_extra=upload_form(FORM),
)
async def upload_version(name: str, request: Request, services: ServicesDep) -> VersionPublic:
    """Check a state_dict upload, store it as the next version and (by default) serve it."""
    registry = services.registry
    model = await services.db.run(registry.get_model, name)
    # Before the body is read: a model created before this check, or whose plugin changed since.
    await services.db.run(check_model, model)
    expected = (
        "the state_dict saved with torch.save(model.state_dict(), path) (.pt/.pth) "
        "or a .safetensors file"
    )
    outcome = "error"
    try:
        async with received_file(request, services, expected=expected, fields=FORM) as received:
            promote = _parse_bool(received.text("promote"), "promote", default=True)
            async with services.upload_lock(name):
                # The body streamed for a while: the name may be another model by now, with
                # another architecture (the store refuses it too, but before any work here).
                await asyncio.to_thread(registry.check_identity, name, model.id, "upload")
                prepared = await services.run_upload(
                    prepare_upload,
                    model,
                    received.path,
                    received.filename,
                    services.device,
                    OptimizeOptions.from_settings(services.settings),
                    max_bytes=services.settings.MAX_UPLOAD_BYTES,
                )
                row = await services.run_upload(
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
    manager = services.manager
    return VersionPublic.of(
        row,
        serving,
        manager.loaded_report(name, row.version),
        manager.drift_report(name, row.version),
    )


@router.get("", dependencies=[ReadAuth], responses=errors(404))
async def list_versions(name: str, services: ServicesDep) -> list[VersionPublic]:
    model = await services.db.run(services.registry.get_model, name)
    manager = services.manager
    return [
        VersionPublic.of(
            v,
            model.serving_version,
            manager.loaded_report(name, v.version),
            manager.drift_report(name, v.version),
        )
        for v in model.versions
    ]


@router.get("/{version}", dependencies=[ReadAuth], responses=errors(404))
async def get_version(name: str, version: VersionNumber, services: ServicesDep) -> VersionPublic:
    model = await services.db.run(services.registry.get_model, name)
    row = await services.db.run(services.registry.get_version, name, version)
    manager = services.manager
    return VersionPublic.of(
        row,
        model.serving_version,
        manager.loaded_report(name, version),
        manager.drift_report(name, version),
    )


@router.get(
    "/{version}/weights",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(404, 500)},
)
async def get_weights(name: str, version: VersionNumber, services: ServicesDep) -> Response:
    """The stored tensors as safetensors bytes, verified against the recorded sha256.

    Streamed in chunks read in a thread: read whole, 30 concurrent downloads of a 51 MB version
    once added 1.4 GB to the process.
    """
    registry = services.registry
    model = await services.db.run(registry.get_model, name)
    row = await services.db.run(registry.get_version, name, version)
    # Hashing the file is no database work: it stays off the database threads.
    handle = await asyncio.to_thread(
        registry.store.open_verified, model.id, row.filename, row.sha256
    )
    size = os.fstat(handle.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(handle.read, _CHUNK_BYTES):
                yield chunk
        finally:
            handle.close()

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"',
            "Content-Length": str(size),
            "X-Checkpoint-SHA256": row.sha256,
        },
    )


@router.post("/{version}/promote", dependencies=[WriteAuth], responses=errors(404, 422, 500))
async def promote_version(
    name: str, version: VersionNumber, services: ServicesDep
) -> PromoteResult:
    """Serve `version` from now on (also how to roll back); it is loaded and gated first."""
    model = await services.db.run(services.registry.get_model, name)
    await services.manager.promote(name, version)
    return PromoteResult(
        model=name, serving_version=version, previous_version=model.serving_version
    )
