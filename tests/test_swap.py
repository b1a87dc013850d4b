"""Swapping the serving version under load, pinned versions, memory, and the limits that protect
the service (GitHub issue 4, points 1, 2, 3 and 7), through real servers.

Server processes (`spawn`) where the test only needs HTTP; uvicorn in a thread of the test process
(`ThreadServer`) where it holds forward passes with a global forward pre-hook or counts objects.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import service.api.routes.predict as predict_route
import service.serving.manager as manager_module
from models.mlp import MLPBN
from tests.conftest import AUTH, ThreadServer, create_model, make_settings
from tests.helpers_serving import (
    MARKER,
    Book,
    Served,
    close,
    hold_forwards,
    marked,
    predict,
    promote,
    rss_bytes,
    serving_version,
    versions_by_number,
    wait_for,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """'' (SQLite in the data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def thread_server(tmp_path: Path) -> Iterator[Any]:
    started: list[ThreadServer] = []

    def _start(**overrides: Any) -> ThreadServer:
        srv = ThreadServer(make_settings(tmp_path / "data", **overrides)).start()
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        srv.stop()
        # The app's lifespan leaves its engine open; close it before its database is dropped.
        srv.app_services.registry.close()


# 1. Swap under load


@pytest.mark.slow
def test_swap_under_load_serves_each_request_wholly_by_one_version(database_url, spawn):
    """Clients predict without pause while versions are uploaded, promoted and rolled back.

    No request fails; each one's outputs are those of the version its header and body name; and
    a request sent after a promote answered is never served by a version older than that promote.
    """
    env = {"BNSERVE_VERSION_CACHE_SIZE": "1", "BNSERVE_DATABASE_URL": database_url}
    srv = spawn(**env)
    book = Book()
    seed_of: dict[int, int] = {}
    xs = torch.randn(16, 2)
    # (sent, answered, version) of every promote, in order; version 1 serves before the load.
    promotes: list[tuple[float, float, int]] = []
    records: list[tuple[float, float, slice, httpx.Response]] = []
    stop = threading.Event()

    with httpx.Client(base_url=srv.url, timeout=30) as admin:
        create_model(admin, "m", "mlp_bn")
        seed_of[book.upload(admin, "m", seed=0)["version"]] = 0
        promotes.append((float("-inf"), float("-inf"), 1))

        def load(worker: int) -> None:
            rng = random.Random(worker)
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    start = rng.randrange(0, 12)
                    rows = slice(start, start + rng.randrange(1, 5))
                    sent = time.monotonic()
                    r = predict(c, "m", xs[rows])
                    records.append((sent, time.monotonic(), rows, r))

        rng = random.Random(0)
        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load, i) for i in range(4)]
            try:
                time.sleep(0.2)
                for step in range(1, 13):
                    sent = time.monotonic()
                    if step % 3 == 0:  # roll back to an older version, from cache or disk
                        target = rng.choice(sorted(seed_of)[:-1])
                        r = promote(admin, "m", target)
                        assert r.status_code == 200, r.text
                    else:  # upload a new version and serve it
                        body = book.upload(admin, "m", seed=step)
                        target = body["version"]
                        assert body["serving"] is True
                        seed_of[target] = step
                    promotes.append((sent, time.monotonic(), target))
                    time.sleep(0.1)
                time.sleep(0.2)
            finally:
                stop.set()
            for w in workers:
                w.result()
        assert serving_version(admin, "m") == promotes[-1][2]

    took = max(r[1] for r in records) - min(r[0] for r in records)
    print(f"\n{len(records)} requests over {took:.1f} s, {len(promotes) - 1} swaps")
    assert len(records) > 200
    by_version: dict[int, int] = {}
    for sent, answered, rows, r in records:
        served = Served(r)  # 200, and header and body name the same version
        expected = book.expected(seed_of[served.version], xs[rows])
        assert close(served.outputs, expected), f"outputs are not version {served.version}'s"
        # The last promote answered before this request was sent, and any sent before it ended.
        last = max(i for i, p in enumerate(promotes) if p[1] < sent)
        allowed = {promotes[last][2]} | {v for s, _, v in promotes[last + 1 :] if s < answered}
        assert served.version in allowed, (served.version, allowed)
        by_version[served.version] = by_version.get(served.version, 0) + 1
    assert len(by_version) >= 5  # the load really went through many swaps


