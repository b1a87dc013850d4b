"""The registry and checkpoint store used directly, on SQLite and on PostgreSQL.

Version numbering, serving state, crash recovery of the checkpoint folder, and migrations, with
several threads and several processes (each with its own engine) at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import StatementError

from service.checkpoints.store import CheckpointStore
from service.checkpoints.validation import state_dict_to_safetensors
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.errors import Conflict, InvalidInput, NotFound
from service.files import Owner
from service.registry import Registry
from tests.conftest import make_settings, trained_state_dict


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLAlchemy URL for an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return make_settings(tmp_path / "data").database_url
    raw = request.getfixturevalue("postgres_url")
    return make_settings(tmp_path / "data", DATABASE_URL=raw).database_url


class Replica:
    """What one process opens: its own engine, owner lock, store and registry."""

    def __init__(self, db_url: str, data_dir: Path) -> None:
        self.engine = make_engine(db_url)
        migrate(self.engine, data_dir)
        self.owner = Owner(data_dir)
        self.store = CheckpointStore(data_dir / "checkpoints", self.owner)
        self.registry = Registry(make_sessionmaker(self.engine), self.store)

    def close(self) -> None:
        self.owner.close()
        self.engine.dispose()


@pytest.fixture
def open_replica(db_url: str, tmp_path: Path) -> Iterator[Any]:
    opened: list[Replica] = []

    def _open() -> Replica:
        replica = Replica(db_url, tmp_path / "data")
        opened.append(replica)
        return replica

    yield _open
    for replica in opened:
        replica.close()


@pytest.fixture
def registry(open_replica: Any) -> Registry:
    reg: Registry = open_replica().registry
    return reg


def weights(seed: int) -> bytes:
    return state_dict_to_safetensors(trained_state_dict("mlp_bn", seed=seed))


def files_of(registry: Registry, name: str) -> list[str]:
    folder = registry.store.model_dir(registry.get_model(name).id)
    return sorted(p.name for p in folder.iterdir())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Models


def test_create_list_get_delete_models(registry: Registry):
    registry.create_model("b", "mlp_bn", {})
    registry.create_model("a", "mlp_bn", {"in_features": 3})
    assert [m.name for m in registry.list_models()] == ["a", "b"]
    assert registry.get_model("a").config["in_features"] == 3
    with pytest.raises(Conflict):
        registry.create_model("a", "mlp_bn", {})
    with pytest.raises(InvalidInput):
        registry.create_model("Bad Name", "mlp_bn", {})
    with pytest.raises(InvalidInput):
        registry.create_model("c", "no_such_arch", {})

    registry.add_version("a", weights(0), source="upload")
    folder = registry.store.model_dir(registry.get_model("a").id)
    assert folder.is_dir()
    registry.delete_model("a")
    assert not folder.exists()
    assert [m.name for m in registry.list_models()] == ["b"]
    with pytest.raises(NotFound):
        registry.get_model("a")
    with pytest.raises(NotFound):
        registry.delete_model("a")


def test_concurrent_creates_of_one_name_give_one_model_and_conflicts(open_replica: Any):
    """Each thread with its own engine, as separate processes would be."""
    replicas = [open_replica() for _ in range(6)]
    barrier = threading.Barrier(len(replicas))
    outcomes: list[str] = []

    def create(replica: Replica) -> None:
        barrier.wait()
        try:
            replica.registry.create_model("same", "mlp_bn", {})
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")
        except BaseException as exc:
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=create, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["conflict"] * 5 + ["created"]


def test_versions_serving_and_serving_map(registry: Registry):
    registry.create_model("m", "mlp_bn", {})
    registry.create_model("idle", "mlp_bn", {})
    data = [weights(seed) for seed in range(3)]
    rows = [registry.add_version("m", d, source="upload", note=f"n{i}") for i, d in enumerate(data)]
    assert [r.version for r in rows] == [1, 2, 3]
    assert [r.sha256 for r in rows] == [sha(d) for d in data]
    assert files_of(registry, "m") == ["v1.safetensors", "v2.safetensors", "v3.safetensors"]
    assert registry.serving_map() == {"m": None, "idle": None}

    registry.set_serving("m", 2)
    assert registry.serving_map() == {"m": 2, "idle": None}
    assert registry.get_model("m").promoted_at is not None
    with pytest.raises(NotFound):
        registry.set_serving("m", 9)
    with pytest.raises(NotFound):
        registry.set_serving("nope", 1)
    assert registry.serving_map()["m"] == 2

    _, row, read = registry.read_checkpoint("m", 3)
    assert read == data[2]
    assert row.note == "n2"
    assert [v.version for v in registry.list_versions("m")] == [1, 2, 3]


def test_failed_insert_leaves_no_gap_and_no_file(registry: Registry):
    registry.create_model("m", "mlp_bn", {})
    registry.add_version("m", weights(0), source="upload")
    # Not JSON: the insert fails inside the transaction that took the number.
    with pytest.raises((TypeError, StatementError)):
        registry.add_version("m", weights(1), source="upload", report={"bad": object()})
    assert registry.add_version("m", weights(2), source="upload").version == 2
    assert files_of(registry, "m") == ["v1.safetensors", "v2.safetensors"]


def test_version_numbers_gap_free_under_concurrent_threads(registry: Registry):
    registry.create_model("m", "mlp_bn", {})
    data = [weights(seed) for seed in range(4)]
    got: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def add(thread: int) -> None:
        try:
            for i in range(4):
                d = data[(thread + i) % len(data)]
                row = registry.add_version("m", d, source="upload")
                with lock:
                    got.append((row.version, row.sha256))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(v for v, _ in got) == list(range(1, 33))
    recorded = {v.version: v.sha256 for v in registry.list_versions("m")}
    assert recorded == dict(got)
    model_id = registry.get_model("m").id
    for version, digest in got:
        assert registry.store.read(model_id, f"v{version}.safetensors", digest)
    assert len(files_of(registry, "m")) == 32


def _process_adds(db_url: str, data_dir: str, name: str, count: int) -> list[int]:
    """One process: its own engine, migration and registry, racing the others."""
    replica = Replica(db_url, Path(data_dir))
    try:
        with contextlib.suppress(Conflict):  # all three try; exactly one creates it
            replica.registry.create_model(name, "mlp_bn", {})
        data = uuid.uuid4().bytes * 64  # the store takes any bytes; each process its own
        return [
            replica.registry.add_version(name, data, source="upload").version for _ in range(count)
        ]
    finally:
        replica.close()


@pytest.mark.slow
def test_processes_migrate_and_number_versions_at_once(db_url: str, tmp_path: Path):
    """Three processes start on an empty database together: one schema, unique gap-free numbers."""
    data_dir = tmp_path / "data"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_process_adds, [(db_url, str(data_dir), "m", 6)] * 3, chunksize=1)
    numbers = sorted(v for result in results for v in result)
    assert numbers == list(range(1, 19))
    for result in results:
        assert result == sorted(result)  # each process sees its own numbers increase

    replica = Replica(db_url, data_dir)
    try:
        assert [v.version for v in replica.registry.list_versions("m")] == numbers
        assert len(files_of(replica.registry, "m")) == 18
        assert_one_head(replica.engine)
    finally:
        replica.close()


def assert_one_head(engine: Engine) -> None:
    with engine.connect() as conn:
        heads = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert len(heads) == 1
    assert {"models", "versions", "datasets", "jobs"} <= set(inspect(engine).get_table_names())


def test_migration_runs_twice(db_url: str, tmp_path: Path):
    engine = make_engine(db_url)
    try:
        migrate(engine, tmp_path / "data")
        migrate(engine, tmp_path / "data")
        assert_one_head(engine)
    finally:
        engine.dispose()


# Crash recovery of the checkpoint folder


def test_recover_removes_dead_owners_temp_and_keeps_a_live_ones(open_replica: Any):
    a, b, c = open_replica(), open_replica(), open_replica()
    a.registry.create_model("m", "mlp_bn", {})
    model_id = a.registry.get_model("m").id
    dead = b.store.stage(model_id, weights(1))
    live = c.store.stage(model_id, weights(2))
    # SIGKILL leaves the lock file behind, unlocked: that is how a dead owner looks.
    lock_file = b.owner._lock_path
    b.owner.close()
    lock_file.touch()

    actions = a.registry.recover_store()
    assert not dead.path.exists()
    assert live.path.exists()
    assert any("removed temp file" in act for act in actions)
    assert not lock_file.exists()  # the dead owner's lock file goes with its temp files


def test_recover_rolls_forward_a_committed_row_whose_file_was_never_renamed(
    open_replica: Any, monkeypatch: pytest.MonkeyPatch
):
    a, b = open_replica(), open_replica()
    a.registry.create_model("m", "mlp_bn", {})
    data = weights(3)
    # b "crashes" between the commit and the rename.
    monkeypatch.setattr(b.store, "publish", lambda staged, version: None)
    row = b.registry.add_version("m", data, source="upload")
    b.owner.close()
    assert "v1.safetensors" not in files_of(a.registry, "m")

    actions = a.registry.recover_store()
    assert actions == [f"rolled forward {a.registry.get_model('m').id}/v1.safetensors"]
    assert files_of(a.registry, "m") == ["v1.safetensors"]
    assert a.registry.read_checkpoint("m", 1)[2] == data
    assert row.sha256 == sha(data)


def test_recover_removes_orphan_checkpoints_and_folders(registry: Registry):
    registry.create_model("m", "mlp_bn", {})
    registry.add_version("m", weights(0), source="upload")
    folder = registry.store.model_dir(registry.get_model("m").id)
    (folder / "v7.safetensors").write_bytes(b"no row says this exists")
    orphan = registry.store.root / uuid.uuid4().hex
    orphan.mkdir()
    (orphan / "v1.safetensors").write_bytes(b"its model was deleted")

    actions = registry.recover_store()
    assert sorted(p.name for p in folder.iterdir()) == ["v1.safetensors"]
    assert not orphan.exists()
    assert len(actions) == 2
    assert registry.recover_store() == []  # nothing left to do


def test_recovery_by_a_starting_replica_does_not_break_a_publish_in_progress(
    open_replica: Any, monkeypatch: pytest.MonkeyPatch
):
    """Replica b starts (and recovers) while a is between its commit and its rename."""
    a = open_replica()
    a.registry.create_model("m", "mlp_bn", {})
    b = open_replica()
    publish = a.store.publish

    def publish_after_b_recovers(staged: Any, version: int) -> str:
        b.registry.recover_store()  # rolls a's live temp forward
        return publish(staged, version)

    monkeypatch.setattr(a.store, "publish", publish_after_b_recovers)
    data = weights(4)
    row = a.registry.add_version("m", data, source="upload")
    assert row.version == 1
    assert files_of(a.registry, "m") == ["v1.safetensors"]
    assert a.registry.read_checkpoint("m", 1)[2] == data


def test_recovery_keeps_a_version_published_while_it_runs(
    open_replica: Any, monkeypatch: pytest.MonkeyPatch
):
    """A version committed and renamed by replica a while b recovers is not taken for an orphan."""
    a, b = open_replica(), open_replica()
    a.registry.create_model("m", "mlp_bn", {})
    a.registry.add_version("m", weights(0), source="upload")
    read_rows = b.registry._recorded_files

    def rows_after_a_publishes() -> dict[str, dict[str, str]]:
        a.registry.add_version("m", weights(1), source="upload")
        a.registry.create_model("n", "mlp_bn", {})
        a.registry.add_version("n", weights(2), source="upload")
        return read_rows()

    monkeypatch.setattr(b.registry, "_recorded_files", rows_after_a_publishes)
    assert b.registry.recover_store() == []
    assert files_of(a.registry, "m") == ["v1.safetensors", "v2.safetensors"]
    assert files_of(a.registry, "n") == ["v1.safetensors"]


def test_dead_owners_lock_files_are_swept_and_live_ones_kept(tmp_path: Path):
    live, dead, sweeper = Owner(tmp_path), Owner(tmp_path), Owner(tmp_path)
    dead_lock = dead._lock_path
    dead.close()
    dead_lock.touch()  # what a SIGKILL leaves behind: the file, with no lock on it
    assert sweeper.sweep_owners() == 1
    assert not dead_lock.exists()
    assert live._lock_path.exists()
    assert sweeper._lock_path.exists()
    assert sweeper.is_alive(live.token)
    live.close()
    sweeper.close()
