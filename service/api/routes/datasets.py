"""Uploading and listing training datasets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.api.deps import ReadAuth, ServicesDep, WriteAuth
from service.api.openapi import errors
from service.api.schemas import DatasetPublic
from service.api.uploads import received_file, upload_form

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# The upload form's text fields beside `file`, as documented and as accepted.
FORM: dict[str, dict[str, Any]] = {"name": {"type": "string"}}


@router.post(
    "",
    status_code=201,
    dependencies=[WriteAuth],
    responses=errors(400, 422),
    openapi_extra=upload_form(FORM),
)
async def upload_dataset(request: Request, services: ServicesDep) -> DatasetPublic:
    """Check an `.npz` or `.safetensors` file with arrays `x` and `y`, then keep it."""
    expected = "an .npz (numpy.savez(f, x=x, y=y)) or .safetensors file with tensors x and y"
    async with received_file(request, services, expected=expected, fields=FORM) as received:
        row = await services.run_upload(
            services.datasets.add, received.path, received.filename, received.text("name")
        )
    return DatasetPublic.of(row)


@router.get("", dependencies=[ReadAuth])
async def list_datasets(services: ServicesDep) -> list[DatasetPublic]:
    return [DatasetPublic.of(r) for r in await services.db.run(services.datasets.all)]


@router.get("/{dataset_id}", dependencies=[ReadAuth], responses=errors(404))
async def get_dataset(dataset_id: str, services: ServicesDep) -> DatasetPublic:
    return DatasetPublic.of(await services.db.run(services.datasets.get, dataset_id))
