"""Starting the API server from `Settings`: what `python -m service` and `bnserve serve` run.

One API process serves in this process. Several (`API_WORKERS` > 1) are uvicorn's children, each
building its app from the environment and following the database like a replica, so the settings
are exported for them; the training workers are then started once, by this parent. What a bad
setting can break (the device, the plugins, the port) is checked before anything is written to
the data dir or the database.
"""

from __future__ import annotations

import os
import shutil
from functools import partial

from service.settings import Settings, settings_env


def run_api(settings: Settings) -> None:
    """Serve until stopped (imports the app here, so that `--help` never loads it)."""
    from service.api.server import bind, serve, server_config
    from service.app import configure_logging, create_app
    from service.db.engine import engine_for, make_sessionmaker, migrate
    from service.jobs import JobQueue
    from service.metrics import prepare_multiprocess_dir, process_gone
    from service.serving.allocator import tune_allocator
    from service.startup import StartupError, exit_on_startup_error, preflight
    from service.worker.supervisor import supervised_workers

    try:
        preflight(settings)
    except StartupError as exc:
        exit_on_startup_error(exc)
    configure_logging(settings)
    if settings.MALLOC_TUNING:
        tune_allocator()  # before any forward pass; exported for the processes started below
    if settings.API_WORKERS == 1:
        serve(server_config(settings, create_app(settings)))
        return
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
    # The children read their settings from the environment: the ones given as options too.
    os.environ.update({**settings_env(settings), "BNSERVE_WORKERS": "0"})
    with supervised_workers(settings, JobQueue(make_sessionmaker(engine))):
        # Read by prometheus-client as each API process imports it; training workers write no
        # metric files (their metrics are read from the job rows).
        metrics_dir = prepare_multiprocess_dir(settings.metrics_dir)
        try:
            serve(config, sock, on_child_exit=partial(process_gone, metrics_dir))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    engine.dispose()
