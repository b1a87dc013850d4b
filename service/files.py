"""Crash-safe file primitives shared by the checkpoint and dataset stores.

A file becomes visible under its final name only complete and on disk: it is written to a temp
file in the same folder, flushed, fsynced, moved with `os.replace` (atomic on POSIX within one
file system) and the folder is fsynced so the rename itself survives a power loss.

Temp files carry the token of the process that writes them. Each process holds an exclusive
`flock` on `<root>/.owners/<token>.lock` for its whole life, so on start a process can tell a
dead writer's leftovers (lock free) from a live one's (lock held), on this host or any host that
shares the folder with working locks, without guessing from file ages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from service.errors import InsufficientStorage

TMP_SUFFIX = ".tmp"
CHUNK = 1 << 20
# No space left on the device, or the user's disk quota reached.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"
_PG_DISK_FULL = "53100"  # PostgreSQL's disk_full SQLSTATE


def disk_full_cause(exc: BaseException) -> str | None:
    """ "files" or "database" when `exc` (or what caused it) is a full disk or quota, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return "files"
        # sqlite3.OperationalError / psycopg errors, possibly wrapped by SQLAlchemy (`.orig`).
        for candidate in (current, getattr(current, "orig", None)):
            if getattr(candidate, "sqlite_errorcode", None) == _SQLITE_FULL:
                return "database"
            if getattr(candidate, "sqlstate", None) == _PG_DISK_FULL:
                return "database"
        current = current.__cause__ or current.__context__
    return None


def insufficient_storage(folder: Path, cause: str) -> InsufficientStorage:
    what = (
        "the disk" if cause == "files" else "the database's disk (SQLite keeps it in the data dir)"
    )
    return InsufficientStorage(
        f"no space left storing under {folder.resolve()}: {what} is full or over quota; nothing "
        "was kept. Free space in the data dir (BNSERVE_DATA_DIR) and retry",
        folder=str(folder.resolve()),
    )


@contextlib.contextmanager
def disk_full_as_error(folder: Path) -> Iterator[None]:
    """Turn a full disk or quota while storing under `folder` into InsufficientStorage (507)."""
    try:
        yield
    except InsufficientStorage:
        raise
    except Exception as exc:
        cause = disk_full_cause(exc)
        if cause is None:
            raise
        raise insufficient_storage(folder, cause) from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Owner:
    """This process's identity for temp files, kept alive by a held lock."""

    def __init__(self, root: Path) -> None:
        self._dir = root / ".owners"
        self._dir.mkdir(parents=True, exist_ok=True)
        while True:
            self.token = secrets.token_hex(8)
            self._lock_path = self._dir / f"{self.token}.lock"
            lock = open(self._lock_path, "w")  # noqa: SIM115 - held for life
            # A sweeper that opened the file between our open and flock found it unlocked and
            # is removing it (or has: the lock would then be on an unlinked inode and prove
            # nothing); either way, start again under a new token.
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if _same_file(self._lock_path, lock):
                break
            lock.close()
        self._lock: IO[str] | None = lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            self._lock_path.unlink(missing_ok=True)

    def is_alive(self, token: str) -> bool:
        """Whether the process that owns `token` still runs (its lock is held)."""
        if token == self.token:
            return True
        path = self._dir / f"{token}.lock"
        try:
            with open(path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                path.unlink(missing_ok=True)
                return False
        except FileNotFoundError:
            return False

    def sweep_owners(self) -> int:
        """Remove the lock files of dead processes (a SIGKILL leaves them); returns how many."""
        removed = 0
        for path in self._dir.glob("*.lock"):
            if not self.is_alive(path.stem):
                removed += 1
        return removed

    def temp_path(self, folder: Path, tag: str = "") -> Path:
        """A fresh temp name in `folder` that says who writes it (and, optionally, what)."""
        name = f".{tag + '.' if tag else ''}{self.token}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        return folder / name

    def sweep(self, folder: Path) -> list[Path]:
        """Delete temp files in `folder` whose writer is dead; returns what was removed."""
        removed: list[Path] = []
        if not folder.is_dir():
            return removed
        for path in folder.iterdir():
            token = temp_owner(path)
            if token is not None and not self.is_alive(token):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def _same_file(path: Path, handle: IO[str]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def temp_owner(path: Path) -> str | None:
    """The owner token of a temp file name, or None when `path` is not one of ours."""
    if not (path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)):
        return None
    parts = path.name[1 : -len(TMP_SUFFIX)].split(".")
    return parts[-2] if len(parts) >= 2 else None


def temp_tag(path: Path) -> str | None:
    parts = path.name[1 : -len(TMP_SUFFIX)].split(".")
    return parts[0] if len(parts) == 3 else None


def write_durably(path: Path, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write and fsync `path` (a temp name); returns (sha256, size).

    On any failure (a full disk above all) the partial file is removed at once.
    """
    digest = hashlib.sha256()
    size = 0
    handle = open(path, "xb")  # noqa: SIM115 - closed below; only a file we created is removed
    try:
        with handle:
            for chunk in chunks:
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def publish(temp: Path, final: Path) -> None:
    """Move a complete temp file to its final name so that the move survives a crash."""
    os.replace(temp, final)
    fsync_dir(final.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
