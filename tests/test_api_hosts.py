"""The Host header check: a DNS-rebinding page (a foreign Host) cannot read the open GETs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers_api import assert_error, running, serve

READS = ["/v1/models", "/v1/models/m/versions/1/weights", "/readyz", "/metrics", "/docs"]


@pytest.mark.parametrize(
    ("header", "name"),
    [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "::1"), ("Example.COM", "example.com")],
)
def test_host_name_drops_the_port(header, name):
    from service.api.hosts import host_name

    assert host_name(header) == name


def test_a_foreign_host_gets_400_json_and_loopback_names_pass(client, server):
    serve(client, "m", "mlp_bn")
    for url in READS:
        r = client.get(url, headers={"Host": f"rebind.attacker.example:{server.port}"})
        body = assert_error(r, 400, "invalid_host")
        assert "BNSERVE_ALLOWED_HOSTS" in body["detail"]
        for host in ("127.0.0.1", "localhost", "[::1]"):
            r = client.get(url, headers={"Host": f"{host}:{server.port}"})
            assert r.status_code == 200, (url, host, r.text)
    r = client.post(
        "/v1/models/m/predict", json={"inputs": [0.5, -0.5]}, headers={"Host": "evil.example"}
    )
    assert_error(r, 400, "invalid_host")
    # Liveness answers whatever the Host: probes address pods by IP.
    assert client.get("/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 200


def test_allowed_hosts_setting_names_them_and_star_allows_all(tmp_path: Path, spawn):
    srv = spawn(BNSERVE_ALLOWED_HOSTS="api.example.com, *.corp.example,127.0.0.1")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for host, status in (
            ("api.example.com", 200),
            ("a.corp.example:443", 200),
            ("corp.example", 400),
            ("localhost", 400),
            ("other.example", 400),
        ):
            assert c.get("/v1/models", headers={"Host": host}).status_code == status, host
    with running(tmp_path / "star", ALLOWED_HOSTS=["*"]) as (_, c):
        assert c.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200
