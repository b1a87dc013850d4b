"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.auth import bearer_matches
from service.api.deps import MetricsAuth, Services, ServicesDep
from service.api.schemas import Health, Readiness

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """Answers while the process runs: it never touches the database or a model."""
    return Health(status="ok")


async def server_readiness(services: Services, request: Request) -> Readiness:
    """Ready when every model that has a serving version has exactly that version loaded here.

    The serving versions are read from the database on each call, so a process that has not yet
    followed a promote made elsewhere says so; without the database it cannot tell, and is not
    ready. `/readyz` and the v2 protocol's `/v2/health/ready` both answer from this. With
    BNSERVE_PROTECT_READS the per-model report (names, versions, load errors) goes only to
    callers with the token: a probe needs the status alone.
    """
    manager = services.manager
    try:
        models = await manager.check_readiness()
        reachable = True
    except Exception as exc:
        log.warning("not ready: cannot read the serving versions from the database: %s", exc)
        models = manager.readiness()
        reachable = False
    ready = reachable and all(m["ready"] for m in models.values())
    if services.settings.PROTECT_READS and not bearer_matches(
        request.headers.get("authorization", ""), services.token
    ):
        models = {}
    return Readiness(status="ready" if ready else "not_ready", models=models)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(services: ServicesDep, request: Request) -> JSONResponse:
    """200 when ready (see `server_readiness`), else 503 with the per-model report."""
    body = await server_readiness(services, request)
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ready" else 503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[MetricsAuth])
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text: this process's metrics, or every API process's in multiprocess mode,
    and the jobs' from the database (read in a thread: the scrape must not block the loop)."""
    services.metrics.queued.set(services.manager.admission.queued)
    body = await asyncio.to_thread(services.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
