"""The SQLAlchemy engine for SQLite or PostgreSQL, and schema migration on start."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# An execution option that marks a connection's transactions as reads (see `read_sessions`).
READ_ONLY = "bnserve_read_only"


def make_engine(url: str, *, busy_timeout_s: float = 30.0, pool_size: int = 5) -> Engine:
    """An engine tuned for many processes sharing one database.

    `pool_size` connections are kept (and as many again may open under load); `busy_timeout_s`
    is how long a SQLite writer waits for another's write lock before its
    statement fails with "database is locked" (a transient error, retried where that is safe).
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=max(10, pool_size),
        )
        _make_sqlite_transactional(engine, busy_timeout_s)
        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max(10, pool_size)
    )


def engine_for(settings: Settings) -> Engine:
    """The engine for `BNSERVE_DATABASE_URL`, sized and timed by the settings."""
    return make_engine(
        settings.database_url,
        busy_timeout_s=settings.DB_BUSY_TIMEOUT_S,
        pool_size=settings.db_connections(),
    )


def _make_sqlite_transactional(engine: Engine, busy_timeout_s: float) -> None:
    """WAL for concurrent readers, and BEGIN IMMEDIATE so two writers never both read-then-write.

    pysqlite's own transaction handling defers BEGIN and so allows lost updates between processes;
    SQLAlchemy documents taking it over like this ("Serializable isolation / Savepoints /
    Transactional DDL" in its SQLite dialect notes). Transactions of `read_sessions` begin
    DEFERRED instead: in WAL mode a reader sees a snapshot beside a writer, so reads never queue
    behind (or hold up) the one write lock.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def read_sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions on the same engine for transactions that only read (they must never write).

    On SQLite they take no write lock, so a slow or stuck writer (another process, a long
    migration, an operator's `sqlite3` shell) does not hold up reads; on PostgreSQL they are the
    same as any session.
    """
    bind = sessions.kw["bind"]
    return sessionmaker(bind.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def migrate(engine: Engine, data_dir: Path) -> None:
    """Bring the schema to the newest revision; safe when several processes start at once."""
    with _migration_lock(engine, data_dir), engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def _migration_lock(engine: Engine, data_dir: Path) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        # A session-level advisory lock: one migrator at a time across every host.
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7243901)"))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7243901)"))
                conn.commit()
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
