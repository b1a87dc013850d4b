"""What bnserve requires of an architecture (`service/architectures.py`), through a real server.

A plugin architecture may build BatchNorm layers with `track_running_stats=False`, which make
every eval-mode output depend on its batch: refused with 422 `bn_without_running_stats` when the
model is created, and again before an upload is read, a job is queued or a queued job trains
(a plugin redeployed after the model was created). A forward that raises in the gate's probe is
the gate's refusal, not a 500.
"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from models import list_architectures
from models.registry import _unregister
from service.architectures import _problem, batchnorms_without_running_stats
from service.worker.runner import Worker
from tests.conftest import AUTH, pt_bytes, upload
from tests.helpers_api import assert_error, builtin_architectures, running
from tests.helpers_jobs import blobs, dataset_id, get_job, post_job

PLUGIN = """
from __future__ import annotations

import torch
from torch import nn

from models import ClassifierConfig, NumClasses, register_architecture

TRACK = True  # the test flips it: the plugin as redeployed after its models were created


class FlatConfig(ClassifierConfig):
    num_classes: NumClasses = 2

    def input_shape(self) -> tuple[int, ...]:
        return (2,)


class ImageConfig(ClassifierConfig):
    num_classes: NumClasses = 2

    def input_shape(self) -> tuple[int, ...]:
        return (3, 8, 8)


@register_architecture("PREFIX_flat", description="BatchNorm1d, no statistics.", config=FlatConfig)
def flat(cfg: FlatConfig) -> nn.Module:
    bn = nn.BatchNorm1d(8, track_running_stats=False)
    return nn.Sequential(nn.Linear(2, 8), bn, nn.ReLU(), nn.Linear(8, 2))


@register_architecture("PREFIX_image", description="BatchNorm2d, no stats.", config=ImageConfig)
def image(cfg: ImageConfig) -> nn.Module:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@register_architecture("PREFIX_switch", description="Statistics while TRACK.", config=FlatConfig)
def switch(cfg: FlatConfig) -> nn.Module:
    bn = nn.BatchNorm1d(8, track_running_stats=TRACK)
    return nn.Sequential(nn.Linear(2, 8), bn, nn.ReLU(), nn.Linear(8, 2))


class NeedsCompany(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            raise RuntimeError("this forward wants a batch")
        out: torch.Tensor = self.bn(self.fc(x))
        return out


@register_architecture("PREFIX_raises", description="Fails alone.", config=FlatConfig)
def raises(cfg: FlatConfig) -> nn.Module:
    return NeedsCompany()
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, str]]:
    """The plugin above as a module on sys.path, and its names' prefix; undone afterwards."""
    prefix = f"p{uuid.uuid4().hex[:10]}"
    name = f"bnserve_test_plugin_{prefix}"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PLUGIN.replace("PREFIX", prefix))
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    yield module, prefix
    sys.modules.pop(name, None)
    for arch in list_architectures():
        if arch.name.startswith(prefix):
            _unregister(arch.name)


def test_bn_without_running_stats_is_refused_before_any_work(tmp_path: Path, plugin) -> None:
    module, prefix = plugin
    data_dir = tmp_path / "data"
    plugins = [module.__name__]
    with running(data_dir, ARCHITECTURE_PLUGINS=plugins) as (_, client):
        # At create time, for BatchNorm1d and BatchNorm2d alike; nothing is created.
        for kind in ("flat", "image"):
            body = {"name": kind, "architecture": f"{prefix}_{kind}"}
            answer = assert_error(
                client.post("/v1/models", json=body, headers=AUTH), 422, "bn_without_running_stats"
            )
            assert "track_running_stats=False): 1." in answer["detail"]
        assert client.get("/v1/models").json() == []

        # A model created while its plugin tracked statistics, and a job queued for it ...
        body = {"name": "s", "architecture": f"{prefix}_switch"}
        assert client.post("/v1/models", json=body, headers=AUTH).status_code == 201
        x, y = blobs(64)
        job = {"model": "s", "dataset": dataset_id(client, x, y), "lr": 0.1, "epochs": 2}
        queued = post_job(client, **job)
        assert queued.status_code == 202, queued.text

    # ... then the plugin is redeployed without statistics, and the server restarted (which
    # forgets the checks it remembered, as a new process does).
    module.TRACK = False
    _problem.cache_clear()
    with running(data_dir, ARCHITECTURE_PLUGINS=plugins) as (srv, client):
        fresh = module.switch(None).state_dict()
        # Refused before the body is read: an empty file would otherwise be unreadable_checkpoint.
        assert_error(upload(client, "s", b""), 422, "bn_without_running_stats")
        assert_error(upload(client, "s", pt_bytes(fresh)), 422, "bn_without_running_stats")
        assert_error(post_job(client, **job), 422, "bn_without_running_stats")
        # The job queued before is failed by the worker before it trains a single step.
        worker = Worker(srv.settings)
        try:
            claimed = worker.queue.claim(worker.id)
            assert claimed is not None
            worker.run_one(claimed)
        finally:
            worker.owner.close()
        ended = get_job(client, queued.json()["id"])
        assert ended["status"] == "failed"
        assert "track_running_stats=False" in ended["error"]
        assert ended["metrics"] == []
        assert client.get("/v1/models/s/versions").json() == []


def test_an_exception_in_the_gate_probe_is_the_gate_refusal(tmp_path: Path, plugin) -> None:
    module, prefix = plugin
    with running(tmp_path / "data", ARCHITECTURE_PLUGINS=[module.__name__]) as (_, client):
        body = {"name": "r", "architecture": f"{prefix}_raises"}
        assert client.post("/v1/models", json=body, headers=AUTH).status_code == 201
        weights = module.NeedsCompany().state_dict()
        answer = assert_error(upload(client, "r", pt_bytes(weights)), 422, "gate_failed")
        assert "RuntimeError: this forward wants a batch" in answer["detail"]
        assert answer["error_type"] == "RuntimeError"
        assert client.get("/v1/models/r/versions").json() == []


def test_builtin_architectures_need_no_build_to_pass() -> None:
    """`check_architecture` trusts `models/` without building: every BN layer there tracks."""
    for arch in builtin_architectures():
        module = arch.build(arch.default_config())
        assert batchnorms_without_running_stats(module) == [], arch.name
