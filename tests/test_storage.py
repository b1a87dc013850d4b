"""Object storage (BNSERVE_STORAGE_URL=s3://...) below the API: the S3 client against moto's real
S3 endpoint, the checkpoint store over it, the bounded cache, the sweep and the advisory locks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.checkpoints.remote import ObjectCheckpointStore, object_key
from service.errors import CorruptCheckpoint, NotFound
from service.files import Owner
from service.startup import StartupError, check_storage, load_settings
from service.storage.cache import LocalCache
from service.storage.local import LocalStorage
from service.storage.s3 import S3Storage
from service.storage.sweep import SWEEP_LOCK, sweep
from tests.conftest import TOKEN
from tests.helpers_s3 import S3Endpoint, s3_fixture, s3_server_fixture  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_owners: list[Owner] = []


@pytest.fixture(autouse=True)
def _close_owners() -> Iterator[None]:
    yield
    while _owners:
        _owners.pop().close()


def store_on(
    storage: S3Storage | LocalStorage, folder: Path, cache_bytes: int = 1 << 30
) -> ObjectCheckpointStore:
    owner = Owner(folder)
    _owners.append(owner)
    cache = LocalCache(folder / "cache", storage, owner, cache_bytes)
    return ObjectCheckpointStore(storage, cache, owner, None, grace_s=3600)


def test_s3_storage_streams_a_large_file_in_parts_and_lists_gets_deletes(
    s3: S3Endpoint, tmp_path: Path
) -> None:
    storage = S3Storage(s3.bucket, "pre/fix", multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(11 << 20))
    storage.put_file("a/big", big)
    head = s3.client().head_object(Bucket=s3.bucket, Key="pre/fix/a/big")
    assert head["ContentLength"] == 11 << 20
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object: 3 parts of <= 5 MiB
    storage.get_file("a/big", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == big.read_bytes()
    assert [i.key for i in storage.list("a/")] == ["a/big"]
    assert storage.info("a/big").size == 11 << 20  # type: ignore[union-attr]
    assert storage.info("a/none") is None
    storage.delete("a/big")
    assert list(storage.list("")) == []


def test_a_version_put_by_one_host_is_downloaded_verified_by_another(
    s3: S3Endpoint, tmp_path: Path
) -> None:
    storage = S3Storage(s3.bucket, "bn")
    a, b = store_on(storage, tmp_path / "a"), store_on(storage, tmp_path / "b")
    data = os.urandom(4096)
    staged = a.stage("m1", data)
    # Written whole before any row could name it.
    assert s3.keys() == [f"bn/{object_key('m1', staged.sha256)}"]
    assert a.publish(staged, 1) == "v1.safetensors"
    assert b.read("m1", "v1.safetensors", staged.sha256) == data
    assert a.read("m1", "v1.safetensors", staged.sha256) == data  # a's own copy, no download

    # Tampered in the bucket: a host without a copy refuses it, and keeps nothing.
    s3.client().put_object(Bucket=s3.bucket, Key=f"bn/{object_key('m1', staged.sha256)}", Body=b"x")
    c = store_on(storage, tmp_path / "c")
    with pytest.raises(CorruptCheckpoint) as refused:
        c.read("m1", "v1.safetensors", staged.sha256)
    assert refused.value.code == "corrupt_checkpoint"
    assert list(c.cache.root.iterdir()) == []

    c.delete_model("m1")
    with pytest.raises(NotFound) as missing:
        c.read("m1", "v1.safetensors", staged.sha256)
    assert missing.value.code == "checkpoint_missing"


def test_a_failed_commit_keeps_the_object_for_the_sweep(s3: S3Endpoint, tmp_path: Path) -> None:
    """`discard` deletes nothing remote: the same bytes may be a version committed meanwhile."""
    store = store_on(S3Storage(s3.bucket), tmp_path)
    staged = store.stage("m1", b"weights")
    store.discard(staged)
    assert not staged.path.exists()
    assert s3.keys() == [object_key("m1", staged.sha256)]


def test_the_cache_evicts_least_recently_used_never_what_is_in_use(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "bucket")
    store = store_on(storage, tmp_path / "host", cache_bytes=2500)
    shas = []
    for i in range(3):
        data = bytes([i]) * 1000
        staged = store.stage("m", data)
        store.publish(staged, i + 1)
        shas.append(staged.sha256)
        time.sleep(0.01)  # distinct mtimes: the LRU order
    cached = {p.name.split(".")[0] for p in store.cache.root.iterdir()}
    assert cached == set(shas[1:])  # 3000 bytes > 2500: the oldest went

    store.cache.in_use = lambda: {shas[1]}
    store.read("m", "v1.safetensors", shas[0])  # downloaded again, most recent now
    cached = {p.name.split(".")[0] for p in store.cache.root.iterdir()}
    assert cached == {shas[0], shas[1]}  # shas[2] was least recently used and not in use


def test_the_sweep_removes_only_unreferenced_objects_older_than_the_grace(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "bucket")
    for name in ("kept", "orphan-old", "orphan-young"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        storage.put_file(f"checkpoints/m/{name}.safetensors", path)
    old = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    for name in ("kept", "orphan-old"):
        os.utime(storage.root / f"checkpoints/m/{name}.safetensors", (old, old))
    removed = sweep(
        storage, None, "checkpoints/", lambda: {"checkpoints/m/kept.safetensors"}, 3600, what="x"
    )
    assert removed == ["removed unreferenced x object checkpoints/m/orphan-old.safetensors"]
    assert sorted(i.key for i in storage.list("")) == [
        "checkpoints/m/kept.safetensors",
        "checkpoints/m/orphan-young.safetensors",
    ]


def test_a_publish_in_flight_holds_off_every_sweep(postgres_url: str) -> None:
    from service.db.advisory import AdvisoryLocks

    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    publisher, sweeper = AdvisoryLocks(url), AdvisoryLocks(url)
    try:
        conn = publisher.acquire_shared(SWEEP_LOCK)
        with publisher.shared(SWEEP_LOCK):  # publishes share it
            pass
        with sweeper.try_exclusive(SWEEP_LOCK) as taken:
            assert not taken
        publisher.release(conn)
        with sweeper.try_exclusive(SWEEP_LOCK) as taken:
            assert taken
            got: list[bool] = []

            def publish() -> None:
                with publisher.shared(SWEEP_LOCK):
                    got.append(True)

            waiter = threading.Thread(target=publish)
            waiter.start()
            waiter.join(0.3)
            assert waiter.is_alive()  # a publish waits while a sweep runs
        waiter.join(5)
        assert got == [True]
    finally:
        publisher.close()
        sweeper.close()


def test_remote_storage_is_refused_without_postgresql_or_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BNSERVE_STORAGE_URL", "s3://bucket/p")
    with pytest.raises(StartupError, match="needs a postgresql:// BNSERVE_DATABASE_URL"):
        load_settings()
    monkeypatch.setenv("BNSERVE_DATABASE_URL", "postgresql://db/x")
    monkeypatch.delenv("BNSERVE_API_TOKEN", raising=False)
    with pytest.raises(StartupError, match="needs BNSERVE_API_TOKEN"):
        load_settings()
    monkeypatch.setenv("BNSERVE_STORAGE_URL", "s3://B_ad")
    with pytest.raises(StartupError, match="s3://bucket\\[/prefix\\]"):
        load_settings({"API_TOKEN": TOKEN})


def test_a_bucket_that_does_not_exist_stops_the_start_in_one_line(s3: S3Endpoint) -> None:
    settings = load_settings(
        {
            "STORAGE_URL": "s3://no-such-bucket",
            "DATABASE_URL": "postgresql://x/y",
            "API_TOKEN": TOKEN,
        }
    )
    with pytest.raises(StartupError) as refused:
        check_storage(settings)
    assert "s3://no-such-bucket" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert "testing" not in str(refused.value)  # no credential


def test_datasets_and_image_archives_go_to_the_bucket_and_are_verified_elsewhere(
    s3: S3Endpoint, tmp_path: Path
) -> None:
    """Two hosts' dataset stores on one database (SQLite here: the store needs no locks) and one
    bucket: what one adds, the other loads after a verified download; a tampered object is
    `corrupt_dataset`; an unreferenced object goes in the sweep once past the grace."""
    import numpy as np

    from service.datasets.remote import ObjectDatasetStore
    from service.db.engine import make_engine, make_sessionmaker, migrate
    from service.preprocess.pipeline import ImagePipeline
    from tests.helpers_images import shapes, zip_of
    from tests.helpers_jobs import npz_bytes

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine, tmp_path)
    sessions = make_sessionmaker(engine)
    storage = S3Storage(s3.bucket, "p")

    def host(name: str, cache_bytes: int = 1 << 30) -> ObjectDatasetStore:
        owner = Owner(tmp_path / name)
        _owners.append(owner)
        cache = LocalCache(tmp_path / name / "cache", storage, owner, cache_bytes)
        return ObjectDatasetStore(cache, owner, sessions, None, grace_s=1.5)

    a, b = host("a"), host("b")
    tensors, images = tmp_path / "t.npz", tmp_path / "i.zip"
    tensors.write_bytes(npz_bytes(x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1])))
    images.write_bytes(zip_of(shapes(per_class=2)))
    t_row = a.add(tensors, "t.npz", "t")
    i_row = a.add(images, "i.zip", "i")
    assert s3.keys("p/datasets/") == sorted(f"p/datasets/{r.filename}" for r in (t_row, i_row))
    assert b.load(t_row).num_samples == 4
    assert b.labels(t_row).tolist() == [0, 1, 0, 1]
    pipeline = ImagePipeline(mode="L", resize=16, mean=[0.5], std=[0.5])
    assert len(b.load_images(i_row, pipeline).labels) == 4
    # A cache smaller than the dataset still serves each read: the copy is pinned until read.
    tiny = host("tiny", cache_bytes=0)
    assert tiny.load(t_row).num_samples == 4
    assert tiny.labels(t_row).tolist() == [0, 1, 0, 1]
    assert len(tiny.load_images(i_row, pipeline).labels) == 4

    s3.client().put_object(Bucket=s3.bucket, Key=f"p/datasets/{t_row.filename}", Body=b"bad")
    with pytest.raises(CorruptCheckpoint) as refused:
        host("c").load(t_row)
    assert refused.value.code == "corrupt_dataset"

    orphan = tmp_path / "orphan"
    orphan.write_bytes(b"no row")
    storage.put_file("datasets/orphan.npz", orphan)
    assert b.recover() == []  # younger than the grace (S3 times are whole seconds)
    time.sleep(1.6)
    assert b.recover() == ["removed unreferenced dataset object datasets/orphan.npz"]
    assert len(s3.keys("p/datasets/")) == 2
    engine.dispose()