def test_request_in_flight_finishes_on_its_version_which_is_released_after(
    thread_server, monkeypatch
):
    """A request whose forward pass is held keeps version 1 while version 2 takes over; version
    1's module is freed, and its memory handed back, only when that request ends."""
    released: list[torch.device] = []
    monkeypatch.setattr(manager_module, "release_memory", released.append)
    srv = thread_server(VERSION_CACHE_SIZE=0)
    book = Book()
    x_old = marked(torch.randn(3, 2))
    x_new = torch.randn(2, 2)
    with (
        httpx.Client(base_url=srv.url, timeout=30) as c,
        httpx.Client(base_url=srv.url, timeout=30) as c2,
        hold_forwards() as hold,
        ThreadPoolExecutor(1) as pool,
    ):
        create_model(c, "m", "mlp_bn")
        book.upload(c, "m", seed=0)
        in_flight = pool.submit(predict, c2, "m", x_old)
        assert hold.entered.wait(10)
        book.upload(c, "m", seed=1)  # version 2 serves; version 1 leaves the cache (size 0)

        after = Served(predict(c, "m", x_new))
        assert after.version == 2
        assert close(after.outputs, book.expected(1, x_new))
        old_module = hold.held_modules[0]
        assert not in_flight.done()
        assert old_module() is not None
        assert released == []  # nothing handed back while a request still runs on version 1

        hold.release()
        before = Served(in_flight.result(timeout=10))
        assert before.version == 1
        assert close(before.outputs, book.expected(0, x_old))
    wait_for("version 1's module freed", lambda: old_module() is None, 5)
    wait_for("version 1's memory handed back", lambda: len(released) == 1, 5)


def test_request_that_took_its_version_before_a_swap_but_queues_after_still_frees_it(
    thread_server, monkeypatch
):
    """The straggler case: a request takes version 1, version 1 is replaced and evicted and its
    batcher stops, then the request queues. It is served by version 1, and afterwards nothing
    keeps version 1 alive (not even a batcher loop left waiting for more work)."""
    entered, go_on = threading.Event(), threading.Event()
    decode = predict_route._decode

    def held_decode(kind: str, body: bytes, inputs: Any, *args: Any) -> Any:
        if inputs[0][0] == MARKER:
            entered.set()
            go_on.wait(30)
        return decode(kind, body, inputs, *args)

    # Decoding in a thread (as for a large body) is the window between taking a version and
    # queueing on it; small bodies are decoded on the loop, with no such window at all.
    monkeypatch.setattr(predict_route, "INLINE_BYTES", 0)
    monkeypatch.setattr(predict_route, "_decode", held_decode)
    srv = thread_server(VERSION_CACHE_SIZE=0)
    book = Book()
    x = marked(torch.randn(2, 2))
    with (
        httpx.Client(base_url=srv.url, timeout=30) as c,
        httpx.Client(base_url=srv.url, timeout=30) as c2,
        ThreadPoolExecutor(1) as pool,
    ):
        create_model(c, "m", "mlp_bn")
        book.upload(c, "m", seed=0)
        book.expected(0, x)
        Served(predict(c, "m", torch.randn(1, 2)))  # version 1's batcher loop is running
        gc.collect()
        gc.disable()
        try:
            before = live_modules()
            straggler = pool.submit(predict, c2, "m", x)
            assert entered.wait(10)
            book.upload(c, "m", seed=1)  # version 2 serves, version 1 is evicted
            go_on.set()
            served = Served(straggler.result(timeout=10))
            assert served.version == 1
            assert close(served.outputs, book.expected(0, x))
            time.sleep(0.2)
            assert live_modules() == before  # version 2's module in, version 1's out
        finally:
            gc.enable()


# 2. Pinned versions


def test_pinned_versions_come_from_a_bounded_lru_cache(spawn):
    srv = spawn(BNSERVE_VERSION_CACHE_SIZE="2")
    book = Book()
    x = torch.randn(3, 2)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn")
        for seed in range(1, 6):
            book.upload(c, "m", seed=seed)  # version == seed, each promoted in turn

        def ready() -> dict[str, Any]:
            model: dict[str, Any] = c.get("/readyz").json()["models"]["m"]
            return model

        assert ready()["serving"] == 5
        assert ready()["cached"] == [3, 4]  # replaced versions wait, the oldest left first

        def pinned(version: int) -> None:
            served = Served(predict(c, "m", x, version=version))
            assert served.version == version
            assert close(served.outputs, book.expected(version, x))

        pinned(1)  # loaded from disk; evicts 3, the least recently used
        assert ready()["cached"] == [4, 1]
        pinned(4)  # a hit moves it to the end
        assert ready()["cached"] == [1, 4]
        pinned(2)
        assert ready()["cached"] == [4, 2]
        pinned(5)  # the serving version answers pinned requests without entering the cache
        assert ready()["cached"] == [4, 2]
        for version in (1, 2, 3, 1, 3):
            pinned(version)
        assert ready() == {
            "wanted": 5,
            "serving": 5,
            "ready": True,
            "error": None,
            "cached": [1, 3],
        }
        assert Served(predict(c, "m", x)).version == 5  # never evicted

        r = predict(c, "m", x, version=9)
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "version_not_found"


