"""Dynamic batching: concurrent requests for one version become one forward pass.

Requests wait at most `max_wait_s` for company, and a batch never exceeds `max_batch` samples
(a request larger than that runs alone). Forward passes run in a thread pool, never on the event
loop. Because served models are in eval mode, gathering requests cannot change any request's
outputs: BN uses running statistics, not the batch's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
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


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future[torch.Tensor]

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class Batcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int,
        max_wait_s: float,
        executor: Executor,
        admission: Admission,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._forward = forward
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._executor = executor
        self._admission = admission
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._carry: _Item | None = None
        self._task: asyncio.Task[None] | None = None
        self._retired = False
        self.in_flight = 0

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs for `x` (a batch), computed together with whatever else is waiting."""
        n = int(x.shape[0])
        self._admission.enter(n)
        self.in_flight += 1
        try:
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Item(x, future))
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run(), name="batcher")
            return await future
        finally:
            self.in_flight -= 1
            self._admission.leave(n)

    def retire(self) -> None:
        """Let the loop end once the queue is drained; a later submit restarts it."""
        self._retired = True
        self._queue.put_nowait(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._retired and self._carry is None and self._queue.empty():
                # A request that took this handle just before its eviction restarted the loop;
                # waiting on for more would keep the evicted version alive forever.
                return
            first = self._carry or await self._queue.get()
            self._carry = None
            if first is None:
                if not self._retired:
                    continue
                if self._queue.empty():
                    return
                self._queue.put_nowait(None)  # requests came after the stop signal: serve them
                continue
            batch = [first]
            size = first.n
            deadline = loop.time() + self._max_wait_s
            while size < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), timeout)
                    except TimeoutError:
                        break
                if item is None:
                    if self._retired:
                        self._queue.put_nowait(None)  # keep the stop signal for after this batch
                        break
                    continue
                if size + item.n > self._max_batch:
                    self._carry = item
                    break
                batch.append(item)
                size += item.n
            await self._execute(batch)

    async def _execute(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # drop cancelled requests
        if not live:
            return
        try:
            x = live[0].x if len(live) == 1 else torch.cat([item.x for item in live])
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, x)
        except Exception as exc:  # every waiter gets the error, the loop goes on
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(int(x.shape[0]))
        offset = 0
        for item in live:
            if not item.future.done():
                item.future.set_result(out[offset : offset + item.n])
            offset += item.n

    async def close(self) -> None:
        """Stop the loop at once (shutdown); waiting requests are cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
