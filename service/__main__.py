"""`python -m service`: the API server (and, with BNSERVE_WORKERS > 0, its training workers)."""

from __future__ import annotations

import os

from service.api.server import bind, serve, server_config
from service.app import configure_logging, create_app
from service.db.engine import engine_for, make_sessionmaker, migrate
from service.jobs import JobQueue
from service.serving.allocator import tune_allocator
from service.startup import StartupError, exit_on_startup_error, load_settings, preflight
from service.worker.supervisor import supervised_workers


def main() -> None:
    try:
        settings = load_settings()
        preflight(settings)  # before anything is written to the data dir or the database
    except StartupError as exc:
        exit_on_startup_error(exc)
    configure_logging(settings)
    if settings.MALLOC_TUNING:
        tune_allocator()  # before any forward pass; exported for the processes started below
    if settings.API_WORKERS == 1:
        serve(server_config(settings, create_app(settings)))
        return
    # Several API processes: each builds its app from the environment and follows the database
    # like a replica; training workers are started once, by this parent, not by each of them.
    config = server_config(
        settings, "service.app:create_app", factory=True, workers=settings.API_WORKERS
    )
    try:
        sock = bind(config)  # before the migrations: a port in use leaves the data dir alone
    except StartupError as exc:
        exit_on_startup_error(exc)
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings)
    migrate(engine, settings.DATA_DIR)
    os.environ["BNSERVE_WORKERS"] = "0"
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        serve(config, sock)
    engine.dispose()


if __name__ == "__main__":
    main()
