"""A Python client for bnserve's HTTP API (shared/API.md), sync and async, on httpx.

    from service.client import Client
    with Client("http://127.0.0.1:8000", token=token) as bn:
        bn.create_model("blobs", "mlp_bn")
        print(bn.predict("blobs", [[-1.5, -1.5]]).predictions)

Results are the server's own pydantic schemas (`service.api.schemas`); an error answer raises
`APIError` with the server's `status`, `code` and `detail`. Importing it loads neither PyTorch
nor the database.
"""

from __future__ import annotations

from service.client.aio import AsyncClient
from service.client.calls import ProgressCallback, Upload
from service.client.errors import APIError
from service.client.events import OUTCOMES, JobEvent
from service.client.sync import DEFAULT_URL, Client

__all__ = [
    "DEFAULT_URL",
    "OUTCOMES",
    "APIError",
    "AsyncClient",
    "Client",
    "JobEvent",
    "ProgressCallback",
    "Upload",
]
