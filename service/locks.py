"""Per-name asyncio locks that exist only while someone holds or waits for them.

A plain `dict[name, Lock]` kept one lock for every name ever asked for, so a stream of
unauthenticated `?version=N` predictions to random names grew it without bound, and a deleted
model's lock stayed forever (issue #17). Popping a lock by hand is no better: a coroutine still
waiting on the popped lock and a newcomer given a fresh one would both hold "the" lock. Here each
entry counts its users and goes with the last of them, so the table holds only names in use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KeyedLocks:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        """Names whose lock is held or awaited right now."""
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold `name`'s lock for the block; the entry is dropped when nobody else wants it."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[name]
