"""Dynamic batching that never delays a lone request.

A version's batcher runs at most one forward pass at a time. A request that arrives while the
model is free starts a forward pass at once, alone; requests that arrive while a pass runs wait,
and the moment it ends they all go together in the next one (up to `max_batch` samples; a request
larger than that runs alone). The wait for company is therefore exactly the time the model is
busy anyway, so batches grow with load and shrink to one when idle, with no timer to tune.

Measured on a 2-core CPU (issue #8): the previous loop waited `MAX_BATCH_WAIT_MS` for company
and then awaited an `asyncio.Queue` per item; a lone `mlp_bn` request paid ~5 ms for a 0.04 ms
forward. Here a lone request pays one thread hop, and no setting needs tuning per model.

Each pass reports once, when it ends (`on_batch`): its size, the queue wait of each of its requests
(enqueue to the start of the pass) and its forward time measured on the forward thread, so the
metrics cost a few writes per batch rather than per request.

Forward passes run in the given executor, never on the event loop. Because served models are in
eval mode, gathering requests cannot change any request's outputs: BN uses running statistics,
not the batch's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from service.errors import Overloaded


class Admission:
    """A bound on samples queued across all batchers, so a flood gets 503 instead of OOM."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.queued = 0

    def enter(self, n: int) -> None:
        if self.queued + n > self.max_samples:
            raise Overloaded(
                f"prediction queue is full ({self.queued} samples waiting, limit "
                f"{self.max_samples}, BNSERVE_MAX_QUEUED_SAMPLES); retry shortly",
                retry_after=1.0,
            )
        self.queued += n

    def leave(self, n: int) -> None:
        self.queued -= n


class RowsRefused(Exception):
    """Raised by a forward whose whole batch was computed but some of whose rows may not be
    returned (outputs that overflowed): each request gets its own rows as usual, or
    `error_for(indices)` when any of its rows is refused, so no request fails for a batch-mate."""

    def __init__(
        self,
        rows: torch.Tensor,
        refused: Sequence[bool],
        error_for: Callable[[list[int]], BaseException],
    ) -> None:
        super().__init__("some rows of the batch were refused")
        self.rows = rows
        self.refused = refused
        self.error_for = error_for


@dataclass(slots=True)
class _Item:
    x: torch.Tensor
    n: int
    future: asyncio.Future[torch.Tensor]
    queued_at: float


# What a pass reports, once per batch (the metrics): samples, each request's wait, forward seconds.
BatchReport = Callable[[int, Sequence[float], float], None]


def _timed(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """A forward pass and its duration, timed on the forward thread (no loop hops counted)."""
    started = time.perf_counter()
    out = forward(x)
    return out, time.perf_counter() - started


class Batcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int,
        executor: Executor,
        admission: Admission,
        on_batch: BatchReport | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._forward = forward
        self._max_batch = max_batch
        self._executor = executor
        self._admission = admission
        self._on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._busy = False
        self._closed = False
        self.in_flight = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs for `x` (a batch), computed together with whatever else is waiting."""
        n = int(x.shape[0])
        self._admission.enter(n)
        self.in_flight += 1
        try:
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            self._pending.append(_Item(x, n, future, time.perf_counter()))
            if not self._busy:
                self._start_next()
            return await future
        finally:
            self.in_flight -= 1
            self._admission.leave(n)

    def retire(self) -> None:
        """No-op kept for the manager's life cycle: an idle batcher holds no task or thread.

        Requests that took this version before its eviction are still served; once the last of
        them ends, nothing here refers to the version any more."""

    def _start_next(self) -> None:
        """Start one forward pass with what is queued (on the loop; the pass runs off it)."""
        batch: list[_Item] = []
        size = 0
        pending = self._pending
        while pending:
            item = pending[0]
            if item.future.done():  # the request timed out or its client went away
                pending.popleft()
                continue
            if batch and size + item.n > self._max_batch:
                break
            pending.popleft()
            batch.append(item)
            size += item.n
        if not batch:
            self._busy = False
            return
        self._busy = True
        started = time.perf_counter()
        x = batch[0].x if len(batch) == 1 else torch.cat([item.x for item in batch])
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._executor, _timed, self._forward, x)
        done.add_done_callback(lambda f: self._finish(batch, size, started, f))

    def _finish(
        self,
        batch: list[_Item],
        size: int,
        started: float,
        done: asyncio.Future[tuple[torch.Tensor, float]],
    ) -> None:
        if done.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = done.exception()
        if isinstance(error, RowsRefused):  # the pass ran: its rows go out, refused or not
            self._finish_rows(batch, error)
            if self._on_batch is not None:  # the pass's own time is not known: up to now
                waits = [started - item.queued_at for item in batch]
                self._on_batch(size, waits, time.perf_counter() - started)
        elif error is not None:  # every waiter of this pass gets the error; the batcher goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            out, seconds = done.result()
            offset = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(out[offset : offset + item.n])
                offset += item.n
            if self._on_batch is not None:
                self._on_batch(size, [started - item.queued_at for item in batch], seconds)
        if self._closed:
            self._busy = False
            return
        self._start_next()

    @staticmethod
    def _finish_rows(batch: list[_Item], refused: RowsRefused) -> None:
        """Each request its rows, or the error naming its refused rows (rare: see RowsRefused)."""
        offset = 0
        for item in batch:
            if not item.future.done():
                bad = [i for i in range(item.n) if refused.refused[offset + i]]
                if bad:
                    item.future.set_exception(refused.error_for(bad))
                else:
                    item.future.set_result(refused.rows[offset : offset + item.n])
            offset += item.n

    async def close(self) -> None:
        """Shutdown: waiting requests are cancelled."""
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.cancel()
