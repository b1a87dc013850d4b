"""The FastAPI app: long-lived objects are built in the lifespan from a `Settings` object."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from models import load_plugins
from service import logs
from service.api.auth import load_or_create_token
from service.api.deps import Services
from service.api.errors import install_error_handlers
from service.api.fastpath import PredictFastPath
from service.api.hosts import AllowedHostsMiddleware
from service.api.limits import BodyLimitMiddleware
from service.api.openapi import TAGS, install_openapi
from service.api.request_id import install_request_ids
from service.api.routes import (
    architectures,
    datasets,
    docs,
    health,
    jobs,
    models,
    predict,
    v2,
    versions,
)
from service.api.routes.ui import install_ui
from service.api.token_gate import TokenGate
from service.db.engine import engine_for, make_sessionmaker, migrate
from service.db.threads import DatabaseThreads
from service.demo import seed_demo
from service.files import Owner
from service.job_metrics import JobMetrics
from service.jobs import JobQueue
from service.loops import PeriodicLoop
from service.metrics import Metrics, multiprocess_dir
from service.registry import Registry
from service.serving.device import resolve_device
from service.serving.manager import ModelManager
from service.serving.precision import apply_precision, backend_precisions
from service.settings import Settings
from service.stores import open_stores
from service.worker.resume import ResumeStore
from service.worker.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

QUEUED_GAUGE_INTERVAL_S = 1.0


def build_services(settings: Settings) -> Services:
    """Pick the device, load the plugins, open the database (migrating it), reconcile the stores
    after any crash. What can fail for a bad setting comes first, so it fails before any write."""
    device = resolve_device(settings.DEVICE)
    plugins = load_plugins(settings.ARCHITECTURE_PLUGINS)
    if plugins:
        log.info("loaded architecture plugin modules: %s", ", ".join(plugins))
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings)
    migrate(engine, settings.DATA_DIR)
    sessions = make_sessionmaker(engine)
    owner = Owner(settings.DATA_DIR)
    checkpoints, datasets = open_stores(settings, owner, sessions)
    registry = Registry(sessions, checkpoints)
    registry.recover_store()
    datasets.recover()
    owner.sweep(settings.upload_dir)
    owner.sweep_owners()
    jobs = JobQueue(sessions)
    if settings.JOB_RETENTION_S:
        jobs.prune(settings.JOB_RETENTION_S)
    ResumeStore(settings.resume_dir, owner).sweep(jobs)
    if settings.DEMO:
        seed_demo(settings, registry, datasets, jobs, owner)
    apply_precision(settings.FP32_PRECISION)
    torch.set_num_threads(settings.serve_threads())
    log.info(
        "serving on %s with %d intra-op threads, fp32 precision %s",
        device,
        torch.get_num_threads(),
        backend_precisions(),
    )
    metrics = Metrics(multiprocess_dir(settings))
    metrics.add_scrape_collector(JobMetrics(jobs))
    db = DatabaseThreads(settings.DB_THREADS)
    manager = ModelManager(settings, registry, device, db)
    manager.on_batch = metrics.batch_done
    manager.on_swap = metrics.swapped
    manager.on_loaded = metrics.loaded_changed
    manager.on_load_failure = lambda name: metrics.version_load_failures.labels(name).inc()
    manager.on_forget = metrics.forget_model
    manager.on_drift = metrics.drift_measured
    return Services(
        settings=settings,
        registry=registry,
        manager=manager,
        datasets=datasets,
        jobs=jobs,
        owner=owner,
        token=load_or_create_token(settings),
        device=device,
        metrics=metrics,
        upload_executor=ThreadPoolExecutor(settings.UPLOAD_THREADS, thread_name_prefix="upload"),
        db=db,
    )


def job_pruner(settings: Settings, jobs: JobQueue) -> PeriodicLoop | None:
    """The loop that deletes jobs ended more than BNSERVE_JOB_RETENTION_S ago (None: keep all)."""
    retention = settings.JOB_RETENTION_S
    if not retention:
        return None

    async def prune() -> None:
        pruned = await asyncio.to_thread(jobs.prune, retention)
        if pruned:
            log.info("pruned %d jobs that ended more than %.0f s ago", pruned, retention)

    return PeriodicLoop("job pruning", settings.job_prune_interval_s(), prune)


def storage_sweeper(settings: Settings, services: Services) -> PeriodicLoop | None:
    """With remote storage, the loop that removes objects no row names once past the grace (a
    crash between an object's put and its row's commit leaves one); one replica at a time."""
    if not settings.remote_storage:
        return None
    registry, datasets = services.registry, services.datasets

    async def sweep() -> None:
        await asyncio.to_thread(registry.recover_store)
        await asyncio.to_thread(datasets.recover)

    loop = PeriodicLoop("storage sweep", settings.storage_sweep_interval_s(), sweep)
    loop.start()
    return loop


def queued_gauge_loop(services: Services) -> PeriodicLoop | None:
    """In multiprocess mode the scraped process cannot see the others' queues: each process
    writes its own queue length every second (the one process of single mode does it at scrape)."""
    if not services.metrics.multiprocess:
        return None
    metrics, admission = services.metrics, services.manager.admission

    async def refresh() -> None:
        metrics.queued.set(admission.queued)

    loop = PeriodicLoop("queued-samples gauge", QUEUED_GAUGE_INTERVAL_S, refresh)
    loop.start()
    return loop


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    services = await asyncio.to_thread(build_services, settings)
    app.state.services = services
    await services.manager.start()
    supervisor = WorkerSupervisor(settings, services.jobs)
    await supervisor.start()
    pruner = job_pruner(settings, services.jobs)
    if pruner is not None:
        pruner.start()
    gauges = queued_gauge_loop(services)
    sweeper = storage_sweeper(settings, services)
    try:
        yield
    finally:
        if sweeper is not None:
            await sweeper.stop()
        if gauges is not None:
            await gauges.stop()
        if pruner is not None:
            await pruner.stop()
        await supervisor.stop()
        await services.manager.stop()
        services.upload_executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(services.db.shutdown)
        services.registry.close()
        services.owner.close()


def configure_logging(settings: Settings) -> None:
    """The API process's log lines (`service.logs`), unless the host process set up logging."""
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT, "api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; with no settings given (uvicorn's factory mode) they come from the environment."""
    settings = settings or Settings()
    configure_logging(settings)
    app = FastAPI(
        title="bnserve",
        version="0.1.0",
        summary="Serve PyTorch BatchNorm models from checked, versioned, atomically swapped "
        "checkpoints",
        lifespan=lifespan,
        openapi_tags=TAGS,
        # Served by service/api/routes/docs.py with local assets instead of FastAPI's CDN ones.
        docs_url=None,
        redoc_url=None,
        # FastAPI's built-in OpenTelemetry hooks look up the global providers (and the
        # environment) on every request: 9% of the event loop's time per prediction in a py-spy
        # profile (issue #8). bnserve's metrics are Prometheus (/metrics); nothing uses OTel.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    # Added first, so it is the innermost middleware: the token is checked from the head of
    # every request that the fast path does not answer (that one checks it itself).
    app.add_middleware(TokenGate)
    # Then the fast path: the others still wrap every prediction.
    app.add_middleware(PredictFastPath)
    app.add_middleware(BodyLimitMiddleware, limit=settings.MAX_UPLOAD_BYTES)
    # Added last, so it runs first: a request for a foreign host gets no further.
    app.add_middleware(AllowedHostsMiddleware, allowed=settings.allowed_hosts())
    # Outside every other layer, Starlette's error middleware included: even a 500 gets its id.
    app.build_middleware_stack = install_request_ids(  # type: ignore[method-assign]
        app.build_middleware_stack
    )
    install_error_handlers(app)
    install_openapi(app, settings)
    for module in (health, architectures, models, versions, predict, v2, datasets, jobs):
        app.include_router(module.router)
    install_ui(app)
    docs.install_docs(app)
    return app
