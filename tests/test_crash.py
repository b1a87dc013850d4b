"""Crash safety (GitHub issue 4, point 6): real server processes killed with SIGKILL during an
upload's write, during a promote and under load, then restarted on the same data dir.

After every restart: each version an answered request created is there with its sha256, version
numbers have no gaps, no temp file or orphan checkpoint is left, the serving version is the last
one promoted (or the one whose promote was cut off), and predictions are those of that version.
A stored file whose bytes no longer match their sha256 is refused with a clear error.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text

from tests.conftest import ServerProcess, create_model, make_settings, upload
from tests.helpers_jobs import npz_bytes, upload_dataset
from tests.helpers_serving import (
    Book,
    Served,
    close,
    predict,
    promote,
    serving_version,
    sha256,
    versions_by_number,
)

pytestmark = pytest.mark.slow

# 4 MiB versions, so that writing, hashing and loading one takes long enough to be cut.
CONFIG = {"in_features": 16384}
X = torch.randn(2, 16384, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("postgres_url")
    return url


class Crashes:
    """One model on one server process that is killed and restarted, and what must survive."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.book = Book(**CONFIG)
        self.answered: dict[int, str] = {}  # version -> sha256, for every answered upload
        self.seed_of: dict[int, int] = {}
        self.serving: int | None = None  # the last promote that was answered
        self.outputs: dict[int, torch.Tensor] = {}  # served outputs for X, by version

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.srv.url, timeout=timeout)

    def uploaded(self, r: httpx.Response, seed: int, promoted: bool) -> None:
        assert r.status_code == 201, r.text
        body = r.json()
        self.answered[body["version"]] = body["sha256"]
        self.seed_of[body["version"]] = seed
        self.book.learn(body["sha256"], seed)
        if promoted:
            self.serving = body["version"]

    def recovery(self) -> list[str]:
        """What the restarted process's recovery did, from its log."""
        return [
            line.split("recovery: ", 1)[1]
            for line in self.srv.log().splitlines()
            if "checkpoint store recovery: " in line
        ]

    def check(self, maybe_serving: set[int], maybe_new: dict[int, int] | None = None) -> None:
        """The invariants after a restart.

        `maybe_serving`: versions whose promote was cut off and may have taken effect.
        `maybe_new`: seeds of uploads that were cut off, by position (one may have been stored).
        """
        with self.client() as c:
            recorded = versions_by_number(c, "m")
            assert sorted(recorded) == list(range(1, len(recorded) + 1)), "numbers have a gap"
            for version, digest in self.answered.items():
                assert recorded.get(version) == digest, f"answered version {version} lost"
            for version in sorted(set(recorded) - set(self.answered)):
                # Stored, but the crash came before the answer: one of the cut-off uploads.
                assert maybe_new, f"version {version} appeared from nowhere"
                self.seed_of[version] = maybe_new.pop(min(maybe_new))
                self.answered[version] = recorded[version]
            for version, digest in recorded.items():
                r = c.get(f"/v1/models/m/versions/{version}/weights")
                assert r.status_code == 200, r.text
                assert sha256(r.content) == digest
            self.check_files(set(recorded))

            serving = serving_version(c, "m")
            allowed = {self.serving} | maybe_serving
            assert serving in allowed, f"serving {serving}, expected one of {allowed}"
            assert serving is not None
            self.serving = serving
            served = Served(predict(c, "m", X))
            assert served.version == serving
            assert close(served.outputs, self.book.expected(self.seed_of[serving], X))
            if serving in self.outputs:  # the same version answers as before the crash
                assert torch.equal(served.outputs, self.outputs[serving])
            self.outputs[serving] = served.outputs
            assert c.get("/readyz").status_code == 200

    def check_files(self, versions: set[int]) -> None:
        data = self.srv.data_dir
        leftovers = [p for p in data.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == [], f"temp files left after recovery: {leftovers}"
        folders = [p for p in (data / "checkpoints").iterdir() if not p.name.startswith(".")]
        assert len(folders) == 1, f"orphan model folders: {folders}"
        names = {p.name for p in folders[0].iterdir()}
        assert names == {f"v{v}.safetensors" for v in versions}, "orphan or missing checkpoint"


def start(spawn: Any, database_url: str, seeds: tuple[int, ...] = (0,)) -> Crashes:
    """A server with model m; the first seed's version serves, the others are stored."""
    crashes = Crashes(spawn(BNSERVE_DATABASE_URL=database_url))
    with crashes.client() as c:
        create_model(c, "m", "mlp_bn", **CONFIG)
        for i, seed in enumerate(seeds):
            promoted = i == 0
            r = upload(c, "m", crashes.book.weights(seed), promote=str(promoted).lower())
            crashes.uploaded(r, seed, promoted)
        crashes.outputs[1] = Served(predict(c, "m", X)).outputs
    return crashes


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `call()` in a thread; the dict gets its 'result' or its 'error'."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def kill_when(crashes: Crashes, moment: Callable[[], bool], thread: threading.Thread) -> bool:
    """SIGKILL the server as soon as `moment()` holds; whether it held before the request ended."""
    deadline = time.monotonic() + 20
    hit = False
    while time.monotonic() < deadline:
        if moment():
            hit = True
            break
        if not thread.is_alive():
            break
        time.sleep(0.0005)
    crashes.srv.kill()
    return hit


def temp_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def test_kill_during_uploads(database_url, spawn):
    """Kills at each step of an upload: checking the received file, writing the version file,
    after its rename but before the answer, and at a random moment."""
    rng = random.Random(1)
    crashes = start(spawn, database_url)
    data_dir = crashes.srv.data_dir
    model_dir = next(p for p in (data_dir / "checkpoints").iterdir() if p.is_dir())
    moments: list[tuple[str, float, Callable[[], bool]]] = [
        ("checking the received file", 0.0, lambda: temp_files(data_dir / "uploads")),
        ("writing the version file", 0.0, lambda: temp_files(model_dir)),
        (
            "renamed, not yet answered",
            0.0,
            lambda: (model_dir / f"v{max(crashes.answered) + 1}.safetensors").exists(),
        ),
    ]
    if not database_url:
        moments.append(("at a random moment", rng.uniform(0.0, 0.15), lambda: True))
    for i, (when, delay, moment) in enumerate(moments):
        seed, promoted = 10 + i, i % 2 == 0
        data = crashes.book.weights(seed)
        new_version = max(crashes.answered) + 1
        with crashes.client() as c:
            thread, out = in_thread(
                lambda c=c, data=data, promoted=promoted: upload(
                    c, "m", data, promote=str(promoted).lower()
                )
            )
            time.sleep(delay)
            hit = kill_when(crashes, moment, thread)
            crashes.srv.start()
            thread.join(timeout=30)
        cut = "result" not in out
        if not cut:
            crashes.uploaded(out["result"], seed, promoted)
        crashes.check(
            maybe_serving={new_version} if cut and promoted else set(),
            maybe_new={0: seed} if cut else None,
        )
        print(
            f"\nkilled {when} ({'hit' if hit else 'missed'}): answered={not cut}, "
            f"stored={new_version in crashes.answered}, serving={crashes.serving}, "
            f"recovery={crashes.recovery()}"
        )


def test_kill_during_promotes(database_url, spawn):
    """Kills while the version loads, right after the database recorded the promote (before the
    answer), and at a random moment."""
    rng = random.Random(2)
    crashes = start(spawn, database_url, seeds=(0, 1, 2))
    settings = make_settings(crashes.srv.data_dir, DATABASE_URL=database_url)
    engine = create_engine(settings.database_url)

    def recorded(target: int) -> bool:
        with engine.connect() as conn:
            query = text("SELECT serving_version FROM models WHERE name = 'm'")
            return conn.execute(query).scalar() == target

    moments: list[tuple[str, float, Callable[[int], bool]]] = [
        ("while loading", rng.uniform(0.002, 0.01), lambda target: True),
        ("recorded, not yet answered", 0.0, recorded),
    ]
    if not database_url:
        moments.append(("at a random moment", rng.uniform(0.0, 0.05), lambda target: True))
    try:
        for when, delay, moment in moments:
            target = rng.choice([v for v in (1, 2, 3) if v != crashes.serving])
            with crashes.client() as c:
                thread, out = in_thread(lambda c=c, target=target: promote(c, "m", target))
                time.sleep(delay)
                hit = kill_when(
                    crashes, lambda moment=moment, target=target: moment(target), thread
                )
                crashes.srv.start()
                thread.join(timeout=30)
            if "result" in out:
                assert out["result"].status_code == 200, out["result"].text
                crashes.serving = target
            crashes.check(maybe_serving={target} if "result" not in out else set())
            print(
                f"\nkilled {when} ({'hit' if hit else 'missed'}): answered={'result' in out}, "
                f"serving={crashes.serving} (target {target})"
            )
    finally:
        engine.dispose()


def test_kill_under_load(database_url, spawn):
    """Predictions without pause while versions are uploaded and promoted, then SIGKILL."""
    rng = random.Random(3)
    crashes = start(spawn, database_url)
    rounds = 2 if not database_url else 1
    for _ in range(rounds):
        stop = threading.Event()
        failures: list[str] = []
        answers = 0
        in_flight: dict[str, Any] = {}

        def load(
            stop: threading.Event = stop,
            failures: list[str] = failures,
            in_flight: dict[str, Any] = in_flight,
        ) -> None:
            nonlocal answers
            with crashes.client() as c:
                for _ in range(5000):
                    if stop.is_set():
                        return
                    try:
                        r = predict(c, "m", X)
                    except httpx.TransportError:
                        return  # the kill
                    try:
                        served = Served(r)
                    except AssertionError as exc:
                        failures.append(str(exc))
                        return
                    # An upload swaps in before its 201 reaches the changer, so a version
                    # not yet in seed_of is the one in flight (read first: the changer
                    # records the version before it moves on to the next seed).
                    pending = in_flight.get("seed")
                    seed = crashes.seed_of.get(served.version, pending)
                    if seed is None:
                        failures.append(f"version {served.version} was never uploaded")
                        return
                    expected = crashes.book.expected(seed, X)
                    if not close(served.outputs, expected):
                        failures.append(f"version {served.version} gave other outputs")
                    answers += 1

        def change(
            stop: threading.Event = stop,
            in_flight: dict[str, Any] = in_flight,
            failures: list[str] = failures,
        ) -> None:
            with crashes.client() as c:
                for _ in range(50):
                    if stop.is_set():
                        return
                    seed = 100 + len(crashes.answered)
                    in_flight.clear()
                    in_flight.update(seed=seed, target=None)
                    try:
                        if rng.random() < 0.5 and len(crashes.answered) > 1:
                            target = rng.choice(sorted(crashes.answered))
                            in_flight["target"] = target
                            r = promote(c, "m", target)
                            if r.status_code != 200:
                                failures.append(r.text)
                                return
                            crashes.serving = target
                        else:
                            in_flight["promoted"] = True
                            r = upload(c, "m", crashes.book.weights(seed))
                            if r.status_code != 201:
                                failures.append(r.text)
                                return
                            crashes.uploaded(r, seed, True)
                    except httpx.TransportError:
                        return
                    in_flight.clear()

        threads = [threading.Thread(target=load) for _ in range(2)]
        threads.append(threading.Thread(target=change))
        for t in threads:
            t.start()
        time.sleep(0.4 + rng.random() * 0.6)
        crashes.srv.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert failures == []
        assert answers > 0
        crashes.srv.start()
        maybe_serving: set[int] = set()
        maybe_new: dict[int, int] | None = None
        if in_flight.get("target") is not None:
            maybe_serving = {in_flight["target"]}
        elif in_flight:
            maybe_new = {0: in_flight["seed"]}
            maybe_serving = {max(crashes.answered) + 1}
        crashes.check(maybe_serving, maybe_new)


def test_a_checkpoint_whose_bytes_changed_is_refused_not_served(spawn):
    crashes = start(spawn, "", seeds=(0, 1))
    with crashes.client() as c:
        assert promote(c, "m", 2).status_code == 200
    crashes.srv.kill()
    folder = next(p for p in (crashes.srv.data_dir / "checkpoints").iterdir() if p.is_dir())
    originals = {}
    for name in ("v1.safetensors", "v2.safetensors"):  # a flipped bit in the tensor data
        path = folder / name
        originals[name] = path.read_bytes()
        data = bytearray(originals[name])
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))

    crashes.srv.start(wait_ready=False)
    with crashes.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        model = ready.json()["models"]["m"]
        assert model["wanted"] == 2
        assert model["serving"] is None
        assert "corrupt" in model["error"]
        assert "sha256" in model["error"]

        r = predict(c, "m", X)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "not_loaded"
        assert "corrupt" in r.json()["detail"]

        r = c.get("/v1/models/m/versions/2/weights")
        assert r.status_code == 500
        assert r.json()["code"] == "corrupt_checkpoint"
        assert r.json()["expected_sha256"] == crashes.answered[2]

        r = promote(c, "m", 1)
        assert r.status_code == 500, r.text
        assert r.json()["code"] == "corrupt_checkpoint"
        assert "refusing to serve it" in r.json()["detail"]
        assert serving_version(c, "m") == 2  # the refused promote changed nothing
        r = predict(c, "m", X, version=1)
        assert r.status_code == 500
        assert r.json()["code"] == "corrupt_checkpoint"

        # Restoring the file is enough: the sync loop loads it on its next pass.
        (folder / "v2.safetensors").write_bytes(originals["v2.safetensors"])
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "restored version not loaded"
            time.sleep(0.05)
        served = Served(predict(c, "m", X))
        assert served.version == 2
        assert close(served.outputs, crashes.book.expected(1, X))


def test_dataset_files_agree_with_their_rows_after_a_crash(spawn, tmp_path: Path):
    """A start removes a dataset file with no row and finishes one whose row was committed."""
    srv = spawn()
    x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = upload_dataset(c, npz_bytes(x=x, y=np.arange(8) % 2))
        assert r.status_code == 201, r.text
        row = r.json()
    srv.kill()
    folder = srv.data_dir / "datasets"
    final = folder / f"{row['sha256']}.npz"
    # Killed between the row's commit and the rename: the file is still under a dead writer's
    # temp name (the owner token "0123456789abcdef" holds no lock).
    final.rename(folder / f".{row['sha256']}.0123456789abcdef.00000000.tmp")
    # And a file that a crash left under a final name without a row (the old store did that).
    orphan = folder / f"{'0' * 64}.npz"
    orphan.write_bytes(b"no row names me")

    srv.start()
    assert sorted(p.name for p in folder.iterdir()) == [final.name]
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert [d["id"] for d in c.get("/v1/datasets").json()] == [row["id"]]
    assert "rolled forward" in srv.log()
