"""Every endpoint of the contract as a `Call`: what to send and how to read the answer.

Written once here and sent by both `Client` (sync) and `AsyncClient`, so the two cannot drift.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Generic, TypeVar, cast

import httpx
from pydantic import TypeAdapter

from service.api.schemas import (
    ArchitecturePublic,
    DatasetPublic,
    Health,
    JobPublic,
    JobSummary,
    ModelPublic,
    PredictResponse,
    PromoteResult,
    Readiness,
    VersionPublic,
)
from service.client.errors import APIError

T = TypeVar("T")

# A path to a file, its bytes, or a binary file object open for reading.
Upload = str | os.PathLike[str] | bytes | BinaryIO
# Called with (bytes sent, total bytes) as an upload's body goes out.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    files: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    # Error statuses that still carry the answer (503 from /readyz is a readiness report).
    accept: tuple[int, ...] = ()
    # Files this call opened, closed once it is sent.
    opened: list[IO[bytes]] = field(default_factory=list)

    def request_args(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "json": self.json,
            "content": self.content,
            "headers": self.headers,
            "files": self.files,
            "data": self.data,
        }

    def result(self, response: httpx.Response) -> T:
        if response.is_error and response.status_code not in self.accept:
            raise APIError.of(response)
        return self.parse(response)


def _one(model: type[T]) -> Callable[[httpx.Response], T]:
    adapter = TypeAdapter(model)
    return lambda r: adapter.validate_json(r.content)


def _many(model: type[T]) -> Callable[[httpx.Response], list[T]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda r: cast(list[T], adapter.validate_json(r.content))


def _none(_response: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _text(response: httpx.Response) -> str:
    return response.text


class _Counted:
    """A file whose reads report progress (httpx reads multipart files in 64 KiB chunks)."""

    def __init__(self, file: IO[bytes], total: int, on_progress: ProgressCallback) -> None:
        self._file = file
        self._total = total
        self._on_progress = on_progress
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._sent += len(chunk)
        self._on_progress(self._sent, self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._file.seek(offset, whence)
        self._sent = position
        return position

    def tell(self) -> int:
        return self._file.tell()


def _file_part(
    upload: Upload, filename: str | None, on_progress: ProgressCallback | None
) -> tuple[tuple[str, IO[bytes]], list[IO[bytes]]]:
    """The multipart `file` part and the files opened for it."""
    opened: list[IO[bytes]] = []
    if isinstance(upload, bytes):
        file: IO[bytes] = io.BytesIO(upload)
        name = filename or "upload"
    elif isinstance(upload, str | os.PathLike):
        path = Path(upload)
        file = path.open("rb")
        opened.append(file)
        name = filename or path.name
    else:
        file = upload
        name = filename or Path(str(getattr(upload, "name", "upload"))).name
    if on_progress is not None:
        start = file.tell()
        total = file.seek(0, os.SEEK_END) - start
        file.seek(start)
        file = cast(IO[bytes], _Counted(file, total, on_progress))
    return (name, file), opened


def health() -> Call[Health]:
    return Call("GET", "/healthz", _one(Health))


def ready() -> Call[Readiness]:
    return Call("GET", "/readyz", _one(Readiness), accept=(503,))


def metrics() -> Call[str]:
    return Call("GET", "/metrics", _text)


def architectures() -> Call[list[ArchitecturePublic]]:
    return Call("GET", "/v1/architectures", _many(ArchitecturePublic))


def models() -> Call[list[ModelPublic]]:
    return Call("GET", "/v1/models", _many(ModelPublic))


def model(name: str) -> Call[ModelPublic]:
    return Call("GET", f"/v1/models/{name}", _one(ModelPublic))


def create_model(
    name: str,
    architecture: str,
    config: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> Call[ModelPublic]:
    body: dict[str, Any] = {"name": name, "architecture": architecture, "config": config or {}}
    if serving is not None:
        body["serving"] = serving
    return Call("POST", "/v1/models", _one(ModelPublic), json=body)


def delete_model(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/models/{name}", _none)


def versions(name: str) -> Call[list[VersionPublic]]:
    return Call("GET", f"/v1/models/{name}/versions", _many(VersionPublic))


def version(name: str, number: int) -> Call[VersionPublic]:
    return Call("GET", f"/v1/models/{name}/versions/{number}", _one(VersionPublic))


def upload_version(
    name: str,
    upload: Upload,
    *,
    promote: bool = True,
    note: str | None = None,
    filename: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> Call[VersionPublic]:
    part, opened = _file_part(upload, filename, on_progress)
    form = {"promote": "true" if promote else "false"}
    if note is not None:
        form["note"] = note
    return Call(
        "POST",
        f"/v1/models/{name}/versions",
        _one(VersionPublic),
        files={"file": part},
        data=form,
        opened=opened,
    )


def weights(name: str, number: int) -> Call[bytes]:
    return Call("GET", f"/v1/models/{name}/versions/{number}/weights", _bytes)


def promote(name: str, number: int) -> Call[PromoteResult]:
    return Call("POST", f"/v1/models/{name}/versions/{number}/promote", _one(PromoteResult))


def predict(name: str, inputs: Any, *, version: int | None = None) -> Call[PredictResponse]:
    """A NumPy array goes as a `.npy` body (no Python lists on either side), the rest as JSON."""
    import numpy as np

    params = {"version": version} if version is not None else None
    path = f"/v1/models/{name}/predict"
    if isinstance(inputs, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, inputs, allow_pickle=False)
        return Call(
            "POST",
            path,
            _one(PredictResponse),
            params=params,
            content=buffer.getvalue(),
            headers={"Content-Type": "application/x-npy"},
        )
    return Call("POST", path, _one(PredictResponse), params=params, json={"inputs": inputs})


def datasets() -> Call[list[DatasetPublic]]:
    return Call("GET", "/v1/datasets", _many(DatasetPublic))


def dataset(dataset_id: str) -> Call[DatasetPublic]:
    return Call("GET", f"/v1/datasets/{dataset_id}", _one(DatasetPublic))


def upload_dataset(
    upload: Upload,
    *,
    name: str | None = None,
    filename: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> Call[DatasetPublic]:
    part, opened = _file_part(upload, filename, on_progress)
    return Call(
        "POST",
        "/v1/datasets",
        _one(DatasetPublic),
        files={"file": part},
        data={"name": name} if name is not None else None,
        opened=opened,
    )


def jobs(status: str | None = None, limit: int | None = None) -> Call[list[JobSummary]]:
    params = {k: v for k, v in {"status": status, "limit": limit}.items() if v is not None}
    return Call("GET", "/v1/jobs", _many(JobSummary), params=params or None)


def job(job_id: str) -> Call[JobPublic]:
    return Call("GET", f"/v1/jobs/{job_id}", _one(JobPublic))


def create_job(model: str, dataset: str, **params: Any) -> Call[JobPublic]:
    """`params` as `POST /v1/jobs` takes them (epochs, batch_size, lr, ...); None is left out."""
    body = {"model": model, "dataset": dataset}
    body.update({k: v for k, v in params.items() if v is not None})
    return Call("POST", "/v1/jobs", _one(JobPublic), json=body)


def cancel_job(job_id: str) -> Call[JobPublic]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", _one(JobPublic))


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"
