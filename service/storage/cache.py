"""A bounded local copy of remote objects, per process or host, verified on the way in.

Objects are content-addressed, so a copy is named by its sha256 and can never be stale: a file
here is either the right bytes or gone. A download goes to a temp file (named by this process's
`Owner`, so a dead downloader's leftovers are swept) and is renamed into place only after it
hashed to what its row recorded; a mismatch is refused as `corrupt_checkpoint` and nothing is
kept. When the copies pass `max_bytes` the least recently used go, except those being read now
and those `in_use` names (the versions this process has loaded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import CorruptCheckpoint, NotFound
from service.files import Owner, fsync_file, temp_owner
from service.storage import ObjectMissing, ObjectStorage

log = logging.getLogger(__name__)


class LocalCache:
    def __init__(self, root: Path, storage: ObjectStorage, owner: Owner, max_bytes: int) -> None:
        self.root = root
        self.storage = storage
        self.owner = owner
        self.max_bytes = max_bytes
        self.in_use: Callable[[], set[str]] = set  # sha256s never to evict (the loaded versions)
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        owner.sweep(root)

    def path(self, sha256: str, suffix: str) -> Path:
        return self.root / f"{sha256}{suffix}"

    @contextmanager
    def fetched(
        self, key: str, sha256: str, *, what: str, code: str, missing: str
    ) -> Iterator[Path]:
        """The verified local copy of object `key`, kept from eviction for the block."""
        suffix = Path(key).suffix
        with self._lock:
            self._pins[sha256] += 1
        try:
            path = self.path(sha256, suffix)
            try:
                os.utime(path)  # the LRU order is the files' mtimes, shared by local processes
            except FileNotFoundError:  # not here, or evicted just now by another process
                self._download(key, sha256, path, what=what, code=code, missing=missing)
            yield path
        finally:
            with self._lock:
                self._pins[sha256] -= 1
                if not self._pins[sha256]:
                    del self._pins[sha256]
            self.evict()

    def _download(
        self, key: str, sha256: str, path: Path, *, what: str, code: str, missing: str
    ) -> None:
        temp = self.owner.temp_path(self.root, tag=sha256)
        try:
            try:
                self.storage.get_file(key, temp)
            except ObjectMissing:
                raise NotFound(
                    f"{what} is missing from {self.storage.describe()} (object {key})",
                    code=missing,
                ) from None
            with temp.open("rb") as handle:
                found = hashlib.file_digest(handle, "sha256").hexdigest()
            if found != sha256:
                raise CorruptCheckpoint(
                    f"{what} is corrupt in {self.storage.describe()}: its sha256 is {found}, the "
                    f"registry recorded {sha256}; refusing it (restore the object or upload it "
                    "again)",
                    code=code,
                    expected_sha256=sha256,
                    found_sha256=found,
                )
            fsync_file(temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def adopt(self, temp: Path, sha256: str, suffix: str) -> None:
        """Keep a file this process just uploaded (its bytes hashed on the way) as a copy."""
        os.replace(temp, self.path(sha256, suffix))
        self.evict()

    def drop(self, sha256: str, suffix: str) -> None:
        self.path(sha256, suffix).unlink(missing_ok=True)

    def evict(self) -> list[str]:
        """Remove the least recently used copies until they fit in `max_bytes`."""
        try:
            keep = set(self.in_use())
        except RuntimeError:  # the loaded set changed while read: evict next time instead
            return []
        with self._lock:
            keep |= set(self._pins)
        entries = []
        for path in self.root.iterdir():
            if temp_owner(path) is not None or not path.is_file():
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed: list[str] = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path.name.split(".")[0] in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path.name)
        if removed:
            log.info(
                "cache: evicted %d copies to stay within %d bytes", len(removed), self.max_bytes
            )
        return removed
