"""A job's estimated time to completion, from the time its steps have taken so far.

Measured per attempt: a resumed job counts only the steps it ran itself, so the epochs it took
from its saved state do not make it look faster than it is. The elapsed time includes each epoch's
validation pass and state save, which the remaining epochs will pay too.
"""

from __future__ import annotations

import time


class StepClock:
    """Turns (epoch, step, steps) updates into seconds left, for the job's progress."""

    def __init__(self, epochs: int) -> None:
        self.epochs = max(1, epochs)
        self._started = time.monotonic()
        self._first: int | None = None

    def eta_s(self, epoch: int, step: int, steps: int) -> float | None:
        """Seconds until the last step of the last epoch, or None before any step has a time."""
        done = (epoch - 1) * steps + step
        if self._first is None:
            # Steps before this attempt's first one were not timed here (a resumed job).
            self._first = done - 1
        timed = done - self._first
        if timed <= 0 or steps <= 0:
            return None
        per_step = (time.monotonic() - self._started) / timed
        left = max(0, self.epochs * steps - done)
        return round(per_step * left, 1)
