"""Starting the API server from `Settings`: what `python -m service` and `bnserve serve` run.

One API process serves in this process. Several (`API_WORKERS` > 1) are uvicorn's children, each
building its app from the environment and following the database like a replica, so the settings
are exported for them; the training workers are then started once, by this parent.
"""

from __future__ import annotations

import os

from service.settings import Settings, settings_env


def run_api(settings: Settings) -> None:
    """Serve until stopped (imports the app here, so that `--help` never loads it)."""
    from service.api.server import serve, server_config
    from service.app import configure_logging, create_app
    from service.db.engine import make_engine, make_sessionmaker, migrate
    from service.jobs import JobQueue
    from service.worker.supervisor import supervised_workers

    configure_logging(settings)
    if settings.API_WORKERS == 1:
        serve(server_config(settings, create_app(settings)))
        return
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    migrate(engine, settings.DATA_DIR)
    # The children read their settings from the environment: the ones given as options too.
    os.environ.update({**settings_env(settings), "BNSERVE_WORKERS": "0"})
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        serve(
            server_config(
                settings, "service.app:create_app", factory=True, workers=settings.API_WORKERS
            )
        )
    engine.dispose()
