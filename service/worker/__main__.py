"""`python -m service.worker`: one training worker against the configured database and data dir."""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

import torch

from service.settings import Settings
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
    run(Settings())


def run(settings: Settings) -> None:
    """Claim and run jobs until SIGTERM or SIGINT (also what `bnserve worker` runs)."""
    logging.basicConfig(
        level=settings.LOG_LEVEL.upper(),
        format="%(asctime)s %(levelname)s worker %(name)s: %(message)s",
    )
    torch.set_num_threads(settings.worker_threads())
    worker = Worker(settings)

    def stop(signum: int, _frame: FrameType | None) -> None:
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run_forever()


if __name__ == "__main__":
    main()
