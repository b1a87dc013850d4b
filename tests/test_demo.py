"""The first-start demo (`service/demo.py`): created on a registry's first start only."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import AUTH
from tests.helpers_api import running


def test_deleted_demo_stays_deleted_after_a_restart(tmp_path: Path) -> None:
    """Seeded on the first start; once deleted, an empty registry does not bring it back."""
    data_dir = tmp_path / "data"
    with running(data_dir, DEMO=True) as (_, client):
        assert [m["name"] for m in client.get("/v1/models").json()] == ["demo"]
        assert client.delete("/v1/models/demo", headers=AUTH).status_code == 204
    with running(data_dir, DEMO=True) as (_, client):
        assert client.get("/v1/models").json() == []
    # A fresh data dir still gets its demo.
    with running(tmp_path / "other", DEMO=True) as (_, client):
        assert [m["name"] for m in client.get("/v1/models").json()] == ["demo"]
