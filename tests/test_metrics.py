"""/metrics for operators: queue wait and compute per batch, loaded versions and their bytes, jobs
from the database; and all of it summed right over several API processes (multiprocess mode)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.jobs import JobQueue
from service.metrics import MULTIPROC_ENV, STAGE_BUCKETS, observe_all, prepare_multiprocess_dir
from tests.conftest import AUTH, ThreadServer, create_model, pt_bytes, trained_state_dict, upload
from tests.helpers_jobs import blobs, dataset_id, start_job

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of one scrape, on a fresh connection (so any API process may answer)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return samples_of(text_string_to_metric_families(r.text))


def samples_of(families: Iterable[Any]) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def test_observe_all_gives_the_samples_of_one_observe_each() -> None:
    values = [0.00005, 0.0003, 0.0003, 0.002, 7.0, 0.0001, 0.0004]
    texts = []
    for many in (False, True):
        registry = CollectorRegistry()
        child = Histogram("h", "h", ["m"], buckets=STAGE_BUCKETS, registry=registry).labels("x")
        if many:
            observe_all(child, values)
        else:
            for v in values:
                child.observe(v)
        text = generate_latest(registry).decode()
        texts.append([line for line in text.splitlines() if "_created" not in line])
    assert texts[0] == texts[1]


def test_each_server_gets_a_fresh_folder_and_dead_servers_folders_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas share the data dir: one server must neither empty nor merge another's files."""
    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored after the test
    root, host = tmp_path / "metrics", socket.gethostname()
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    folders = {
        "dead": root / f"{host}-{dead_pid.pid}",
        "live": root / f"{host}-{os.getppid()}",
        "other host": root / f"not-{host}-{dead_pid.pid}",
        "ours, from a previous run": root / f"{host}-{os.getpid()}",
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / "counter_1.db").write_bytes(b"")
    path = prepare_multiprocess_dir(root)
    assert path == folders["ours, from a previous run"]
    assert list(path.iterdir()) == []
    assert os.environ[MULTIPROC_ENV] == str(path)
    assert not folders["dead"].exists()
    assert folders["live"].exists()
    assert folders["other host"].exists()


def test_queue_wait_compute_and_loaded_versions_after_traffic(settings) -> None:
    srv = ThreadServer(settings).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            create_model(c, "m", "mlp_bn")
            assert upload(c, "m", pt_bytes(trained_state_dict("mlp_bn", seed=1))).status_code == 201
            r = upload(c, "m", pt_bytes(trained_state_dict("mlp_bn", seed=2)), promote="false")
            assert r.status_code == 201

            def predict(i: int) -> None:
                body = {"inputs": [[0.5, -0.5]] * (1 + i % 3)}
                with httpx.Client(base_url=srv.url, timeout=60) as own:
                    assert own.post("/v1/models/m/predict", json=body).status_code == 200

            with ThreadPoolExecutor(8) as pool:  # concurrent, so some passes batch requests
                list(pool.map(predict, range(40)))
            pinned = c.post("/v1/models/m/predict?version=2", json={"inputs": [0.5, -0.5]})
            assert pinned.status_code == 200
            m = scrape(srv.url)

            requests = value(m, "bnserve_predictions_total", model="m", version="1", outcome="ok")
            assert requests == 40
            # One queue wait per request; one compute time and one batch size per forward pass.
            assert value(m, "bnserve_queue_wait_seconds_count", model="m") == 41
            passes = value(m, "bnserve_batch_size_count", model="m")
            assert value(m, "bnserve_compute_seconds_count", model="m") == passes
            assert 1 <= passes <= 41
            assert (
                value(m, "bnserve_batch_size_sum", model="m")
                == sum(1 + i % 3 for i in range(40)) + 1
            )
            assert value(m, "bnserve_compute_seconds_sum", model="m") > 0

            # Both versions are loaded here (2 pinned, in the cache); their bytes are what the
            # served modules hold.
            loaded = srv.app_services.manager.loaded_versions()
            assert set(loaded) == {("m", 1), ("m", 2)}
            for version in (1, 2):
                nbytes = value(m, "bnserve_loaded_model_bytes", model="m", version=str(version))
                assert nbytes == loaded[("m", version)] > 0
            assert value(m, "bnserve_serving_version", model="m") == 1

            # A deleted model's label sets go (the hook that deletion calls).
            assert c.delete("/v1/models/m", headers=AUTH).status_code in (200, 204)
            srv.app_services.metrics.forget_model("m")
            gone = scrape(srv.url)
            assert not [k for k in gone if dict(k[1]).get("model") == "m"], gone
            assert value(gone, "bnserve_jobs", status="queued") == 0
    finally:
        srv.stop()


