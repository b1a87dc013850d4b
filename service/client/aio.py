"""`AsyncClient`: the same methods as `Client`, awaited, over httpx's async client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

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
from service.client import calls
from service.client.calls import Call, ProgressCallback, Upload
from service.client.errors import APIError
from service.client.events import OUTCOMES, EventParser, JobEvent, job_event
from service.client.sync import DEFAULT_URL, auth_headers

T = TypeVar("T")


class AsyncClient:
    """bnserve over HTTP, for asyncio; errors as `Client`'s (`APIError`, `httpx.TransportError`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=url, headers=auth_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        try:
            response = await self._http.request(call.method, call.path, **call.request_args())
        finally:
            for file in call.opened:
                file.close()
        return call.result(response)

    async def health(self) -> Health:
        return await self._send(calls.health())

    async def ready(self) -> Readiness:
        """The readiness report, whether ready (200) or not (503)."""
        return await self._send(calls.ready())

    async def metrics(self) -> str:
        return await self._send(calls.metrics())

    async def architectures(self) -> list[ArchitecturePublic]:
        return await self._send(calls.architectures())

    async def models(self) -> list[ModelPublic]:
        return await self._send(calls.models())

    async def model(self, name: str) -> ModelPublic:
        return await self._send(calls.model(name))

    async def create_model(
        self,
        name: str,
        architecture: str,
        config: dict[str, Any] | None = None,
        *,
        serving: dict[str, Any] | None = None,
    ) -> ModelPublic:
        return await self._send(calls.create_model(name, architecture, config, serving))

    async def delete_model(self, name: str) -> None:
        await self._send(calls.delete_model(name))

    async def versions(self, name: str) -> list[VersionPublic]:
        return await self._send(calls.versions(name))

    async def version(self, name: str, number: int) -> VersionPublic:
        return await self._send(calls.version(name, number))

    async def upload_version(
        self,
        name: str,
        upload: Upload,
        *,
        promote: bool = True,
        note: str | None = None,
        filename: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> VersionPublic:
        """Upload a state_dict (`.pt`/`.pth`) or `.safetensors`: a path, bytes or a file."""
        return await self._send(
            calls.upload_version(
                name,
                upload,
                promote=promote,
                note=note,
                filename=filename,
                on_progress=on_progress,
            )
        )

    async def weights(self, name: str, number: int) -> bytes:
        """The version's tensors as `.safetensors` bytes."""
        return await self._send(calls.weights(name, number))

    async def promote(self, name: str, number: int) -> PromoteResult:
        return await self._send(calls.promote(name, number))

    async def predict(
        self, name: str, inputs: Any, *, version: int | None = None
    ) -> PredictResponse:
        """One sample or a batch: nested lists (sent as JSON) or a NumPy array (sent as .npy)."""
        return await self._send(calls.predict(name, inputs, version=version))

    async def datasets(self) -> list[DatasetPublic]:
        return await self._send(calls.datasets())

    async def dataset(self, dataset_id: str) -> DatasetPublic:
        return await self._send(calls.dataset(dataset_id))

    async def upload_dataset(
        self,
        upload: Upload,
        *,
        name: str | None = None,
        filename: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> DatasetPublic:
        """Upload an `.npz` or `.safetensors` with `x` and `y`, or a `.zip` or `.tar` of images in
        class folders: a path, bytes or a file."""
        return await self._send(
            calls.upload_dataset(upload, name=name, filename=filename, on_progress=on_progress)
        )

    async def jobs(self, status: str | None = None, limit: int | None = None) -> list[JobSummary]:
        return await self._send(calls.jobs(status, limit))

    async def job(self, job_id: str) -> JobPublic:
        return await self._send(calls.job(job_id))

    async def create_job(self, model: str, dataset: str, **params: Any) -> JobPublic:
        """Queue a job: `epochs`, `batch_size`, `lr`, `optimizer`, ... as `POST /v1/jobs` takes."""
        return await self._send(calls.create_job(model, dataset, **params))

    async def cancel_job(self, job_id: str) -> JobPublic:
        return await self._send(calls.cancel_job(job_id))

    async def job_events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Follow a job: its `progress` events, then the outcome's event, then the end."""
        async with self._http.stream("GET", calls.events_path(job_id)) as response:
            if response.is_error:
                await response.aread()
                raise APIError.of(response)
            parser = EventParser()
            async for line in response.aiter_lines():
                message = parser.feed(line)
                if message is not None:
                    event = job_event(*message)
                    yield event
                    if event.final:
                        return

    async def wait_job(self, job_id: str) -> JobPublic:
        """Wait until the job ends (following its events) and return it as it ended."""
        while True:
            async for event in self.job_events(job_id):
                if event.job is not None:
                    return event.job
            # The stream ended early (a proxy cut it): follow it again unless it ended.
            job = await self.job(job_id)
            if job.status in OUTCOMES:
                return job