def test_pinned_loads_are_shared_per_version_and_bounded_across_versions(
    thread_server, monkeypatch
):
    """Requests for one uncached version share one load; a request for another uncached
    version while it loads gets 503 `loads_in_flight` with Retry-After, instead of queueing a
    reload per request (issue #9: alternating `?version=N` outside the cache thrashed)."""
    entered, go_on = threading.Event(), threading.Event()
    loads: list[int] = []
    build = manager_module.build_loaded

    def held_build(**kwargs: Any) -> Any:
        loads.append(kwargs["version"])
        if kwargs["version"] == 1:
            entered.set()
            go_on.wait(30)
        return build(**kwargs)

    srv = thread_server(VERSION_CACHE_SIZE=0)
    book = Book()
    x = torch.randn(2, 2)
    with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(3) as pool:
        create_model(c, "m", "mlp_bn")
        for seed in range(1, 4):
            book.upload(c, "m", seed=seed)  # version == seed; 3 serves, none cached
        monkeypatch.setattr(manager_module, "build_loaded", held_build)
        first = pool.submit(predict, c, "m", x, 1)
        assert entered.wait(10)
        second = pool.submit(predict, c, "m", x, 1)
        r = predict(c, "m", x, version=2)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "loads_in_flight"
        assert r.headers["retry-after"] == "1"
        go_on.set()
        for done in (first, second):
            served = Served(done.result(timeout=30))
            assert served.version == 1
            assert close(served.outputs, book.expected(1, x))
        assert loads == [1]  # one load for both requests
        served = Served(predict(c, "m", x, version=2))  # and the next load may go
        assert close(served.outputs, book.expected(2, x))
        assert Served(predict(c, "m", x)).version == 3


# 3. Memory


@pytest.mark.slow
def test_hundred_promote_evict_cycles_leave_resident_memory_flat(spawn):
    """Each cycle loads a 4 MiB version from disk, serves it, and evicts the one before (cache
    size 0), plus a pinned request that loads and drops a third version. If evicted versions
    leaked, RSS would grow by about 8 MiB a cycle."""
    config = {"in_features": 16384}
    srv = spawn(BNSERVE_VERSION_CACHE_SIZE="0")
    assert srv.proc is not None
    book = Book(**config)
    x = torch.randn(1, 16384)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn", **config)
        for seed in (1, 2, 3):
            book.upload(c, "m", seed=seed, promote="false")

        def cycle(i: int) -> None:
            target = 1 + i % 2
            r = promote(c, "m", target)
            assert r.status_code == 200, r.text
            if i % 10 == 0:
                served = Served(predict(c, "m", x))
                assert served.version == target
                assert close(served.outputs, book.expected(target, x))
            pinned = Served(predict(c, "m", x, version=3))
            assert pinned.version == 3

        for i in range(10):  # warm up: allocator pools, lazily imported code
            cycle(i)
        baseline = rss_bytes(srv.proc.pid)
        started = time.monotonic()
        for i in range(10, 110):
            cycle(i)
        grown = rss_bytes(srv.proc.pid) - baseline
        print(
            f"\n100 promote/evict cycles of a 4 MiB version: RSS {baseline / 2**20:.0f} MiB -> "
            f"{(baseline + grown) / 2**20:.0f} MiB ({grown / 2**20:+.1f} MiB) "
            f"in {time.monotonic() - started:.1f} s"
        )
        assert grown < 48 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB over 100 cycles"
        assert c.get("/readyz").json()["models"]["m"]["cached"] == []


def test_evicted_versions_are_freed_without_waiting_for_the_garbage_collector(thread_server):
    """Pinned requests with a cache of size 0 load a version, serve it once and drop it; none of
    those modules may stay alive, not even in a cycle that only the cycle collector would free."""
    srv = thread_server(VERSION_CACHE_SIZE=0)
    book = Book()
    x = torch.randn(2, 2)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn")
        for seed in (1, 2, 3):
            book.upload(c, "m", seed=seed)
        for version in (1, 2):  # warm up, and build the reference modules before counting
            Served(predict(c, "m", x, version=version))
            book.expected(version, x)
        gc.collect()
        gc.disable()
        try:
            before = live_modules()
            for i in range(20):
                version = 1 + i % 2
                served = Served(predict(c, "m", x, version=version))
                assert close(served.outputs, book.expected(version, x))
            time.sleep(0.2)  # let the batchers' loops end
            assert live_modules() == before
        finally:
            gc.enable()


