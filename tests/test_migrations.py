"""Schema migrations on start: an older database is upgraded in place, keeping its rows."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from service.db.engine import MIGRATIONS_DIR, make_engine, migrate


def _upgrade_to(engine, revision: str) -> None:
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _check_upgrade_keeps_rows(url: str, data_dir: Path) -> None:
    engine = make_engine(url)
    _upgrade_to(engine, "0001")
    assert "phase" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, name, architecture, config, last_version, created_at) "
                "VALUES ('abc', 'kept', 'mlp_bn', '{}', 3, CURRENT_TIMESTAMP)"
            )
        )
    migrate(engine, data_dir)  # what every start does
    migrate(engine, data_dir)  # and again: a no-op
    assert "phase" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert "serving" in {c["name"] for c in inspect(engine).get_columns("models")}
    assert {"kept_epoch", "stop_reason"} <= {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.begin() as conn:
        assert conn.execute(text("SELECT name, last_version, serving FROM models")).all() == [
            ("kept", 3, None)
        ]
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"
    engine.dispose()


def test_sqlite_database_from_an_older_release_is_upgraded(tmp_path: Path):
    _check_upgrade_keeps_rows(f"sqlite:///{tmp_path / 'old.db'}", tmp_path)


def test_postgres_database_from_an_older_release_is_upgraded(postgres_url: str, tmp_path: Path):
    _check_upgrade_keeps_rows(
        postgres_url.replace("postgresql://", "postgresql+psycopg://"), tmp_path
    )
