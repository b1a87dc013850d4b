"""The stores a process uses: the data dir's, or object storage with a local cache.

One function for the API process and the training worker, so both pick the same by
`BNSERVE_STORAGE_URL` and neither can write where the other does not read.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.checkpoints.remote import ObjectCheckpointStore
from service.checkpoints.store import CheckpointStore
from service.datasets.remote import ObjectDatasetStore
from service.datasets.store import DatasetStore
from service.db.advisory import AdvisoryLocks
from service.files import Owner
from service.settings import Settings
from service.storage import ObjectStorage, open_storage
from service.storage.cache import LocalCache

AnyCheckpointStore = CheckpointStore | ObjectCheckpointStore


def open_stores(
    settings: Settings,
    owner: Owner,
    sessions: sessionmaker[Session],
    storage: ObjectStorage | None = None,
) -> tuple[AnyCheckpointStore, DatasetStore]:
    """The checkpoint and dataset stores for these settings (not yet recovered)."""
    limits: dict[str, int] = {
        "max_bytes": settings.max_dataset_bytes,
        "max_image_pixels": settings.MAX_IMAGE_PIXELS,
        "max_files": settings.MAX_DATASET_FILES,
    }
    if not settings.remote_storage:
        return CheckpointStore(settings.checkpoint_dir, owner), DatasetStore(
            settings.dataset_dir, owner, sessions, **limits
        )
    storage = storage or open_storage(settings.STORAGE_URL)
    # Database locks for what crosses hosts (remote storage needs PostgreSQL, see settings);
    # the checkpoint store closes them with the registry.
    locks = AdvisoryLocks(settings.database_url)
    grace = settings.STORAGE_SWEEP_GRACE_S
    cache = settings.cache_dir
    # One budget for both caches, shared out: half for versions, half for datasets.
    share = settings.CACHE_BYTES // 2
    checkpoints = ObjectCheckpointStore(
        storage,
        LocalCache(cache / "checkpoints", storage, owner, share),
        owner,
        locks,
        grace_s=grace,
        crash_after_put=settings.TEST_CRASH_POINT == "after_object_put",
    )
    datasets = ObjectDatasetStore(
        LocalCache(cache / "datasets", storage, owner, share),
        owner,
        sessions,
        locks,
        grace_s=grace,
        **limits,
    )
    return checkpoints, datasets
