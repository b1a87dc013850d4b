"""A job's progress as server-sent events (`GET /v1/jobs/{id}/events`), read from its row.

Workers write a running job's progress with their heartbeat (every `BNSERVE_WORKER_HEARTBEAT_S`)
and each epoch's metrics as it ends, into the database that every API process shares; so the
stream polls the job's row, in a thread, at half the heartbeat interval (at most every 0.5 s),
and sends a `progress` event whenever the status, progress or number of epochs changed. The
last event is named after the outcome (`succeeded`, `failed`, `cancelled`) and carries the whole
job; then the stream ends. A job that disappears meanwhile (its model was deleted) ends the
stream with an `error` event holding the contract's `{detail, code}`. Comment lines keep a quiet
stream (a queued job) alive through proxies that close idle connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from service.api.schemas import JobPublic
from service.db.tables import JobRow
from service.errors import NotFound
from service.jobs import FINAL

# Heartbeats come every second by default: reading twice as often shows each one promptly and
# costs one primary-key read per open stream per interval. Never more often than MIN_POLL_S.
MAX_POLL_S = 0.5
MIN_POLL_S = 0.05
# A comment line after this long without an event; proxies commonly drop idle streams at 60 s.
KEEPALIVE_S = 15.0


def sse(event: str, data: Any) -> bytes:
    """One event in the text/event-stream framing (the data is a single JSON line)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def poll_interval(heartbeat_s: float) -> float:
    """How often a stream reads its job, for workers that write progress every `heartbeat_s`."""
    return min(MAX_POLL_S, max(MIN_POLL_S, heartbeat_s / 2))


def _payload(job: JobPublic) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "progress": job.progress.model_dump(mode="json"),
        "metrics": job.metrics[-1] if job.metrics else None,
    }


async def job_events(
    read_job: Callable[[str], Awaitable[JobRow]],
    first: JobRow,
    *,
    poll_s: float = MAX_POLL_S,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """The events of the job `first` (already read, so an unknown job is a 404 before this);
    `read_job` reads it again (on the database threads)."""
    row = first
    seen: tuple[Any, ...] | None = None
    last_sent = time.monotonic()
    while True:
        job = JobPublic.of(row)
        if job.status in FINAL:
            yield sse(job.status, {**_payload(job), "job": job.model_dump(mode="json")})
            return
        state = (job.status, job.progress, len(job.metrics))
        if state != seen:
            seen = state
            last_sent = time.monotonic()
            yield sse("progress", _payload(job))
        elif time.monotonic() - last_sent >= keepalive_s:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(poll_s)
        try:
            row = await read_job(job.id)
        except NotFound as exc:
            yield sse("error", {"detail": exc.detail, "code": exc.code})
            return
