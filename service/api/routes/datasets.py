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
    responses=errors(400, 413, 422),
    openapi_extra=upload_form(FORM),
)
async def upload_dataset(request: Request, services: ServicesDep) -> DatasetPublic:
    """Check an `.npz` or `.safetensors` file with arrays `x` and `y`, or a `.zip` or `.tar` of
    images in class folders (`circle/001.png`), then keep it.

    An image archive is an image dataset: classes are its folder names, sorted (label i is
    `classes[i]`, as torchvision's `ImageFolder`), and the answer lists them in `classes`. Every
    image is decoded under the serving limits, and every file that cannot be used is named in
    one 422 (`invalid_dataset`, with `files`); unsafe entries (`../x.png`, absolute names, links
    and devices) are `unsafe_archive`; an archive that declares more than the dataset limit, or
    more entries than BNSERVE_MAX_DATASET_FILES, is 413 before anything is read. Nothing is
    stored when refused.
    """
    expected = (
        "an .npz (numpy.savez(f, x=x, y=y)) or .safetensors file with tensors x and y, or a "
        ".zip or .tar of images in class folders"
    )
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
