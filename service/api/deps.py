"""What routes reach through `Depends`: the app's long-lived objects and the auth checks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, ParamSpec, TypeVar

import torch
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import UNAUTHORIZED, bearer_matches, check_bearer
from service.datasets.store import DatasetStore
from service.db.threads import DatabaseThreads
from service.errors import Unauthorized
from service.files import Owner
from service.jobs import JobQueue
from service.locks import KeyedLocks
from service.metrics import Metrics
from service.registry import Registry
from service.serving.manager import ModelManager
from service.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(eq=False)
class Services:
    """Everything built in the app's lifespan, kept on `app.state.services`."""

    settings: Settings
    registry: Registry
    manager: ModelManager
    datasets: DatasetStore
    jobs: JobQueue
    owner: Owner
    token: str
    device: torch.device
    metrics: Metrics
    # Upload processing (copying, reading, scanning, checking, hashing, storing) runs here, not
    # in the default pool: predictions and other requests use that one, and a few slow uploads
    # once kept all of its threads busy for a minute.
    upload_executor: ThreadPoolExecutor
    # Every database call of a request or of the serving sync (BNSERVE_DB_THREADS threads).
    db: DatabaseThreads
    upload_locks: KeyedLocks = field(default_factory=KeyedLocks)

    def upload_lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Uploads of one model are processed one at a time in this process."""
        return self.upload_locks.hold(name)

    async def run_upload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking upload work on the upload executor (BNSERVE_UPLOAD_THREADS threads)."""
        call = functools.partial(fn, *args, **kwargs)
        # In the request's context (as asyncio.to_thread does), so its log lines carry its id.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.upload_executor, context.run, call
        )


# Every dependency here is async: FastAPI runs a plain `def` dependency on its thread pool, a
# hop per dependency per request that issue #8's profile found on the predict path.


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# These only make FastAPI document the bearer scheme on each operation that depends on them (the
# Authorize button of /docs); `check_bearer` does the checking, with the contract's 401 body.
# `service.api.openapi` keeps the read scheme only when BNSERVE_PROTECT_READS is on.
BEARER_SCHEME = "bearerAuth"
READ_BEARER_SCHEME = "bearerAuthForReads"
_write_bearer = HTTPBearer(
    scheme_name=BEARER_SCHEME,
    description="BNSERVE_API_TOKEN, or the file api-token in the data dir",
    auto_error=False,
)
_read_bearer = HTTPBearer(scheme_name=READ_BEARER_SCHEME, auto_error=False)
Credentials = HTTPAuthorizationCredentials | None


async def require_token(
    request: Request,
    services: ServicesDep,
    _: Annotated[Credentials, Depends(_write_bearer)],
) -> None:
    """State-changing requests always need the bearer token."""
    check_bearer(request, services.token)


async def require_read_token(
    request: Request,
    services: ServicesDep,
    _: Annotated[Credentials, Depends(_read_bearer)],
) -> None:
    """Reads and predictions need it only with BNSERVE_PROTECT_READS=true."""
    if services.settings.PROTECT_READS:
        check_bearer(request, services.token)


async def require_metrics_token(
    request: Request,
    services: ServicesDep,
    _: Annotated[Credentials, Depends(_read_bearer)],
) -> None:
    """/metrics needs a token with BNSERVE_PROTECT_READS or BNSERVE_METRICS_TOKEN (either one)."""
    settings = services.settings
    if (settings.PROTECT_READS or settings.METRICS_TOKEN) and not bearer_matches(
        request.headers.get("authorization", ""), services.token, settings.METRICS_TOKEN
    ):
        raise Unauthorized(UNAUTHORIZED)


WriteAuth = Depends(require_token)
ReadAuth = Depends(require_read_token)
MetricsAuth = Depends(require_metrics_token)
