"""`python -m service`: the API server (and, with BNSERVE_WORKERS > 0, its training workers)."""

from __future__ import annotations

import os

from service.api.server import serve, server_config
from service.app import configure_logging, create_app
from service.db.engine import engine_for, make_sessionmaker, migrate
from service.jobs import JobQueue
from service.settings import Settings
from service.worker.supervisor import supervised_workers


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    if settings.API_WORKERS == 1:
        serve(server_config(settings, create_app(settings)))
        return
    # Several API processes: each builds its app from the environment and follows the database
    # like a replica; training workers are started once, by this parent, not by each of them.
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings)
    migrate(engine, settings.DATA_DIR)
    os.environ["BNSERVE_WORKERS"] = "0"
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        serve(
            server_config(
                settings, "service.app:create_app", factory=True, workers=settings.API_WORKERS
            )
        )
    engine.dispose()


if __name__ == "__main__":
    main()
