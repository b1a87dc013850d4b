"""One log format for the app, uvicorn and the workers, with the request id on every line.

Issue #10: uvicorn's lines had no timestamps while the app's had, there was no JSON option and no
request id, a job logged only its start and end. These tests read the lines real servers write.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator

import httpx
import pytest

from service import logs
from tests.conftest import AUTH, TOKEN, ThreadServer, make_settings, pt_bytes, trained_state_dict
from tests.helpers_jobs import FAST_WORKER_ENV, blobs, dataset_id, start_job, wait_job

MADE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]+")


def _rid(r: httpx.Response) -> str:
    value = r.headers.get("x-request-id")
    assert value, (r.status_code, dict(r.headers))
    return value


def test_every_response_carries_the_clients_request_id_or_a_new_one(client):
    mine = {"X-Request-ID": "client-id-42"}
    answers = [
        client.get("/healthz", headers=mine),  # 200
        client.post("/v1/models/nope/predict", json={"inputs": [[1.0]]}, headers=mine),  # fast path
        client.post("/v1/models", json={"name": "m"}, headers=mine),  # 401, no token
        client.get("/v1/models/nope", headers=mine),  # 404
        client.get("/healthz/nope", headers=mine),  # Starlette's 404
        client.get("/v1/models", headers={**mine, "Host": "evil.example"}),  # 400 invalid_host
    ]
    assert [r.status_code for r in answers] == [200, 404, 401, 404, 404, 400]
    assert {_rid(r) for r in answers} == {"client-id-42"}
    # An implausible id (too long, or one that could forge a log line) is replaced.
    made = [
        _rid(client.get("/healthz")),
        _rid(client.get("/healthz", headers={"X-Request-ID": "x" * 129})),
        _rid(client.get("/healthz", headers={"X-Request-ID": "a b"})),
        _rid(client.post("/v1/models/nope/predict", json={"inputs": [[1.0]]})),
    ]
    assert all(MADE_ID.fullmatch(rid) for rid in made), made
    assert len(set(made)) == len(made), made


@pytest.fixture
def text_lines(tmp_path) -> Iterator[tuple[ThreadServer, io.StringIO]]:
    """A server with access logs on whose lines (ours and uvicorn's) go to one text handler."""
    settings = make_settings(tmp_path / "data", ACCESS_LOG=True)
    srv = ThreadServer(settings).start()
    stream = io.StringIO()
    handler = logs.make_handler("text", "api")
    handler.setStream(stream)
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("service", "uvicorn.access")}
    root.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    # An earlier server in this test process, with access logs off, stopped their propagation.
    access = logging.getLogger("uvicorn.access")
    propagate, access.propagate = access.propagate, True
    try:
        yield srv, stream
    finally:
        access.propagate = propagate
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        srv.stop()


def test_text_lines_of_a_request_carry_its_id(text_lines):
    srv, stream = text_lines
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/models", json={"name": "m", "architecture": "mlp_bn"}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/models/m/versions",
            files={"file": ("w.pt", pt_bytes(trained_state_dict("mlp_bn")))},
            headers={**AUTH, "X-Request-ID": "upload-1"},
        )
        assert r.status_code == 201, r.text
    lines = stream.getvalue().splitlines()
    mine = [line for line in lines if line.endswith(" request_id=upload-1")]
    # The app's lines (the upload's load and swap, on the upload threads) and uvicorn's access line.
    assert any("service.serving.manager: model m now serves version 1" in x for x in mine), lines
    assert any("service.serving.loaded: loaded m" in x for x in mine), lines
    assert any(
        "uvicorn.access: " in x and '"POST /v1/models/m/versions HTTP/1.1" 201' in x for x in mine
    ), lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) api "
    assert all(re.match(stamp, line) for line in lines), lines


def test_json_lines_from_server_uvicorn_and_worker(spawn, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bnserve_log_test_plugin.py").write_text('"""Registers nothing."""\n')
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    proc = spawn(
        PYTHONPATH=path,
        BNSERVE_ARCHITECTURE_PLUGINS="bnserve_log_test_plugin",
        BNSERVE_LOG_FORMAT="json",
        BNSERVE_LOG_LEVEL="info",
        BNSERVE_ACCESS_LOG="true",
        BNSERVE_WORKERS="1",
        **FAST_WORKER_ENV,
    )
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        r = c.post("/v1/models", json={"name": "b", "architecture": "mlp_bn"}, headers=AUTH)
        assert r.status_code == 201, r.text
        x, y = blobs(200)
        data = dataset_id(c, x, y)
        job = start_job(c, model="b", dataset=data, epochs=2, batch_size=32, lr=0.05)
        assert wait_job(c, job)["status"] == "succeeded"
        r = c.post(
            "/v1/models/b/predict",
            json={"inputs": [[1.2345678, -7.6543219]]},
            headers={"X-Request-ID": "predict-7"},
        )
        assert r.status_code == 200, r.text
        assert _rid(r) == "predict-7"
    proc.stop()
    text = proc.log()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line
    assert all({"time", "level", "role", "logger", "message"} <= set(r) for r in records)
    messages = {(r["role"], r["logger"], r["message"]) for r in records}
    assert any(m[1] == "uvicorn.error" and "Uvicorn running on" in m[2] for m in messages), text
    loaded = "loaded architecture plugin modules: bnserve_log_test_plugin"
    assert {m[0] for m in messages if m[2] == loaded} == {"api", "worker"}, text
    epochs = [m[2] for m in messages if m[0] == "worker" and f"job {job} epoch" in m[2]]
    assert len(epochs) == 2, text
    assert all(
        re.search(r"train loss [\d.e-]+, val loss .*, val accuracy [\d.]+, [\d.]+ s$", m)
        for m in epochs
    ), epochs
    access = [r for r in records if r["logger"] == "uvicorn.access" and "/predict" in r["message"]]
    assert [r.get("request_id") for r in access] == ["predict-7"], access
    # Never a token nor tensor data.
    assert TOKEN not in text
    assert "1.2345678" not in text
    assert "7.6543219" not in text
