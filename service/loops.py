"""Periodic background loops that stop between rounds, never in the middle of one.

Cancelling a task that awaits `asyncio.to_thread` leaves the thread running; if shutdown then
disposes the database engine, that thread later checks its connection into a dead pool and the
connection is never closed. So these loops are stopped by an event and awaited instead.

A round that fails with a transient database error (`service.db.retry`) is tried again after a
wait that doubles up to `LONGEST_WAIT_S` (or the interval, if longer), with one log line per
try instead of a traceback every interval; the interval returns with the first good round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.db.retry import LONGEST_WAIT_S, Backoff, describe, is_transient

log = logging.getLogger(__name__)


class PeriodicLoop:
    def __init__(self, name: str, interval_s: float, body: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._body = body
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(first=interval_s, longest=max(interval_s, LONGEST_WAIT_S))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Let the current round finish, then end the loop."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        wait = self._interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            if self._stopping.is_set():
                return
            wait = self._interval_s
            try:
                await self._body()
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("%s failed; trying again in %.1f s", self._name, wait)
                    continue
                wait = self._backoff.next_wait()
                log.warning(
                    "%s: database unavailable (%s); trying again in %.1f s",
                    self._name,
                    describe(exc),
                    wait,
                )
            else:
                self._backoff.reset()