def live_modules() -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is MLPBN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evicted_versions_give_cuda_memory_back(thread_server):
    """On CUDA an evicted version's tensors are freed and the blocks go back to the driver
    (torch.cuda.empty_cache), instead of staying reserved by PyTorch's caching allocator."""
    config = {"in_features": 16384}
    srv = thread_server(VERSION_CACHE_SIZE=0, DEVICE="cuda")
    book = Book(**config)
    x = torch.randn(1, 16384)
    mib = 2**20
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn", **config)
        for seed in (1, 2):
            book.upload(c, "m", seed=seed, promote="false")
        assert promote(c, "m", 1).status_code == 200
        time.sleep(0.2)
        serving_one = torch.cuda.memory_allocated()
        for i in range(20):
            Served(predict(c, "m", x))
            assert promote(c, "m", 2 - i % 2).status_code == 200  # loads one, evicts the other
        time.sleep(0.2)
        allocated = torch.cuda.memory_allocated()
        assert allocated <= serving_one + mib  # one 4 MiB version on the GPU, not 20
        assert torch.cuda.memory_reserved() - allocated < 4 * mib  # the rest handed back


# 7. Limits


def test_flood_past_the_queue_bound_gets_503_with_retry_after(thread_server):
    srv = thread_server(MAX_QUEUED_SAMPLES=32)
    book = Book()
    x = marked(torch.randn(8, 2))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn")
        book.upload(c, "m", seed=0)
        with hold_forwards() as hold, ThreadPoolExecutor(4) as pool:
            # 4 x 8 samples fill the bound while their forward passes are held.
            admitted = [pool.submit(predict, c, "m", x) for _ in range(4)]
            assert hold.entered.wait(10)
            wait_for("the queue to fill", lambda: queued_samples(c) == 32, 10)
            refused = [predict(c, "m", torch.randn(1, 2)) for _ in range(5)]
            hold.release()
            for future in admitted:
                served = Served(future.result(timeout=10))
                assert close(served.outputs, book.expected(0, x))
        for r in refused:
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "overloaded"
            assert "BNSERVE_MAX_QUEUED_SAMPLES" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
        assert queued_samples(c) == 0
        Served(predict(c, "m", torch.randn(1, 2)))


def queued_samples(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("bnserve_queued_samples "):
            return float(line.split()[1])
    raise AssertionError("no bnserve_queued_samples metric")


def test_a_prediction_that_takes_too_long_times_out_and_frees_its_slot(thread_server):
    srv = thread_server(PREDICT_TIMEOUT_S=0.5)
    book = Book()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        create_model(c, "m", "mlp_bn")
        book.upload(c, "m", seed=0)
        with hold_forwards():
            sent = time.monotonic()
            r = predict(c, "m", marked(torch.randn(2, 2)))
            took = time.monotonic() - sent
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "timeout"
        assert "BNSERVE_PREDICT_TIMEOUT_S" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert 0.4 < took < 3
        assert queued_samples(c) == 0
        x = torch.randn(2, 2)
        assert close(Served(predict(c, "m", x)).outputs, book.expected(0, x))


def test_concurrent_uploads_to_one_model_are_processed_one_at_a_time(database_url, thread_server):
    """Numbers are unique and gap-free, and they are promoted in order: the newest serves."""
    srv = thread_server(DATABASE_URL=database_url)
    book = Book()
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        create_model(c, "m", "mlp_bn")
        payloads = [book.weights(seed) for seed in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda data: c.post(
                        "/v1/models/m/versions", files={"file": ("w.pt", data)}, headers=AUTH
                    ),
                    payloads,
                )
            )
        for seed, r in enumerate(answers):
            assert r.status_code == 201, r.text
            assert r.json()["serving"] is True
            book.learn(r.json()["sha256"], seed)
        assert sorted(r.json()["version"] for r in answers) == list(range(1, 9))
        assert serving_version(c, "m") == 8
        x = torch.randn(2, 2)
        served = Served(predict(c, "m", x))
        assert served.version == 8
        assert close(
            served.outputs, book.expected(book.seed_of_sha[versions_by_number(c, "m")[8]], x)
        )
