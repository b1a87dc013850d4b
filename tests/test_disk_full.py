"""A full disk: uploads, datasets and versions answer 507 and leave nothing behind; serving goes on.

The data dir is a real, small tmpfs (mounting needs root; without it the test says so and skips),
filled with a file so that exactly the step under test runs out of space.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import AUTH, create_model, pt_bytes, trained_state_dict, upload
from tests.helpers_api import assert_error
from tests.helpers_jobs import npz_bytes, upload_dataset

pytestmark = pytest.mark.slow

CONFIG = {"in_features": 2000}  # fc1 alone is 64 x 2000 float32: a ~0.5 MB checkpoint
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs as the data dir (needs root): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _free(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _leave_free(filler: Path, nbytes: int) -> None:
    """Fill the disk with `filler`, then give back `nbytes` (page-rounded) of it."""
    filler.unlink(missing_ok=True)
    with open(filler, "wb") as handle:
        chunk = b"\0" * (64 * 1024)
        while True:
            try:
                handle.write(chunk)
                handle.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        size = handle.tell()
    with open(filler, "r+b") as handle:
        handle.truncate(max(0, size - -(-nbytes // PAGE) * PAGE))
    assert abs(_free(filler.parent) - nbytes) <= 2 * PAGE + 64 * 1024


def _files(data_dir: Path, *folders: str) -> list[str]:
    return sorted(
        str(p.relative_to(data_dir))
        for folder in folders
        if (data_dir / folder).exists()
        for p in (data_dir / folder).rglob("*")
        if p.is_file()
    )


def _assert_full(r: httpx.Response, data_dir: Path) -> None:
    body = assert_error(r, 507, "insufficient_storage")
    assert str(data_dir.resolve()) in body["detail"], body


def test_a_full_disk_answers_507_keeps_nothing_partial_and_keeps_serving(small_disk, spawn):
    data_dir = small_disk
    srv = spawn(data_dir)
    filler = data_dir / "filler"
    x = np.random.default_rng(0).normal(size=(4, 2000)).astype(np.float32)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        create_model(client, "m", "mlp_bn", **CONFIG)
        v1 = pt_bytes(trained_state_dict("mlp_bn", seed=1, **CONFIG))
        assert upload(client, "m", v1).status_code == 201
        served = client.post("/v1/models/m/predict", json={"inputs": x.tolist()}).json()
        before = client.get("/v1/models/m", headers=AUTH).json()
        stored = _files(data_dir, "checkpoints", "uploads", "datasets")
        v2 = pt_bytes(trained_state_dict("mlp_bn", seed=2, **CONFIG))
        dataset = npz_bytes(x=x.repeat(50, axis=0), y=np.arange(200) % 2)

        # Room for the received upload but not for the version file staged from it.
        _leave_free(filler, len(v2) * 3 // 2)
        _assert_full(upload(client, "m", v2), data_dir)
        # No room even for the received upload (nor the dataset).
        _leave_free(filler, len(v2) // 4)
        _assert_full(upload(client, "m", v2), data_dir)
        _assert_full(upload_dataset(client, dataset), data_dir)

        # Nothing partial anywhere, no row, and the serving version still serves.
        assert _files(data_dir, "checkpoints", "uploads", "datasets") == stored
        assert client.get("/v1/models/m", headers=AUTH).json() == before
        assert client.get("/v1/datasets").json() == []
        assert client.get("/healthz").status_code == 200
        r = client.post("/v1/models/m/predict", json={"inputs": x.tolist()})
        assert r.status_code == 200
        assert r.json() == served

        # Space freed: the same uploads go through, numbered as if nothing had happened.
        filler.unlink()
        r = upload(client, "m", v2)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2
        r = upload_dataset(client, dataset)
        assert r.status_code == 201, r.text
    assert f"{r.json()['sha256']}.npz" in os.listdir(data_dir / "datasets")


def test_a_dataset_whose_row_cannot_be_written_leaves_no_file(small_disk, spawn):
    """The dataset file used to get its final name before its row; now the row comes first."""
    data_dir = small_disk
    srv = spawn(data_dir)
    filler = data_dir / "filler"
    x = np.random.default_rng(0).normal(size=(200, 500)).astype(np.float32)
    dataset = npz_bytes(x=x, y=np.arange(200) % 2)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        # Exactly room for the received upload: the rename costs nothing, the row write fails.
        outcomes = []
        for slack in (0, PAGE):
            _leave_free(filler, len(dataset) + slack)
            r = upload_dataset(client, dataset)
            outcomes.append(r.status_code)
            rows = client.get("/v1/datasets").json()
            files = _files(data_dir, "datasets", "uploads")
            if r.status_code == 507:
                _assert_full(r, data_dir)
                assert rows == []
                assert files == []
            else:
                assert r.status_code == 201, r.text
                assert [row["sha256"] for row in rows] == [r.json()["sha256"]]
                assert files == [f"datasets/{r.json()['sha256']}.npz"]
                break
        assert 507 in outcomes  # the full disk was really hit
        assert client.get("/healthz").status_code == 200
