"""Datasets in object storage (`BNSERVE_STORAGE_URL=s3://...`), like checkpoint versions.

Key: `datasets/<sha256>.<suffix>` (the row's filename), content-addressed. `add` puts the whole
object between the staging rename and the row's commit, holding the shared sweep lock across
both, so a row names only an object that exists and no sweep runs between them; a failed commit
or a crash leaves at most an unreferenced object, which the sweep removes after the grace. Reads
(`load` in the worker, `labels` when an API replica checks a job) go through the local cache,
which verifies the sha256 of each download (a mismatch is `corrupt_dataset`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.datasets.reader import DEFAULT_MAX_BYTES
from service.datasets.store import DatasetStore
from service.db.advisory import AdvisoryLocks
from service.db.tables import DatasetRow
from service.errors import CorruptCheckpoint
from service.files import Owner, sha256_file
from service.storage import ObjectStorage
from service.storage.cache import LocalCache
from service.storage.sweep import SWEEP_LOCK, sweep

PREFIX = "datasets/"


def dataset_key(filename: str) -> str:
    return PREFIX + filename


class ObjectDatasetStore(DatasetStore):
    def __init__(
        self,
        cache: LocalCache,
        owner: Owner,
        sessions: sessionmaker[Session],
        locks: AdvisoryLocks | None,
        *,
        grace_s: float,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_image_pixels: int = 4096 * 4096,
        max_files: int = 100_000,
    ) -> None:
        super().__init__(
            cache.root,
            owner,
            sessions,
            max_bytes=max_bytes,
            max_image_pixels=max_image_pixels,
            max_files=max_files,
        )
        self.cache = cache
        self.storage: ObjectStorage = cache.storage
        self.locks = locks
        self.grace_s = grace_s

    def _insert(self, staged: Path, row: DatasetRow) -> None:
        conn = self.locks.acquire_shared(SWEEP_LOCK) if self.locks else None
        try:
            self.storage.put_file(dataset_key(row.filename), staged)
            super()._insert(staged, row)
        finally:
            if conn is not None and self.locks is not None:
                self.locks.release(conn)

    def _keep(self, staged: Path, final: Path, row: DatasetRow) -> None:
        self.cache.adopt(staged, row.sha256, Path(row.filename).suffix)

    @contextmanager
    def _verified(self, row: DatasetRow) -> Iterator[Path]:
        """The cached copy, pinned against eviction until the caller has read it."""
        what = f"dataset file {row.filename}"
        with self.cache.fetched(
            dataset_key(row.filename),
            row.sha256,
            what=what,
            code="corrupt_dataset",
            missing="dataset_missing",
        ) as path:
            found = sha256_file(path)
            if found != row.sha256:
                # The local copy went bad after its download was checked: the next read
                # fetches it again.
                self.cache.drop(row.sha256, Path(row.filename).suffix)
                raise CorruptCheckpoint(
                    f"{what}: its local copy hashes to {found}, not {row.sha256}",
                    code="corrupt_dataset",
                )
            yield path

    @contextmanager
    def _unverified(self, row: DatasetRow) -> Iterator[Path]:
        with self._verified(row) as path:
            yield path

    def recover(self) -> list[str]:
        """Sweep dataset objects that no row names, once older than the grace."""

        def referenced() -> set[str]:
            return {dataset_key(row.filename) for row in self.all()}

        return sweep(self.storage, self.locks, PREFIX, referenced, self.grace_s, what="dataset")