def test_jobs_by_status_progress_and_epoch_durations_come_from_the_job_rows(server, client) -> None:
    """Job rows written as a worker writes them (claim, add_epoch, heartbeat, finish), read back
    by the scrape: these are other processes' doings, seen through the database."""
    create_model(client, "m", "mlp_bn")
    x, y = blobs(32, seed=1)
    dataset = dataset_id(client, x, y)
    jobs = [
        start_job(client, model="m", dataset=dataset, epochs=3, batch_size=8, lr=0.1)
        for _ in range(3)
    ]
    queue: JobQueue = server.app_services.jobs
    m = scrape(server.url)
    assert value(m, "bnserve_jobs", status="queued") == 3
    assert value(m, "bnserve_jobs", status="succeeded") == 0
    assert series(m, "bnserve_job_progress_ratio") == []

    ended = queue.claim("w1")
    assert ended is not None
    for epoch, seconds in ((1, 0.2), (2, 0.4), (3, 3.0)):
        queue.add_epoch(ended.id, "w1", {"epoch": epoch, "train_loss": 1.0, "duration_s": seconds})
    assert queue.finish(ended.id, "w1", "succeeded")
    running = queue.claim("w2")
    assert running is not None
    progress = {"epoch": 2, "epochs": 3, "step": 1, "steps": 4}
    queue.add_epoch(running.id, "w2", {"epoch": 1, "train_loss": 1.0, "duration_s": 0.3}, progress)

    for _ in range(2):  # the second scrape reads the ended job from its cache: the same answer
        m = scrape(server.url)
        assert value(m, "bnserve_jobs", status="queued") == 1
        assert value(m, "bnserve_jobs", status="running") == 1
        assert value(m, "bnserve_jobs", status="succeeded") == 1
        labels = {"job": running.id, "model": "m"}
        assert value(m, "bnserve_job_progress_ratio", **labels) == pytest.approx((1 + 1 / 4) / 3)
        assert value(m, "bnserve_job_epoch", **labels) == 2
        assert series(m, "bnserve_job_epoch") == [labels]
        assert value(m, "bnserve_epoch_duration_seconds_count", model="m") == 4
        assert value(m, "bnserve_epoch_duration_seconds_sum", model="m") == pytest.approx(3.9)
        assert value(m, "bnserve_epoch_duration_seconds_bucket", model="m", le="0.25") == 1
        assert value(m, "bnserve_epoch_duration_seconds_bucket", model="m", le="0.5") == 3
        assert value(m, "bnserve_epoch_duration_seconds_bucket", model="m", le="+Inf") == 4
    assert len(jobs) == 3


@pytest.mark.slow
def test_metrics_add_up_over_two_api_processes(spawn, tmp_path: Path) -> None:
    """Real traffic on `python -m service` with BNSERVE_API_WORKERS=2: whichever process answers
    the scrape, the counts are those of all the traffic, and per-process gauges name each live
    process."""
    server = spawn(BNSERVE_API_WORKERS="2")
    requests = 20
    with httpx.Client(base_url=server.url, timeout=60) as c:
        create_model(c, "m", "mlp_bn")
        assert upload(c, "m", pt_bytes(trained_state_dict("mlp_bn", seed=1))).status_code == 201
        x, y = blobs(64, seed=3)
        # Queued for good (no training worker here): job metrics are the database's, whoever
        # answers; the worker's side is test_jobs_by_status_progress_and_epoch_durations_....
        start_job(c, model="m", dataset=dataset_id(c, x, y), epochs=2, batch_size=16, lr=0.05)
    pids: set[str] = set()
    deadline = time.monotonic() + 30
    sent = 0
    while len(pids) < 2 or sent < requests:  # fresh connections until both processes answered
        assert time.monotonic() < deadline, f"only API processes {pids} answered"
        with httpx.Client(base_url=server.url, timeout=60) as own:
            r = own.post("/v1/models/m/predict", json={"inputs": [[0.5, -0.5]] * 2})
        if r.status_code == 503:  # this process has not loaded version 1 yet
            continue
        assert r.status_code == 200, r.text
        sent += 1
        m = scrape(server.url)
        pids |= {s["pid"] for s in series(m, "bnserve_loaded_model_bytes")}

    for _ in range(4):  # any process answers with everyone's counts
        m = scrape(server.url)
        assert value(m, "bnserve_predictions_total", model="m", version="1", outcome="ok") == sent
        assert value(m, "bnserve_predicted_samples_total", model="m") == 2 * sent
        assert value(m, "bnserve_queue_wait_seconds_count", model="m") == sent
        assert value(m, "bnserve_batch_size_sum", model="m") == 2 * sent
        passes = value(m, "bnserve_batch_size_count", model="m")
        assert value(m, "bnserve_compute_seconds_count", model="m") == passes
        # One series per live API process for per-process gauges.
        loaded = series(m, "bnserve_loaded_model_bytes")
        assert len({s["pid"] for s in loaded}) == 2
        assert {s["version"] for s in loaded} == {"1"}
        assert len(series(m, "bnserve_serving_version")) == 2
        assert value(m, "bnserve_jobs", status="queued") == 1
        assert value(m, "bnserve_jobs", status="running") == 0
    (folder,) = (tmp_path / "data" / "metrics").iterdir()  # this server's, by host and pid
    assert folder.name.endswith(f"-{server.proc.pid}")
    assert list(folder.glob("*.db"))

    # A killed API process: its per-process gauges go at the next scrape, its counts stay.
    dead = sorted(pids)[0]
    os.kill(int(dead), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while dead in {s["pid"] for s in series(m, "bnserve_loaded_model_bytes")}:
        assert time.monotonic() < deadline, (
            f"the killed process's gauges stayed: {sorted(folder.iterdir())}\n{server.log()}"
        )
        time.sleep(0.2)
        m = scrape(server.url)
    assert value(m, "bnserve_predictions_total", model="m", version="1", outcome="ok") == sent
    assert dead not in {s["pid"] for s in series(m, "bnserve_serving_version")}
