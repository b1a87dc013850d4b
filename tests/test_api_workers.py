"""`python -m service` with BNSERVE_API_WORKERS=2: several uvicorn processes, one truth.

Each API process builds its app from the environment and follows the database's serving
version like a replica; training workers are started once, by the parent.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from service.checkpoints.store import CheckpointStore
from service.db.engine import make_engine, make_sessionmaker
from service.files import Owner
from service.registry import Registry
from tests.conftest import AUTH, create_model, make_settings, pt_bytes, trained_state_dict, upload
from tests.helpers_jobs import child_pids

pytestmark = pytest.mark.slow

SYNC_INTERVAL_S = 0.3


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _fresh_connection_versions(url: str, count: int) -> set[str]:
    """Versions named by `count` predictions, each on a new connection (any API process)."""
    seen = set()
    for _ in range(count):
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/v1/models/m/predict", json={"inputs": [0.5, -0.5]})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == int(r.headers["x-model-version"])
            seen.add(r.headers["x-model-version"])
    return seen


def test_every_api_worker_follows_a_promote(spawn, tmp_path: Path):
    server = spawn(
        BNSERVE_API_WORKERS="2",
        BNSERVE_WORKERS="1",
        BNSERVE_SYNC_INTERVAL_S=str(SYNC_INTERVAL_S),
    )
    children = [_command_line(pid) for pid in child_pids(server.proc.pid)]
    assert sum("multiprocessing.spawn" in c for c in children) == 2, children
    assert sum("service.worker" in c for c in children) == 1, children  # once, not per API process

    with httpx.Client(base_url=server.url, timeout=60) as client:
        create_model(client, "m", "mlp_bn")
        assert (
            upload(client, "m", pt_bytes(trained_state_dict("mlp_bn", seed=1))).status_code == 201
        )
        r = upload(client, "m", pt_bytes(trained_state_dict("mlp_bn", seed=2)), promote="false")
        assert r.status_code == 201
    deadline = time.monotonic() + 10
    while _fresh_connection_versions(server.url, 10) != {"1"}:  # both processes load v1
        assert time.monotonic() < deadline, "API processes did not converge on version 1"

    # Promote as a training worker does: one database update, seen by no API process directly.
    settings = make_settings(tmp_path / "data")
    engine = make_engine(settings.database_url)
    owner = Owner(settings.DATA_DIR)
    try:
        Registry(
            make_sessionmaker(engine), CheckpointStore(settings.checkpoint_dir, owner)
        ).set_serving("m", 2)
    finally:
        owner.close()
        engine.dispose()
    promoted = time.monotonic()
    time.sleep(3 * SYNC_INTERVAL_S)
    assert _fresh_connection_versions(server.url, 30) == {"2"}
    assert time.monotonic() - promoted < 10
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/v1/models/m", headers=AUTH).json()["serving_version"] == 2
