"""Downloading a version's weights streams the file: many at once hold little memory (issue 9)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_model, pt_bytes, trained_state_dict, upload

IN_FEATURES = 65_536  # fc1 is 64 x 65536 float32: a 16 MiB version
DOWNLOADS = 30


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.slow
def test_concurrent_downloads_stream_and_match_the_sha256(spawn, tmp_path: Path):
    srv = spawn(tmp_path / "data")
    assert srv.proc is not None
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        create_model(client, "big", "mlp_bn", in_features=IN_FEATURES)
        state = trained_state_dict("mlp_bn", in_features=IN_FEATURES)
        r = upload(client, "big", pt_bytes(state))
        assert r.status_code == 201, r.text
        sha, size = r.json()["sha256"], r.json()["size_bytes"]
        assert size > 16 * 2**20
        warm = client.get("/v1/models/big/versions/1/weights")
        assert hashlib.sha256(warm.content).hexdigest() == sha
    baseline = _rss_bytes(srv.proc.pid)

    # Every download reads its first chunk, then all wait until each of them is in flight, so
    # the server holds 30 responses at once while its memory is read.
    started = threading.Barrier(DOWNLOADS + 1, timeout=120)
    measured = threading.Event()
    digests: list[str] = []

    def download() -> None:
        with (
            httpx.Client(base_url=srv.url, timeout=120) as c,
            c.stream("GET", "/v1/models/big/versions/1/weights") as response,
        ):
            assert response.status_code == 200
            assert response.headers["x-checkpoint-sha256"] == sha
            assert int(response.headers["content-length"]) == size
            digest = hashlib.sha256()
            chunks = response.iter_bytes()
            digest.update(next(chunks))
            started.wait()
            measured.wait(120)
            for chunk in chunks:
                digest.update(chunk)
            digests.append(digest.hexdigest())

    threads = [threading.Thread(target=download) for _ in range(DOWNLOADS)]
    for t in threads:
        t.start()
    started.wait()
    in_flight = _rss_bytes(srv.proc.pid)
    measured.set()
    for t in threads:
        t.join()

    assert digests == [sha] * DOWNLOADS
    # Read whole, 30 responses held 30 copies of the file (and their send buffers).
    assert in_flight - baseline < 3 * size, (baseline, in_flight, size)
