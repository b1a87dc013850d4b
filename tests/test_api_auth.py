"""Bearer-token auth: state-changing routes need the token, and a refused request changes nothing.

Reads and predictions are open unless BNSERVE_PROTECT_READS=true; with no BNSERVE_API_TOKEN the
server makes one and keeps it in `<data dir>/api-token` (mode 0600).
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import AUTH, REPO, TOKEN, ServerProcess, pt_bytes, trained_state_dict
from tests.helpers_api import assert_error, predict_ok, running, samples, serve, snapshot

BAD_HEADERS = {
    "no-token": {},
    "wrong-token": {"Authorization": "Bearer not-the-token"},
    "token-prefix": {"Authorization": "Bearer test-tok"},
    "empty-bearer": {"Authorization": "Bearer"},
    "no-scheme": {"Authorization": TOKEN},
    "basic-scheme": {"Authorization": "Basic dGVzdC10b2tlbg=="},
}


def _writes(weights: bytes) -> dict[str, dict[str, Any]]:
    """Every state-changing request of the v1 API, as keyword arguments of `client.request`."""
    return {
        "create-model": {
            "method": "POST",
            "url": "/v1/models",
            "json": {"name": "new", "architecture": "mlp_bn", "config": {}},
        },
        "upload": {
            "method": "POST",
            "url": "/v1/models/m/versions",
            "files": {"file": ("w.pt", weights)},
        },
        "promote": {"method": "POST", "url": "/v1/models/m/versions/1/promote"},
        "delete-model": {"method": "DELETE", "url": "/v1/models/m"},
    }


WRITES = list(_writes(b""))


def state(client: httpx.Client, x: torch.Tensor) -> tuple[Any, torch.Tensor, int]:
    outputs, version = predict_ok(client, "m", x)
    return snapshot(client), outputs, version


@pytest.mark.parametrize("headers", list(BAD_HEADERS))
@pytest.mark.parametrize("write", WRITES)
def test_writes_without_the_right_token_are_401_and_change_nothing(client, write, headers):
    serve(client, "m", "mlp_bn")
    second = trained_state_dict("mlp_bn", seed=1)
    r = client.post(
        "/v1/models/m/versions",
        files={"file": ("w.pt", pt_bytes(second))},
        data={"promote": "false"},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    x = samples((2,), 3)
    before = state(client, x)

    request = _writes(pt_bytes(second))[write]
    r = client.request(**request, headers=BAD_HEADERS[headers])
    body = assert_error(r, 401, "unauthorized")
    assert "Bearer" in body["detail"]

    after = state(client, x)
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
    assert after[2] == before[2] == 1

    # The same request with the token goes through.
    r = client.request(**request, headers=AUTH)
    assert r.status_code in (200, 201, 204), r.text


def test_reads_and_predictions_need_no_token(client):
    serve(client, "m", "mlp_bn")
    for url in (
        "/v1/architectures",
        "/v1/models",
        "/v1/models/m",
        "/v1/models/m/versions",
        "/v1/models/m/versions/1",
        "/v1/models/m/versions/1/weights",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert client.get(url).status_code == 200, url
    predict_ok(client, "m", samples((2,), 2))


READS = [
    "/v1/architectures",
    "/v1/models",
    "/v1/models/m",
    "/v1/models/m/versions",
    "/v1/models/m/versions/1",
    "/v1/models/m/versions/1/weights",
]


def test_protect_reads_requires_the_token_for_reads_and_predictions(tmp_path: Path):
    with running(tmp_path / "data", PROTECT_READS=True) as (_, client):
        serve(client, "m", "mlp_bn")
        x = samples((2,), 2)
        for url in READS:
            assert_error(client.get(url), 401, "unauthorized")
            assert_error(client.get(url, headers=BAD_HEADERS["wrong-token"]), 401, "unauthorized")
            assert client.get(url, headers=AUTH).status_code == 200, url
        predict_url = "/v1/models/m/predict"
        assert_error(client.post(predict_url, json={"inputs": x.tolist()}), 401, "unauthorized")
        r = client.post(predict_url, json={"inputs": x.tolist()}, headers=AUTH)
        assert r.status_code == 200, r.text
        # Unknown models are not revealed without the token either.
        assert_error(client.get("/v1/models/ghost"), 401, "unauthorized")
        # Liveness stays open for orchestrators.
        assert client.get("/healthz").status_code == 200


def test_generated_token_is_kept_in_the_data_dir_with_mode_0600(tmp_path: Path):
    data_dir = tmp_path / "data"
    with running(data_dir, API_TOKEN=None) as (_, client):
        token_file = data_dir / "api-token"
        assert token_file.exists()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert token != TOKEN

        body = {"name": "m", "architecture": "mlp_bn", "config": {}}
        assert_error(client.post("/v1/models", json=body, headers=AUTH), 401, "unauthorized")
        assert_error(client.post("/v1/models", json=body), 401, "unauthorized")
        own = {"Authorization": f"Bearer {token}"}
        assert client.post("/v1/models", json=body, headers=own).status_code == 201
        assert [m["name"] for m in client.get("/v1/models").json()] == ["m"]

    # A restart on the same data dir keeps the same token.
    with running(data_dir, API_TOKEN=None) as (_, client):
        assert (data_dir / "api-token").read_text().strip() == token
        r = client.delete("/v1/models/m", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 204


@pytest.mark.parametrize(
    "content", ["", "\n", "   \n", "short\n"], ids=["empty", "newline", "blank", "short"]
)
def test_an_empty_or_short_token_file_is_replaced_never_used(tmp_path: Path, spawn, content):
    """A full disk on first start used to leave an empty api-token, and `Bearer` alone got in."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token_file = data_dir / "api-token"
    token_file.write_text(content)
    srv = spawn(data_dir, BNSERVE_API_TOKEN="")  # empty: unset, the file decides
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    body = {"name": "m", "architecture": "mlp_bn", "config": {}}
    for bad in {"Bearer", f"Bearer {content.strip()}".strip(), "bearer"}:
        r = httpx.post(srv.url + "/v1/models", json=body, headers={"Authorization": bad})
        assert_error(r, 401, "unauthorized")
    assert httpx.get(srv.url + "/v1/models").json() == []
    own = {"Authorization": f"Bearer {token}"}
    assert httpx.post(srv.url + "/v1/models", json=body, headers=own).status_code == 201
    assert "is empty or short; replacing it" in srv.log()


@pytest.mark.parametrize("value", ["short", "   padded-but-short   ", " " * 20])
def test_a_short_api_token_setting_refuses_the_start_naming_it(tmp_path: Path, value):
    proc = ServerProcess(tmp_path / "data", {"BNSERVE_API_TOKEN": value})
    with pytest.raises(RuntimeError, match="server exited") as caught:
        proc.start()
    assert "BNSERVE_API_TOKEN must be at least 16 characters" in str(caught.value)
    assert not (tmp_path / "data" / "api-token").exists()


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path):
    """Several processes replacing an empty token file at once all end up with the same token."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "api-token").write_text("")
    code = (
        "import sys; from service.api.auth import load_or_create_token; "
        "from service.settings import Settings; "
        "print(load_or_create_token(Settings(DATA_DIR=sys.argv[1], API_TOKEN=None)))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(data_dir)], cwd=REPO, stdout=subprocess.PIPE
        )
        for _ in range(6)
    ]
    tokens = {proc.communicate(timeout=120)[0].decode().strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert tokens == {(data_dir / "api-token").read_text().strip()}
    assert len(tokens.pop()) >= 32
    assert sorted(p.name for p in data_dir.iterdir()) == [".api-token.lock", "api-token"]
