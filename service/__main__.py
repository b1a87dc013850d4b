"""`python -m service`: the API server (and, with BNSERVE_WORKERS > 0, its training workers)."""

from __future__ import annotations

import os
import shutil
from functools import partial

from service.api.server import serve, server_config
from service.app import configure_logging, create_app
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.jobs import JobQueue
from service.metrics import prepare_multiprocess_dir, process_gone
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
    engine = make_engine(settings.database_url)
    migrate(engine, settings.DATA_DIR)
    os.environ["BNSERVE_WORKERS"] = "0"
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        # Read by prometheus-client as each API process imports it; training workers write no
        # metric files (their metrics are read from the job rows).
        metrics_dir = prepare_multiprocess_dir(settings.metrics_dir)
        config = server_config(
            settings, "service.app:create_app", factory=True, workers=settings.API_WORKERS
        )
        try:
            serve(config, on_child_exit=partial(process_gone, metrics_dir))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    engine.dispose()


if __name__ == "__main__":
    main()
