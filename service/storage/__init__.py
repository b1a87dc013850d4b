"""Object storage for checkpoints and datasets when they live outside the data dir.

`ObjectStorage` is the little bnserve needs from a bucket: put a whole object from a local file,
get one to a local file, check, delete and list. An object is visible only complete (S3's PUT
and multipart completion are atomic), so a reader never sees half an object; what guarantees
that a row names only objects that exist is the order (object first, then the row), kept by the
stores that use this (service/checkpoints/remote.py, service/datasets/store.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # timezone-aware, as the store reports it


class ObjectMissing(Exception):
    """The object does not exist (any more)."""


class ObjectStorage(Protocol):
    """Keys are `/`-separated paths below the storage's own prefix."""

    def put_file(self, key: str, path: Path) -> None:
        """Store `path`'s bytes under `key`, streamed (never read whole into memory)."""

    def get_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` (a new file); ObjectMissing when there is none."""

    def info(self, key: str) -> ObjectInfo | None:
        """The object's size and age, or None when it does not exist."""

    def delete(self, key: str) -> None:
        """Remove the object (no error when it is already gone)."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`."""

    def describe(self) -> str:
        """Where the objects are, for messages (never a credential)."""


def open_storage(url: str) -> ObjectStorage:
    """The storage for `BNSERVE_STORAGE_URL` (`s3://bucket/prefix`)."""
    from service.storage.s3 import S3Storage

    return S3Storage.from_url(url)
