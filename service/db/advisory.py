"""PostgreSQL advisory locks: what file locks do on one host, across every host of a database.

With remote storage, replicas share no folder, so a lock that must hold across them lives in the
database. Each lock is a 64-bit key derived from its name (a sha256 prefix, so names never need
a registry of numbers). Locks are session locks on connections of their own engine, apart from
the pool that serves requests: a publisher that holds one across an upload can never starve the
request pool, and a process that dies (kill -9, a lost host) loses its connection and so its locks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, text


def lock_key(name: str) -> int:
    """A signed 64-bit key for `name` (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class AdvisoryLocks:
    """Named shared/exclusive locks; publishers share one, the sweep takes it exclusively."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        if not url.startswith("postgresql"):
            raise ValueError("advisory locks need PostgreSQL")
        self._engine: Engine = create_engine(
            url, pool_pre_ping=True, pool_size=pool_size, max_overflow=16
        )

    def close(self) -> None:
        self._engine.dispose()

    def acquire_shared(self, name: str) -> Connection:
        """Wait for `name` in shared mode; held until `release` of the returned connection."""
        conn = self._engine.connect()
        try:
            conn.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": lock_key(name)})
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Release every lock `conn` holds and give the connection back."""
        try:
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
            conn.commit()
        finally:
            conn.close()

    @contextmanager
    def shared(self, name: str) -> Iterator[None]:
        conn = self.acquire_shared(name)
        try:
            yield
        finally:
            self.release(conn)

    @contextmanager
    def try_exclusive(self, name: str) -> Iterator[bool]:
        """Take `name` exclusively if nobody holds it; yields whether it was taken."""
        with self._engine.connect() as conn:
            taken = bool(
                conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)}
                ).scalar()
            )
            conn.commit()
            try:
                yield taken
            finally:
                if taken:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(name)})
                    conn.commit()
