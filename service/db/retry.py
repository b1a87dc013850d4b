"""Transient database errors, and retrying them with exponential backoff.

A PostgreSQL restart drops every connection and refuses new ones for a while; a SQLite writer
that waited out its busy timeout gets "database is locked". Both are SQLAlchemy
`OperationalError`s (or a connection invalidated under a statement) that go away by themselves,
so background work (the serving sync, worker supervision, a worker's claims, heartbeats and job
updates) waits and tries again instead of failing a job or exiting. Anything else (an integrity
error, a bug) is not retried.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")

# Waits double from the first to the last, then stay there: a restart of a few seconds costs
# about one wait past its end, and a long outage costs one log line and one try per 5 s.
FIRST_WAIT_S = 0.1
LONGEST_WAIT_S = 5.0


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a database error that trying again later may not get."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def describe(exc: BaseException) -> str:
    """The driver's message on one line (SQLAlchemy's own adds the statement and a link)."""
    origin = getattr(exc, "orig", None) or exc
    return " ".join(str(origin).split())[:300] or type(origin).__name__


class Backoff:
    """Waits that double from `first` up to `longest`; `reset` after a success."""

    def __init__(self, first: float = FIRST_WAIT_S, longest: float = LONGEST_WAIT_S) -> None:
        self.first = first
        self.longest = longest
        self.failures = 0

    def next_wait(self) -> float:
        wait = min(self.longest, self.first * 2.0**self.failures)
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0


def retrying(call: Callable[[], T], what: str, stop: threading.Event) -> T:
    """`call()`, tried again with backoff while it fails with a transient database error.

    Blocking. Gives up (re-raising the error) once `stop` is set, so a worker asked to shut down
    during an outage still exits. Only for calls that are safe to repeat: each is one
    transaction, rolled back when it failed.
    """
    backoff = Backoff()
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or stop.is_set():
                raise
            wait = backoff.next_wait()
            log.warning(
                "%s: database unavailable (%s); retrying in %.1f s", what, describe(exc), wait
            )
            stop.wait(wait)
