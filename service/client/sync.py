"""`Client`: the contract's endpoints as typed methods, over a blocking httpx client."""

from __future__ import annotations

from collections.abc import Iterator
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

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    """bnserve over HTTP. Every error answer raises `APIError` (status, `code`, `detail`).

    `token` is sent with every request (writes need it; reads only with BNSERVE_PROTECT_READS).
    Connection failures raise httpx's own `httpx.TransportError`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=url, headers=auth_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        try:
            response = self._http.request(call.method, call.path, **call.request_args())
        finally:
            for file in call.opened:
                file.close()
        return call.result(response)

    def health(self) -> Health:
        return self._send(calls.health())

    def ready(self) -> Readiness:
        """The readiness report, whether ready (200) or not (503)."""
        return self._send(calls.ready())

    def metrics(self) -> str:
        return self._send(calls.metrics())

    def architectures(self) -> list[ArchitecturePublic]:
        return self._send(calls.architectures())

    def models(self) -> list[ModelPublic]:
        return self._send(calls.models())

    def model(self, name: str) -> ModelPublic:
        return self._send(calls.model(name))

    def create_model(
        self,
        name: str,
        architecture: str,
        config: dict[str, Any] | None = None,
        *,
        serving: dict[str, Any] | None = None,
    ) -> ModelPublic:
        return self._send(calls.create_model(name, architecture, config, serving))

    def delete_model(self, name: str) -> None:
        self._send(calls.delete_model(name))

    def versions(self, name: str) -> list[VersionPublic]:
        return self._send(calls.versions(name))

    def version(self, name: str, number: int) -> VersionPublic:
        return self._send(calls.version(name, number))

    def upload_version(
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
        return self._send(
            calls.upload_version(
                name,
                upload,
                promote=promote,
                note=note,
                filename=filename,
                on_progress=on_progress,
            )
        )

    def weights(self, name: str, number: int) -> bytes:
        """The version's tensors as `.safetensors` bytes."""
        return self._send(calls.weights(name, number))

    def promote(self, name: str, number: int) -> PromoteResult:
        return self._send(calls.promote(name, number))

    def predict(self, name: str, inputs: Any, *, version: int | None = None) -> PredictResponse:
        """One sample or a batch: nested lists (sent as JSON) or a NumPy array (sent as .npy)."""
        return self._send(calls.predict(name, inputs, version=version))

    def datasets(self) -> list[DatasetPublic]:
        return self._send(calls.datasets())

    def dataset(self, dataset_id: str) -> DatasetPublic:
        return self._send(calls.dataset(dataset_id))

    def upload_dataset(
        self,
        upload: Upload,
        *,
        name: str | None = None,
        filename: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> DatasetPublic:
        """Upload an `.npz` or `.safetensors` with `x` and `y`, or a `.zip` or `.tar` of images in
        class folders: a path, bytes or a file."""
        return self._send(
            calls.upload_dataset(upload, name=name, filename=filename, on_progress=on_progress)
        )

    def jobs(self, status: str | None = None, limit: int | None = None) -> list[JobSummary]:
        return self._send(calls.jobs(status, limit))

    def job(self, job_id: str) -> JobPublic:
        return self._send(calls.job(job_id))

    def create_job(self, model: str, dataset: str, **params: Any) -> JobPublic:
        """Queue a job: `epochs`, `batch_size`, `lr`, `optimizer`, ... as `POST /v1/jobs` takes."""
        return self._send(calls.create_job(model, dataset, **params))

    def cancel_job(self, job_id: str) -> JobPublic:
        return self._send(calls.cancel_job(job_id))

    def job_events(self, job_id: str) -> Iterator[JobEvent]:
        """Follow a job: its `progress` events, then the outcome's event, then the end."""
        with self._http.stream("GET", calls.events_path(job_id)) as response:
            if response.is_error:
                response.read()
                raise APIError.of(response)
            parser = EventParser()
            for line in response.iter_lines():
                message = parser.feed(line)
                if message is not None:
                    event = job_event(*message)
                    yield event
                    if event.final:
                        return

    def wait_job(self, job_id: str) -> JobPublic:
        """Block until the job ends (following its events) and return it as it ended."""
        while True:
            for event in self.job_events(job_id):
                if event.job is not None:
                    return event.job
            # The stream ended early (a proxy cut it): follow it again unless it ended.
            job = self.job(job_id)
            if job.status in OUTCOMES:
                return job
