"""Checkpoint versions in object storage (`BNSERVE_STORAGE_URL=s3://...`), shared by every host.

Key: `checkpoints/<model id>/<sha256>.safetensors`, content-addressed, so an object never
changes once written and needs no rename. A version is published in the registry's three steps
with other meanings: `stage` writes the bytes to a local temp file and puts the whole object
(multipart above 64 MiB), the registry commits the row, `publish` keeps the temp file as this
process's cached copy. A row therefore names only an object that exists. A crash (or a failed
commit) after the put leaves at most an unreferenced object; `discard` does not delete it, since
identical bytes may be a committed version of the same model, and `recover` (the sweep, run at
start and periodically) removes unreferenced objects older than `BNSERVE_STORAGE_SWEEP_GRACE_S`.

A publish holds a shared PostgreSQL advisory lock from before its put until after its commit;
the sweep takes it exclusively, or skips that round. So no sweep lists, reads the rows and
deletes while any replica is between a put and its commit, and the grace covers the rest (a
publish that did not take the lock, clock differences between hosts and the store).
Reads go through the local cache (service/storage/cache.py), which verifies the sha256 when it
downloads; each read hashes its copy again, as the local store does.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Connection

from service.checkpoints.store import StagedCheckpoint, version_filename
from service.db.advisory import AdvisoryLocks
from service.errors import CorruptCheckpoint
from service.files import Owner, disk_full_as_error, write_durably
from service.storage import ObjectStorage
from service.storage.cache import LocalCache
from service.storage.sweep import SWEEP_LOCK, sweep

PREFIX = "checkpoints/"
SUFFIX = ".safetensors"


def object_key(model_id: str, sha256: str) -> str:
    return f"{PREFIX}{model_id}/{sha256}{SUFFIX}"


class ObjectCheckpointStore:
    """The `CheckpointStore` interface over an `ObjectStorage` and a local cache."""

    def __init__(
        self,
        storage: ObjectStorage,
        cache: LocalCache,
        owner: Owner,
        locks: AdvisoryLocks | None,
        *,
        grace_s: float,
        crash_after_put: bool = False,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.owner = owner
        self.locks = locks
        self.grace_s = grace_s
        self.root = cache.root  # where local bytes go (a full disk there is a 507)
        self._held: dict[str, Connection] = {}  # staged temp path -> its lock connection
        self.crash_after_put = crash_after_put  # BNSERVE_TEST_CRASH_POINT, tests only

    def close(self) -> None:
        if self.locks is not None:
            self.locks.close()

    def model_dir(self, model_id: str) -> Path:
        """No local folder per model: copies are named by sha256 (see the cache)."""
        return self.root / model_id

    def stage(self, model_id: str, data: bytes) -> StagedCheckpoint:
        sha = hashlib.sha256(data).hexdigest()
        temp = self.owner.temp_path(self.root, tag=sha)
        locks = self.locks
        # Held until `publish` or `discard`, after the registry's commit (module docstring).
        conn = locks.acquire_shared(SWEEP_LOCK) if locks is not None else None
        try:
            with disk_full_as_error(self.root):
                write_durably(temp, [data])
            self.storage.put_file(object_key(model_id, sha), temp)
            if self.crash_after_put:
                os.kill(os.getpid(), signal.SIGKILL)
        except BaseException:
            temp.unlink(missing_ok=True)
            if locks is not None and conn is not None:
                locks.release(conn)
            raise
        if conn is not None:
            self._held[str(temp)] = conn
        return StagedCheckpoint(model_id, temp, sha, len(data))

    def _release(self, staged: StagedCheckpoint) -> None:
        conn = self._held.pop(str(staged.path), None)
        if conn is not None and self.locks is not None:
            self.locks.release(conn)

    def publish(self, staged: StagedCheckpoint, version: int) -> str:
        """The row is committed: keep the uploaded bytes as the local copy, end the publish."""
        try:
            self.cache.adopt(staged.path, staged.sha256, SUFFIX)
        finally:
            self._release(staged)
        return version_filename(version)

    def discard(self, staged: StagedCheckpoint) -> None:
        """No row was committed. The object stays for the sweep: the same bytes may back a
        version of this model that another publish committed meanwhile."""
        staged.path.unlink(missing_ok=True)
        self._release(staged)

    def read(self, model_id: str, filename: str, sha256: str) -> bytes:
        with self.open_verified(model_id, filename, sha256) as handle:
            return handle.read()

    def open_verified(self, model_id: str, filename: str, sha256: str) -> BinaryIO:
        """The version's bytes, downloaded (verified) if this host has no copy, hashed again."""
        what = f"checkpoint {filename} of model {model_id}"
        key = object_key(model_id, sha256)
        for attempt in range(2):
            with self.cache.fetched(
                key, sha256, what=what, code="corrupt_checkpoint", missing="checkpoint_missing"
            ) as path:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:  # evicted by another process on this host: again
                    continue
                found = hashlib.file_digest(handle, "sha256").hexdigest()
                if found == sha256:
                    handle.seek(0)
                    return handle
                handle.close()
                # The local copy went bad after it was checked: drop it, download once more.
                self.cache.drop(sha256, SUFFIX)
                if attempt:
                    raise CorruptCheckpoint(
                        f"{what}: its local copy hashes to {found}, not {sha256}",
                        expected_sha256=sha256,
                        found_sha256=found,
                    )
        raise CorruptCheckpoint(f"{what} could not be kept in the local cache")

    def delete_model(self, model_id: str) -> None:
        """Rows are gone: remove the model's objects (ids are never reused)."""
        for info in list(self.storage.list(f"{PREFIX}{model_id}/")):
            self.storage.delete(info.key)

    def recover(self, read_known: Callable[[], dict[str, dict[str, str]]]) -> list[str]:
        """Sweep objects no row names and older than the grace; returns what it removed."""
        return sweep(
            self.storage,
            self.locks,
            PREFIX,
            lambda: {
                object_key(model_id, sha)
                for model_id, files in read_known().items()
                for sha in files.values()
            },
            self.grace_s,
            what="checkpoint",
        )
