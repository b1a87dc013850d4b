"""`service.client` against a real server: every v1 endpoint, typed results, the server's errors."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from service.api.schemas import ModelPublic
from service.client import APIError, AsyncClient, Client
from tests.conftest import TOKEN, ThreadServer, pt_bytes, trained_state_dict
from tests.helpers_jobs import blobs, npz_bytes


@pytest.fixture
def bn(server: ThreadServer):
    with Client(server.url, token=TOKEN) as client:
        yield client


def test_models_versions_promote_and_predict(bn: Client, tmp_path: Path):
    assert bn.health().status == "ok"
    assert "mlp_bn" in {a.name for a in bn.architectures()}
    created = bn.create_model("blobs", "mlp_bn")
    assert isinstance(created, ModelPublic)
    assert (created.input_shape, created.serving_version) == ([2], None)
    assert bn.ready().status == "ready"  # nothing to serve yet is nothing missing

    path = tmp_path / "w.pt"
    path.write_bytes(pt_bytes(trained_state_dict("mlp_bn", seed=1)))
    seen: list[tuple[int, int]] = []
    v1 = bn.upload_version(
        "blobs", path, note="first", on_progress=lambda s, t: seen.append((s, t))
    )
    assert (v1.version, v1.serving, v1.note) == (1, True, "first")
    assert seen[-1] == (path.stat().st_size, path.stat().st_size)
    v2 = bn.upload_version("blobs", pt_bytes(trained_state_dict("mlp_bn", seed=2)), promote=False)
    assert (v2.version, v2.serving) == (2, False)
    assert [v.version for v in bn.versions("blobs")] == [1, 2]
    assert bn.version("blobs", 2).sha256 == v2.sha256
    assert hashlib.sha256(bn.weights("blobs", 1)).hexdigest() == v1.sha256

    x = np.array([[-1.5, 0.0], [1.5, 0.0]], np.float32)
    as_json = bn.predict("blobs", x.tolist())
    as_npy = bn.predict("blobs", x)  # sent as application/x-npy
    assert (as_json.version, len(as_json.outputs)) == (1, 2)
    np.testing.assert_allclose(as_npy.outputs, as_json.outputs, rtol=1e-6)
    assert as_json.predictions is not None
    assert as_json.probabilities is not None

    promoted = bn.promote("blobs", 2)
    assert (promoted.serving_version, promoted.previous_version) == (2, 1)
    assert bn.predict("blobs", x.tolist()).version == 2
    assert bn.predict("blobs", x.tolist(), version=1).version == 1
    assert bn.model("blobs").serving_version == 2
    assert [m.name for m in bn.models()] == ["blobs"]
    assert "bnserve" in bn.metrics()
    bn.delete_model("blobs")
    assert bn.models() == []


def test_datasets_and_jobs(bn: Client):
    bn.create_model("blobs", "mlp_bn")
    x, y = blobs(64)
    dataset = bn.upload_dataset(npz_bytes(x=x, y=y), name="blobs", filename="b.npz")
    assert (dataset.name, dataset.num_samples, dataset.x_shape) == ("blobs", 64, [64, 2])
    assert [d.id for d in bn.datasets()] == [dataset.id]
    assert bn.dataset(dataset.id).sha256 == dataset.sha256

    job = bn.create_job("blobs", dataset.id, epochs=2, batch_size=8, lr=0.1, seed=None)
    assert (job.status, job.progress.epochs, job.progress.eta_s) == ("queued", 2, None)
    assert [j.id for j in bn.jobs()] == [job.id]
    assert bn.jobs(status="running") == []
    cancelled = bn.cancel_job(job.id)  # no worker here: a queued job ends at once
    assert cancelled.status == "cancelled"
    assert bn.wait_job(job.id).status == "cancelled"
    assert bn.job(job.id).status == "cancelled"


def test_errors_carry_the_servers_status_code_and_detail(server: ThreadServer, bn: Client):
    with pytest.raises(APIError) as missing:
        bn.model("nope")
    assert (missing.value.status, missing.value.code) == (404, "model_not_found")
    assert "nope" in missing.value.detail

    bn.create_model("blobs", "mlp_bn")
    with pytest.raises(APIError) as exists:
        bn.create_model("blobs", "mlp_bn")
    assert (exists.value.status, exists.value.code) == (409, "model_exists")

    with pytest.raises(APIError) as bad:
        bn.create_job("blobs", "no-such-dataset", epochs=0, lr=0.1)
    assert bad.value.status == 422
    assert bad.value.body["errors"]  # the field-level list comes along

    with Client(server.url) as anonymous, pytest.raises(APIError) as denied:
        anonymous.create_model("other", "mlp_bn")
    assert (denied.value.status, denied.value.code) == (401, "unauthorized")


def test_async_client(server: ThreadServer):
    async def scenario() -> None:
        async with AsyncClient(server.url, token=TOKEN) as bn:
            assert (await bn.health()).status == "ok"
            await bn.create_model("blobs", "mlp_bn")
            weights = pt_bytes(trained_state_dict("mlp_bn", seed=1))
            assert (await bn.upload_version("blobs", weights)).version == 1
            answer = await bn.predict("blobs", np.zeros((3, 2), np.float32))
            assert (answer.version, len(answer.outputs)) == (1, 3)
            x, y = blobs(64)
            dataset = await bn.upload_dataset(npz_bytes(x=x, y=y), filename="b.npz")
            job = await bn.create_job("blobs", dataset.id, epochs=1, batch_size=8, lr=0.1)
            await bn.cancel_job(job.id)
            events = [e async for e in bn.job_events(job.id)]
            assert [e.event for e in events] == ["cancelled"]
            assert (await bn.wait_job(job.id)).status == "cancelled"
            with pytest.raises(APIError) as missing:
                await bn.promote("blobs", 7)
            assert (missing.value.status, missing.value.code) == (404, "version_not_found")

    asyncio.run(scenario())


def test_the_client_imports_neither_torch_nor_the_database() -> None:
    """So a script (or the CLI) that only talks to a server starts in a fraction of a second."""
    import subprocess
    import sys

    code = "import sys, service.client; print(sorted({'torch', 'sqlalchemy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
