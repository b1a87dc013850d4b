"""`GET /v1/jobs/{id}/events` through real jobs: a trained one (worker in a thread) and cancels.

The stream is read with `service.client` (its SSE reader) and once raw, as any SSE client sees it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.client import APIError, Client
from service.settings import Settings
from tests.conftest import AUTH, TOKEN, create_model, make_settings
from tests.helpers_jobs import WorkerThread, blobs, dataset_id, start_job

# 640 training rows in batches of 16: 40 steps an epoch, 400 in all, a second or more here: many
# times the stream's poll (half the 0.1 s heartbeat), so progress events come in between.
TRAIN = {"epochs": 10, "batch_size": 16, "lr": 0.05, "seed": 0}
STEPS = 40


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data", WORKER_HEARTBEAT_S=0.1)


@pytest.fixture
def blobs_job(client: httpx.Client) -> str:
    create_model(client, "blobs", "mlp_bn")
    x, y = blobs(800)
    return start_job(client, model="blobs", dataset=dataset_id(client, x, y), **TRAIN)


def test_events_follow_a_job_from_queued_to_its_outcome(settings, server, client, blobs_job):
    with Client(server.url, token=TOKEN) as bn:
        stream = bn.job_events(blobs_job)
        first = next(stream)  # no worker yet: the job waits in the queue
        worker = WorkerThread(settings).start()
        try:
            events = [first, *stream]
        finally:
            worker.stop()
        job = bn.job(blobs_job)

    assert (first.event, first.status) == ("progress", "queued")
    *running, last = events
    assert {e.event for e in running} == {"progress"}
    assert last.event == "succeeded"
    assert last.final
    assert last.job is not None
    assert last.job.status == "succeeded"
    assert last.job.result_version == 1
    assert job.result_version == 1
    assert last.metrics is not None
    assert last.metrics["epoch"] == TRAIN["epochs"]
    # Progress only moves forward, each update with an ETA that ends at zero.
    during = [e.progress for e in running if e.status == "running" and e.progress.steps]
    assert during, "no progress event while the job ran"
    assert all(p.steps == STEPS and p.epochs == TRAIN["epochs"] for p in during)
    positions = [(p.epoch, p.step) for p in during]
    assert positions == sorted(positions)
    # (The first step only starts the clock: it carries PyTorch's one-time start-up costs.)
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in during if (p.epoch, p.step) > (1, 1))
    assert last.progress.eta_s == 0
    assert job.progress.eta_s == 0
    # An event's metrics are the latest epoch's: never ahead of its progress.
    for event in running:
        if event.metrics is not None:
            assert event.metrics["epoch"] <= event.progress.epoch


def test_a_finished_job_answers_one_event_in_the_sse_framing(server, client, blobs_job):
    client.post(f"/v1/jobs/{blobs_job}/cancel", headers=AUTH)
    with client.stream("GET", f"/v1/jobs/{blobs_job}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    head, data, end = body.split("\n", 2)
    assert head == "event: cancelled"
    assert data.startswith("data: {")
    assert '"status":"cancelled"' in data
    assert end == "\n"  # one blank line, then the stream ends


def test_a_cancel_ends_an_open_stream_with_a_cancelled_event(server, client, blobs_job):
    with Client(server.url, token=TOKEN) as bn:
        stream = bn.job_events(blobs_job)
        assert next(stream).status == "queued"
        bn.cancel_job(blobs_job)
        rest = list(stream)
    assert [e.event for e in rest][-1] == "cancelled"
    assert rest[-1].job is not None
    assert rest[-1].job.result_version is None


def test_events_of_an_unknown_job_are_404(server):
    with Client(server.url) as bn, pytest.raises(APIError) as caught:
        next(bn.job_events("nope"))
    assert (caught.value.status, caught.value.code) == (404, "job_not_found")
