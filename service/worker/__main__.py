"""`python -m service.worker`: one training worker against the configured database and data dir."""

from __future__ import annotations

import argparse
import signal
from types import FrameType

import torch

from service import logs
from service.serving.allocator import tune_allocator
from service.settings import Settings
from service.startup import StartupError, exit_on_startup_error, load_settings, preflight
from service.worker.parent import tie_to_parent
from service.worker.runner import Worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.worker",
        description="A training worker: claims queued jobs from BNSERVE_DATABASE_URL and runs "
        "them. Settings come from BNSERVE_* environment variables.",
    )
    parser.add_argument(
        "--parent-fd",
        type=int,
        default=None,
        help="set by the API server that starts this worker: the read end of a pipe it holds; "
        "the worker stops when the server is gone",
    )
    args = parser.parse_args(argv)
    if args.parent_fd is not None:
        tie_to_parent(args.parent_fd)  # first, so a server that dies during start-up counts
    try:
        settings = load_settings()
    except StartupError as exc:
        exit_on_startup_error(exc)
    run(settings)


def run(settings: Settings) -> None:
    """Claim and run jobs until SIGTERM or SIGINT (also what `bnserve worker` runs)."""
    try:
        preflight(settings)  # before the worker migrates or writes anything
    except StartupError as exc:
        exit_on_startup_error(exc)
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT, "worker")
    if settings.MALLOC_TUNING:
        tune_allocator()
    torch.set_num_threads(settings.worker_threads())
    worker = Worker(settings)

    def stop(signum: int, _frame: FrameType | None) -> None:
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run_forever()


if __name__ == "__main__":
    main()
