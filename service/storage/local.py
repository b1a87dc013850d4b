"""Objects as files under a folder: the `ObjectStorage` contract without a bucket.

Not what an unset `BNSERVE_STORAGE_URL` uses (that keeps the data dir's own layout and file
locks, service/checkpoints/store.py); it lets the object-based stores run and be tested where no
S3 endpoint is, with the same atomicity: a temp file, fsynced, then renamed into place.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from service.files import fsync_dir, fsync_file
from service.storage import ObjectInfo, ObjectMissing

_TEMP = ".part"


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    def put_file(self, key: str, path: Path) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Unique per put: two puts of the same key (identical uploads at once) never share one.
        temp = final.with_name(f"{final.name}.{secrets.token_hex(8)}{_TEMP}")
        shutil.copyfile(path, temp)
        fsync_file(temp)
        temp.replace(final)
        fsync_dir(final.parent)

    def get_file(self, key: str, dest: Path) -> None:
        try:
            with self._path(key).open("rb") as src, dest.open("xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not key.endswith(_TEMP) and key.startswith(prefix):
                info = self.info(key)
                if info is not None:
                    yield info

    def describe(self) -> str:
        return str(self.root)
