"""The sweep of objects that no row names: what a crash between an object's put and its row's
commit leaves, removed once older than the grace, never while a publish is in flight.

Publishes hold `SWEEP_LOCK` shared from before their put until after their commit; the sweep
takes it exclusively or skips the round (service/checkpoints/remote.py says why that suffices).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from service.db.advisory import AdvisoryLocks
from service.storage import ObjectStorage

log = logging.getLogger(__name__)

# The name of the advisory lock that publishes share and the sweep takes alone.
SWEEP_LOCK = "bnserve:storage-sweep"


def sweep(
    storage: ObjectStorage,
    locks: AdvisoryLocks | None,
    prefix: str,
    referenced: Callable[[], set[str]],
    grace_s: float,
    *,
    what: str,
) -> list[str]:
    """Delete objects under `prefix` that no row names and that are older than `grace_s`.

    Objects are listed before the rows are read (an object committed meanwhile is then named),
    under the exclusive sweep lock (no publish is between its put and its commit); each object
    is looked at again just before it goes, since a put of the same bytes makes it young again.
    """
    if locks is None:
        return _sweep(storage, prefix, referenced, grace_s, what)
    with locks.try_exclusive(SWEEP_LOCK) as taken:
        if not taken:
            log.info("%s sweep skipped: a publish is in flight or another replica sweeps", what)
            return []
        return _sweep(storage, prefix, referenced, grace_s, what)


def _sweep(
    storage: ObjectStorage,
    prefix: str,
    referenced: Callable[[], set[str]],
    grace_s: float,
    what: str,
) -> list[str]:
    listed = list(storage.list(prefix))
    known = referenced()
    removed: list[str] = []
    for info in listed:
        if info.key in known:
            continue
        cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
        now = storage.info(info.key)
        if now is None or now.modified > cutoff:
            continue
        storage.delete(info.key)
        removed.append(f"removed unreferenced {what} object {info.key}")
    for action in removed:
        log.warning("storage sweep: %s", action)
    return removed
