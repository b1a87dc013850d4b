"""Receiving a multipart upload into a temp file in the data dir.

Routes parse the form themselves instead of declaring FastAPI `File()` parameters, so that the
body-size 413 and multipart errors reach the client as they are rather than as a generic 400.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile

from service.api.deps import Services
from service.errors import InvalidInput
from service.files import disk_full_as_error


@dataclass
class ReceivedFile:
    path: Path
    filename: str
    form: FormData

    def text(self, field: str) -> str | None:
        value = self.form.get(field)
        return value if isinstance(value, str) else None


def upload_form(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI for a multipart body: a required `file`, optional text `fields` and no others."""
    properties = {"file": {"type": "string", "format": "binary"}, **fields}
    schema = {
        "type": "object",
        "required": ["file"],
        "properties": properties,
        "additionalProperties": False,
    }
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


def _copy(source: IO[bytes], target: Path) -> None:
    """Copy the parsed upload into the data dir; a full disk answers 507 (the caller unlinks)."""
    with disk_full_as_error(target.parent), open(target, "xb") as handle:
        shutil.copyfileobj(source, handle, 1 << 20)


@asynccontextmanager
async def received_file(
    request: Request, services: Services, *, expected: str, fields: Iterable[str] = ()
) -> AsyncIterator[ReceivedFile]:
    """The form's `file` in a temp file (removed afterwards); `expected` says what it should be.

    Text fields other than `fields` are refused, as unknown keys of JSON bodies are: a misspelt
    `promote` must not be ignored.
    """
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                f"multipart form field 'file' is required: {expected}", code="missing_file"
            )
        allowed = ["file", *fields]
        unknown = sorted({key for key in form if key not in allowed})
        if unknown:
            names = ", ".join(repr(key[:64]) for key in unknown[:5])
            raise InvalidInput(
                f"unknown form fields {names}: this form takes {', '.join(allowed)}",
                code="unknown_field",
            )
        folder = services.settings.upload_dir
        with disk_full_as_error(folder):
            folder.mkdir(parents=True, exist_ok=True)
        path = services.owner.temp_path(folder)
        try:
            await services.run_upload(_copy, upload.file, path)
            yield ReceivedFile(path, upload.filename or "", form)
        finally:
            path.unlink(missing_ok=True)
