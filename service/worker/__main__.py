"""`python -m service.worker`: one training worker against the configured database and data dir."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch

from service.settings import Settings
from service.worker.runner import Worker


def main() -> None:
    settings = Settings()
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
