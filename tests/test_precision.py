"""`BNSERVE_FP32_PRECISION` (`service/serving/precision.py`): set at start in the API and the
workers, read back from torch, and followed by the gate's and the optimizations' tolerances.

No GPU is needed: the CUDA backends' flags exist (and read back) in a CPU build, and the
tolerances follow the flags whatever the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from models import ClassifierConfig, NumClasses, register_architecture
from models.registry import _unregister
from service.serving.precision import apply_precision, backend_precisions
from service.worker.runner import Worker
from tests.conftest import create_model, pt_bytes, upload
from tests.helpers_api import assert_error, running, serve
from tests.helpers_jobs import blobs, dataset_id, get_job, start_job, versions

BATCHY = "test_precision_batchy"


class _Config(ClassifierConfig):
    num_classes: NumClasses = 2

    def input_shape(self) -> tuple[int, ...]:
        return (2,)


class Batchy(nn.Module):
    """Outputs that move by ~2e-4 with the batch: kernel rounding under TF32, not under IEEE."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.fc(x)) + 2e-4 * x.mean(0, keepdim=True)
        return out


@pytest.fixture
def batchy() -> Iterator[None]:
    register_architecture(BATCHY, description="Batch-dependent by 2e-4.", config=_Config)(
        lambda cfg: Batchy()
    )
    yield
    _unregister(BATCHY)
    apply_precision("ieee")  # as every server of the other tests sets it


def test_the_server_sets_the_precision_and_the_checks_follow(tmp_path: Path, batchy) -> None:
    weights = pt_bytes(Batchy().state_dict())
    apply_precision("tf32")  # what PyTorch's own default is for cuDNN convolutions
    with running(tmp_path / "ieee") as (_, client):
        assert set(backend_precisions().values()) == {"ieee"}
        create_model(client, "b", BATCHY)
        assert_error(upload(client, "b", weights), 422, "gate_failed")
        serve(client, "m")
        report = client.get("/v1/models/m/versions/1").json()["optimizations"]
        assert (report["fp32_precision"], report["max_abs_diff_allowed"]) == ("ieee", 1e-4)
    with running(tmp_path / "tf32", FP32_PRECISION="tf32") as (_, client):
        assert set(backend_precisions().values()) == {"tf32"}
        create_model(client, "b", BATCHY)
        r = upload(client, "b", weights)
        assert r.status_code == 201, r.text
        report = r.json()["optimizations"]
        assert (report["fp32_precision"], report["max_abs_diff_allowed"]) == ("tf32", 1e-2)


def test_a_worker_applies_it_and_the_lineage_records_it(tmp_path: Path, batchy) -> None:
    """The lineage says what the run's bits depend on, read back in the worker that trained."""
    with running(tmp_path / "data", FP32_PRECISION="tf32") as (srv, client):
        serve(client, "m")
        x, y = blobs(64)
        dataset = dataset_id(client, x, y)
        job = start_job(client, model="m", dataset=dataset, epochs=1, lr=0.05, batch_size=16)
        apply_precision("ieee")  # undo the API's setting: the worker must make its own
        worker = Worker(srv.settings)
        try:
            assert set(backend_precisions().values()) == {"tf32"}
            claimed = worker.queue.claim(worker.id)
            assert claimed is not None
            worker.run_one(claimed)
        finally:
            worker.owner.close()
        assert get_job(client, job)["status"] == "succeeded"
        lineage = versions(client, "m")[-1]["lineage"]
        assert lineage["environment"] == {
            "torch": torch.__version__,
            "device": "cpu",
            "intra_op_threads": torch.get_num_threads(),
            "fp32_precision": "tf32",
        }
