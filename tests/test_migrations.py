"""Schema migrations on start: an older database is upgraded in place, keeping its rows."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from service.db.engine import MIGRATIONS_DIR, make_engine, migrate


def _head() -> str:
    """The newest revision: one head, so every migration chain ends in one schema."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return str(heads[0])


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
    assert {"serving", "preprocess"} <= {c["name"] for c in inspect(engine).get_columns("models")}
    # 0004: jobs outlive their model (no cascade), datasets keep their key.
    referred = {fk["referred_table"] for fk in inspect(engine).get_foreign_keys("jobs")}
    assert {"kept_epoch", "stop_reason"} <= {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert referred == {"datasets"}
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT name, last_version, serving, preprocess FROM models"))
        assert rows.all() == [("kept", 3, None, None)]
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head()
    engine.dispose()


def test_sqlite_database_from_an_older_release_is_upgraded(tmp_path: Path):
    _check_upgrade_keeps_rows(f"sqlite:///{tmp_path / 'old.db'}", tmp_path)


def test_postgres_database_from_an_older_release_is_upgraded(postgres_url: str, tmp_path: Path):
    _check_upgrade_keeps_rows(
        postgres_url.replace("postgresql://", "postgresql+psycopg://"), tmp_path
    )
