"""`python -m service`: the API server (and, with BNSERVE_WORKERS > 0, its training workers)."""

from __future__ import annotations

import os
from typing import Any

import uvicorn

from service.app import configure_logging, create_app
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.jobs import JobQueue
from service.settings import Settings
from service.worker.supervisor import supervised_workers


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    common: dict[str, Any] = {
        "host": settings.HOST,
        "port": settings.PORT,
        "log_level": settings.LOG_LEVEL,
        "timeout_graceful_shutdown": 10,
        "limit_concurrency": settings.MAX_CONNECTIONS,
    }
    if settings.API_WORKERS == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Several API processes: each builds its app from the environment and follows the database
    # like a replica; training workers are started once, by this parent, not by each of them.
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    migrate(engine, settings.DATA_DIR)
    os.environ["BNSERVE_WORKERS"] = "0"
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            workers=settings.API_WORKERS,
            **common,
        )
    engine.dispose()


if __name__ == "__main__":
    main()
