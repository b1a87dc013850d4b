"""Database calls off the event loop, on a bounded pool of threads of their own.

Every blocking database call of an API process runs here (`BNSERVE_DB_THREADS` threads), never
on asyncio's default pool, which parses large prediction bodies and encodes large answers, nor on
the forward-pass pool. A slow or locked database (a SQLite writer holding the lock for its busy
timeout, a PostgreSQL lock or restart) then only makes requests that need the database wait for
these threads; predictions of loaded versions keep being answered. Before this, 32 requests
waiting on the SQLite write lock filled the default pool and every large prediction waited with
them (issue #17).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DatabaseThreads:
    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="db")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a database thread; calls beyond the pool's size queue."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        """Wait for the calls in flight (so none uses the engine after it is disposed)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
