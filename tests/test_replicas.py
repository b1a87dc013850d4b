"""Several API processes on one database and one checkpoint folder (GitHub issue 4, point 4).

The serving version lives in the database: a promote made through one process, or written by a
training worker straight into the registry, reaches every other process within a bounded time
through its sync loop, and a process that has not caught up says so on /readyz.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from service.checkpoints.store import CheckpointStore
from service.checkpoints.validation import state_dict_to_safetensors
from service.db.engine import make_engine, make_sessionmaker
from service.files import Owner
from service.registry import Registry
from tests.conftest import AUTH, create_model, make_settings
from tests.helpers_serving import (
    Book,
    Served,
    close,
    predict,
    promote,
    serving_version,
    sha256,
    versions_by_number,
    wait_for,
)

SYNC_INTERVAL_S = 0.5
# A promote elsewhere must be served here within this; the sync loop alone needs up to one interval.
PROPAGATION_BOUND_S = 3 * SYNC_INTERVAL_S

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def worker_registry(tmp_path: Path, database_url: str) -> Iterator[Registry]:
    """The registry as a training worker process opens it: its own engine, same data dir."""
    settings = make_settings(tmp_path / "data", DATABASE_URL=database_url)
    engine = make_engine(settings.database_url)
    owner = Owner(settings.DATA_DIR)
    yield Registry(make_sessionmaker(engine), CheckpointStore(settings.checkpoint_dir, owner))
    owner.close()
    engine.dispose()


def until_served(client: httpx.Client, version: int, timeout: float) -> float:
    """Seconds until `client`'s process serves `version`; every answer on the way is checked."""

    def serves() -> bool:
        r = predict(client, "m", torch.zeros(1, 2))
        return Served(r).version == version

    return wait_for(f"version {version} served", serves, timeout, every=0.01)


def test_promotes_reach_every_replica_within_the_sync_bound(database_url, spawn, worker_registry):
    env = {"BNSERVE_DATABASE_URL": database_url, "BNSERVE_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S)}
    a, b = spawn(**env), spawn(**env)
    book = Book()
    x = torch.randn(4, 2)
    delays: list[float] = []
    with (
        httpx.Client(base_url=a.url, timeout=30) as ca,
        httpx.Client(base_url=b.url, timeout=30) as cb,
    ):
        create_model(ca, "m", "mlp_bn")
        for seed in (1, 2, 3):
            book.upload(ca, "m", seed=seed, promote=str(seed == 1).lower())
        # b has not synced since the model appeared: its first request loads the version.
        assert Served(predict(cb, "m", x)).version == 1

        # Promotes through either process, each seen by the other within the bound.
        for target, via, other in ((2, ca, cb), (3, cb, ca), (1, ca, cb), (2, cb, ca)):
            r = promote(via, "m", target)
            answered = time.monotonic()
            assert r.status_code == 200, r.text
            until_served(other, target, PROPAGATION_BOUND_S)
            delays.append(time.monotonic() - answered)
            assert Served(predict(via, "m", x)).version == target
            for c in (ca, cb):
                served = Served(predict(c, "m", x))
                assert close(served.outputs, book.expected(target, x))

        # A training worker publishes a version and promotes it in the database alone.
        book.weights(4)
        data = state_dict_to_safetensors(book.by_seed[4])
        row = worker_registry.add_version("m", data, source="training")
        worker_registry.set_serving("m", row.version)
        answered = time.monotonic()
        assert row.version == 4
        for c in (ca, cb):
            until_served(c, 4, PROPAGATION_BOUND_S)
            delays.append(time.monotonic() - answered)
            assert close(Served(predict(c, "m", x)).outputs, book.expected(4, x))
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text

    print(
        f"\npromote propagation ({'postgresql' if database_url else 'sqlite'}, sync interval "
        f"{SYNC_INTERVAL_S} s): " + ", ".join(f"{d * 1000:.0f} ms" for d in delays)
    )
    assert max(delays) < PROPAGATION_BOUND_S


def test_a_replica_that_has_not_caught_up_is_not_ready_but_keeps_serving(database_url, spawn):
    """b's sync loop is slowed to 60 s, so it cannot catch up during the test."""
    a = spawn(BNSERVE_DATABASE_URL=database_url)
    book = Book()
    x = torch.randn(3, 2)
    with httpx.Client(base_url=a.url, timeout=30) as ca:
        create_model(ca, "m", "mlp_bn")
        book.upload(ca, "m", seed=1)
        book.upload(ca, "m", seed=2, promote="false")
        b = spawn(BNSERVE_DATABASE_URL=database_url, BNSERVE_SYNC_INTERVAL_S="60")
        with httpx.Client(base_url=b.url, timeout=30) as cb:
            assert cb.get("/readyz").status_code == 200
            assert promote(ca, "m", 2).status_code == 200

            ready = cb.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "not_ready"
            assert ready.json()["models"]["m"]["wanted"] == 2
            assert ready.json()["models"]["m"]["serving"] == 1
            assert ready.json()["models"]["m"]["ready"] is False
            assert ca.get("/readyz").status_code == 200
            # Not ready, yet still answering, with the version it has.
            served = Served(predict(cb, "m", x))
            assert served.version == 1
            assert close(served.outputs, book.expected(1, x))


def test_concurrent_uploads_through_two_replicas_get_unique_gap_free_numbers(database_url, spawn):
    env = {"BNSERVE_DATABASE_URL": database_url, "BNSERVE_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S)}
    a, b = spawn(**env), spawn(**env)
    book = Book()
    payloads = {seed: book.weights(seed) for seed in range(12)}
    answers: dict[int, httpx.Response] = {}
    lock = threading.Lock()
    with (
        httpx.Client(base_url=a.url, timeout=60) as ca,
        httpx.Client(base_url=b.url, timeout=60) as cb,
    ):
        create_model(ca, "m", "mlp_bn")

        def send(seed: int) -> None:
            c = ca if seed % 2 else cb
            r = c.post(
                "/v1/models/m/versions",
                files={"file": ("w.pt", payloads[seed])},
                headers=AUTH,
            )
            with lock:
                answers[seed] = r

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(send, payloads))
        for seed, r in answers.items():
            assert r.status_code == 201, r.text
            book.learn(r.json()["sha256"], seed)
        numbers = sorted(r.json()["version"] for r in answers.values())
        assert numbers == list(range(1, 13))

        # Both processes converge on the database's serving version, and every file is intact.
        final = serving_version(ca, "m")
        assert final is not None
        for c in (ca, cb):
            until_served(c, final, PROPAGATION_BOUND_S)
        recorded = versions_by_number(cb, "m")
        assert set(recorded) == set(numbers)
        for version, digest in recorded.items():
            weights = ca.get(f"/v1/models/m/versions/{version}/weights")
            assert weights.status_code == 200
            assert sha256(weights.content) == digest
        x = torch.randn(2, 2)
        seed = book.seed_of_sha[recorded[final]]
        for c in (ca, cb):
            assert close(Served(predict(c, "m", x)).outputs, book.expected(seed, x))
