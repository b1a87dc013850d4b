"""The checkpoint store a process uses: the data dir's, or object storage with a local cache.

One function for the API process and the training worker, so both pick the same by
`BNSERVE_STORAGE_URL` and neither can write where the other does not read.
"""

from __future__ import annotations

from service.checkpoints.remote import ObjectCheckpointStore
from service.checkpoints.store import CheckpointStore
from service.db.advisory import AdvisoryLocks
from service.files import Owner
from service.settings import Settings
from service.storage import ObjectStorage, open_storage
from service.storage.cache import LocalCache

AnyCheckpointStore = CheckpointStore | ObjectCheckpointStore


def open_locks(settings: Settings) -> AdvisoryLocks | None:
    """Database locks for what crosses hosts (remote storage needs PostgreSQL, see settings)."""
    if not settings.remote_storage:
        return None
    return AdvisoryLocks(settings.database_url)


def checkpoint_store(
    settings: Settings,
    owner: Owner,
    locks: AdvisoryLocks | None = None,
    storage: ObjectStorage | None = None,
) -> AnyCheckpointStore:
    if not settings.remote_storage:
        return CheckpointStore(settings.checkpoint_dir, owner)
    storage = storage or open_storage(settings.STORAGE_URL)
    cache = LocalCache(settings.cache_dir / "checkpoints", storage, owner, settings.CACHE_BYTES)
    return ObjectCheckpointStore(
        storage, cache, owner, locks, grace_s=settings.STORAGE_SWEEP_GRACE_S
    )
