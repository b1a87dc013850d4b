"""A job's estimated time to completion, from the time its steps have taken so far.

Timed from the end of this attempt's first step: that step carries one-time costs (PyTorch's
lazy initialisation, the first backward pass: seconds on a loaded machine, against milliseconds
for the steps after it) that would otherwise inflate every estimate. A resumed job counts only
the steps it ran itself. The elapsed time includes each epoch's validation pass and state save,
which the remaining epochs will pay too.
"""

from __future__ import annotations

import time


class StepClock:
    """Turns (epoch, step, steps) updates into seconds left, for the job's progress."""

    def __init__(self, epochs: int) -> None:
        self.epochs = max(1, epochs)
        self._first: tuple[int, float] | None = None

    def eta_s(self, epoch: int, step: int, steps: int) -> float | None:
        """Seconds until the last step of the last epoch; None until two steps have run."""
        done = (epoch - 1) * steps + step
        now = time.monotonic()
        if self._first is None:
            self._first = (done, now)
            return None
        timed = done - self._first[0]
        if timed <= 0:
            return None
        per_step = (now - self._first[1]) / timed
        left = max(0, self.epochs * steps - done)
        return round(per_step * left, 1)
