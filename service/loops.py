"""Periodic background loops that stop between rounds, never in the middle of one.

Cancelling a task that awaits `asyncio.to_thread` leaves the thread running; if shutdown then
disposes the database engine, that thread later checks its connection into a dead pool and the
connection is never closed. So these loops are stopped by an event and awaited instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicLoop:
    def __init__(self, name: str, interval_s: float, body: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._body = body
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Let the current round finish, then end the loop."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if self._stopping.is_set():
                return
            try:
                await self._body()
            except Exception:
                log.exception("%s failed; trying again in %.1f s", self._name, self._interval_s)
