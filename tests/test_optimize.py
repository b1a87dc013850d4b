"""Serving-time optimizations (`service/serving/optimize.py`, `folding.py`): every built-in
architecture gives the plain eval module's outputs after folding (and channels_last), folds that
would be wrong or cannot be analysed fall back with a reason, loading never disturbs forwards in
other threads, the plain module does not outlive the load, and a real server reports what it
applied and still answers like plain PyTorch."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from models import ClassifierConfig, NumClasses, get_architecture, register_architecture
from models.registry import _unregister
from service.serving.folding import fold_batchnorm
from service.serving.loaded import LoadedModel, build_loaded
from service.serving.optimize import MAX_ABS_DIFF, OptimizeOptions, optimize
from service.settings import Settings
from tests.conftest import AUTH, pt_bytes, reference_model, trained_state_dict, upload
from tests.helpers_api import (
    arch_cases,
    close,
    input_shape,
    predict_ok,
    running,
    samples,
    serve,
)

CPU = torch.device("cpu")

# Every built-in architecture and small config, plus BN variants the fold must honour.
CASES = [
    *arch_cases(),
    pytest.param("mlp_bn", {"bn_affine": False}, id="mlp_bn-no-affine"),
    pytest.param("seed_cnn", {"bn_affine": False, "bn_eps": 1e-3}, id="seed_cnn-no-affine-eps"),
    pytest.param(
        "resnet18",
        {"stem": "cifar", "image_size": 8, "num_classes": 3, "bn_affine": False},
        id="resnet18-cifar-no-affine",
    ),
    pytest.param("clip3d", {"frames": 2, "size": 4, "bn_eps": 0.1}, id="clip3d-eps"),
]


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def trained_module(architecture: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A plain eval-mode module whose BN statistics moved away from their defaults and whose BN
    affine parameters (when it has them) are random, so folding has real work to do."""
    state_dict = trained_state_dict(architecture, seed=seed, **config)
    generator = torch.Generator().manual_seed(seed + 100)
    for key, value in state_dict.items():
        if key.endswith((".weight", ".bias")) and value.dim() == 1:
            owner = key.rsplit(".", 1)[0]
            if f"{owner}.running_mean" in state_dict:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.5 + 0.1)
    module: nn.Module = reference_model(architecture, state_dict, **config)
    return module.requires_grad_(False)


def outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = module(x)
    return out


def assert_equivalent(plain: nn.Module, served: nn.Module, shape: tuple[int, ...]) -> None:
    """Within MAX_ABS_DIFF of the plain module at batch 1 and 8, on inputs the check never saw."""
    for n in (1, 8):
        x = samples(shape, n, seed=40 + n)
        diff = (outputs(served, x) - outputs(plain, x)).abs().max().item()
        assert diff < MAX_ABS_DIFF, (n, diff)


# --- equivalence for every architecture ---------------------------------------------------------


@pytest.mark.parametrize(("architecture", "config"), CASES)
def test_folded_module_answers_like_the_plain_eval_module(
    architecture: str, config: dict[str, Any]
) -> None:
    plain = trained_module(architecture, config)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    shape = input_shape(architecture, config)
    bn_layers = sum(is_bn(m) for m in plain.modules())
    assert bn_layers > 0

    served, report = optimize(plain, shape, CPU, OptimizeOptions(channels_last=False))

    assert report.fallback is None, report.fallback
    assert report.bn_folded == bn_layers
    assert report.bn_left == 0
    assert not any(is_bn(m) for m in served.modules()), "every BatchNorm was folded away"
    assert not any(m.training for m in served.modules())
    assert report.max_abs_diff < MAX_ABS_DIFF
    assert_equivalent(plain, served, shape)
    after = plain.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the plain module is untouched"


@pytest.mark.parametrize(
    ("architecture", "config"),
    [
        pytest.param(a, c, id=i)
        for a, c, i in [
            ("seed_cnn", {}, "seed_cnn"),
            ("mnist_cnn", {"num_classes": 4}, "mnist_cnn"),
            ("resnet18", {"stem": "imagenet", "image_size": 16, "num_classes": 3}, "resnet18"),
            ("clip3d", {"frames": 4, "size": 8, "num_classes": 3}, "clip3d"),
        ]
    ],
)
def test_channels_last_conv_nets_answer_like_the_plain_eval_module(
    architecture: str, config: dict[str, Any]
) -> None:
    plain = trained_module(architecture, config, seed=3)
    shape = input_shape(architecture, config)
    served, report = optimize(plain, shape, CPU, OptimizeOptions(channels_last=True))
    assert report.channels_last, report.fallback
    assert report.fallback is None
    memory_format = torch.channels_last if len(shape) == 3 else torch.channels_last_3d
    convs = [m for m in served.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    assert convs
    assert all(c.weight.is_contiguous(memory_format=memory_format) for c in convs)
    assert_equivalent(plain, served, shape)


def test_channels_last_is_decided_by_a_short_measurement_and_recorded() -> None:
    config = {"stem": "cifar", "image_size": 8, "num_classes": 3}
    plain = trained_module("resnet18", config)
    served, report = optimize(plain, input_shape("resnet18", config), CPU)
    timings = report.timings_ms
    assert timings["contiguous_forward"] > 0
    assert timings["channels_last_forward"] > 0
    faster = timings["channels_last_forward"] <= 0.9 * timings["contiguous_forward"]
    assert report.channels_last == faster
    weight = next(m for m in served.modules() if isinstance(m, nn.Conv2d)).weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == report.channels_last
    # An MLP has no convolution: nothing to measure.
    _, mlp_report = optimize(trained_module("mlp_bn", {}), (2,), CPU)
    assert "contiguous_forward" not in mlp_report.timings_ms
    assert not mlp_report.channels_last


# --- what is left alone, and what falls back -----------------------------------------------------


class SharedOutput(nn.Module):
    """conv1's output feeds its BN and also the residual sum: folding bn1 would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        out: torch.Tensor = self.bn2(self.conv2(self.bn1(y) + y))
        return out.flatten(1)


class BatchNormNotAfterALayer(nn.Module):
    """BNs on the input and after a ReLU: there is no Conv/Linear to fold them into."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6, 8)
        self.bn_after_relu = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.bn2 = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_after_relu(torch.relu(self.fc1(self.bn_in(x))))
        out: torch.Tensor = self.bn2(self.fc2(x))
        return out


class SharedLayer(nn.Module):
    """One Linear called twice, once followed by a BN: folding would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.bn(self.fc(x)))
        return out


class WrongAxis(nn.Module):
    """Linear over the last axis, then BatchNorm1d over axis 1 of an (N, C, L) tensor: shapes
    agree (C == L == 4), but a fold would scale the wrong axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.fc(x)).flatten(1)
        return out


class TiedWeights(nn.Module):
    """conv's weight also serves a second, hand-written convolution: folding bn into conv would
    rescale that one too. The analysis follows tensors, not weights, so only the check sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tied = nn.functional.conv2d(x, self.conv.weight, padding=1)
        out: torch.Tensor = (self.bn(self.conv(x)) + tied).flatten(1)
        return out


class DataDependent(nn.Module):
    """Control flow on a tensor's value (a weight's, so the outputs still do not depend on the
    batch): another input could take another path, so nothing is folded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.fc(x))
        return out if self.fc.bias.sum() > -100 else -out


class ViewsItsActivations(nn.Module):
    """`.view` needs contiguous activations, which a channels_last conv does not give."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        out: torch.Tensor = self.fc(y.view(y.size(0), -1))
        return out


def trained(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(8, *shape) * 2 + 0.5)
        for m in module.modules():
            if is_bn(m):
                assert isinstance(m, nn.modules.batchnorm._BatchNorm)
                nn.init.normal_(m.weight, 1.0, 0.5)
                nn.init.normal_(m.bias, 0.0, 0.5)
    return module.eval().requires_grad_(False)


@pytest.mark.parametrize(
    ("module", "shape", "folded", "left"),
    [
        pytest.param(SharedOutput, (3, 6, 6), 1, 1, id="reused-conv-output"),
        pytest.param(BatchNormNotAfterALayer, (6,), 1, 2, id="bn-after-no-layer"),
        pytest.param(SharedLayer, (5,), 0, 1, id="shared-layer"),
        pytest.param(WrongAxis, (4, 4), 0, 1, id="linear-on-3d-input"),
    ],
)
def test_bn_that_cannot_be_folded_is_left_in_place(
    module: Callable[[], nn.Module], shape: tuple[int, ...], folded: int, left: int
) -> None:
    plain = trained(module(), shape)
    served, report = optimize(plain, shape, CPU, OptimizeOptions(channels_last=False))
    assert (report.bn_folded, report.bn_left) == (folded, left)
    assert report.fallback is None
    assert sum(is_bn(m) for m in served.modules()) == left
    assert_equivalent(plain, served, shape)


def test_a_fold_that_changes_the_outputs_falls_back_to_the_plain_module() -> None:
    plain = trained(TiedWeights(), (3, 5, 5))
    _, count = fold_batchnorm(plain, torch.zeros(1, 3, 5, 5))
    assert count == 1, "the analysis folds it, so only the check can catch it"
    served, report = optimize(plain, (3, 5, 5), CPU, OptimizeOptions(channels_last=False))
    assert served is plain
    assert report.bn_folded == 0
    assert report.bn_left == 1
    assert report.max_abs_diff == 0.0
    assert report.fallback is not None
    assert "BatchNorm folding moved the outputs by" in report.fallback
    assert "not applied" in report.fallback


def test_data_dependent_control_flow_is_served_as_it_was() -> None:
    plain = trained(DataDependent(), (3,))
    served, report = optimize(plain, (3,), CPU)
    assert served is plain
    assert report.bn_folded == 0
    assert report.fallback is not None
    assert report.fallback == (
        "BatchNorm folding skipped: the forward reads tensor values into Python (__bool__), "
        "so its path may depend on the input"
    )


def test_a_layout_the_forward_cannot_take_is_not_applied() -> None:
    plain = trained(ViewsItsActivations(), (3, 5, 5))
    served, report = optimize(plain, (3, 5, 5), CPU, OptimizeOptions(channels_last=True))
    assert not report.channels_last
    assert report.bn_folded == 1, "the fold before it stays"
    assert report.fallback is not None
    assert report.fallback.startswith("channels_last failed (RuntimeError: view size")
    assert_equivalent(plain, served, (3, 5, 5))


def test_optimizing_never_disturbs_forwards_running_in_other_threads() -> None:
    """Other versions keep serving while one loads. torch.fx's symbolic tracing, which patches
    torch.nn.Module.__call__ for the whole process, failed thousands of such forwards."""
    config = {"stem": "cifar", "image_size": 8, "num_classes": 3}
    loading = trained_module("resnet18", config)
    serving = trained_module("mlp_bn", {})
    x = samples((2,), 4)
    expected = outputs(serving, x)
    errors: list[str] = []
    done = threading.Event()
    count = 0

    def serve() -> None:
        nonlocal count
        while not done.is_set():
            try:
                assert torch.equal(outputs(serving, x), expected)
            except Exception as exc:  # reported below, whatever it is
                errors.append(repr(exc))
            count += 1

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        _, report = optimize(loading, input_shape("resnet18", config), CPU)
    finally:
        done.set()
        thread.join()
    assert report.bn_folded == 20
    assert count > 0
    assert errors == []


# --- through build_loaded: a plugin architecture, memory, the log line --------------------------


class TinyConfig(ClassifierConfig):
    num_classes: NumClasses = 4

    def input_shape(self) -> tuple[int, ...]:
        return (3,)


@pytest.fixture
def untraceable_plugin() -> Iterator[str]:
    name = "test_untraceable_plugin"

    @register_architecture(name, description="Data-dependent control flow.", config=TinyConfig)
    def build(cfg: TinyConfig) -> nn.Module:
        return DataDependent()

    yield name
    _unregister(name)


def load(architecture: str, state_dict: dict[str, torch.Tensor], **config: Any) -> LoadedModel:
    arch = get_architecture(architecture)
    return build_loaded(
        name="m",
        version=1,
        sha256="",
        architecture=arch,
        config=arch.parse_config(config),
        state_dict=state_dict,
        device=CPU,
    )


def test_a_plugin_that_cannot_be_analysed_loads_plain_and_says_why(untraceable_plugin: str) -> None:
    plain = trained(DataDependent(), (3,))
    loaded = load(untraceable_plugin, plain.state_dict())
    assert isinstance(loaded.module, DataDependent)
    assert loaded.optimizations.bn_left == 1
    assert "reads tensor values into Python" in (loaded.optimizations.fallback or "")
    x = samples((3,), 8, seed=3)
    assert torch.equal(loaded.forward(x), outputs(plain, x))


@pytest.fixture
def recorded_builds() -> Iterator[tuple[str, list[weakref.ref[nn.Module]]]]:
    """`resnet18` under another name, whose builder keeps a weak reference to each plain module."""
    name = "test_resnet18_recorded"
    resnet = get_architecture("resnet18")
    refs: list[weakref.ref[nn.Module]] = []

    def build(cfg: Any) -> nn.Module:
        module = resnet.builder(cfg)
        refs.append(weakref.ref(module))
        return module

    register_architecture(name, description="resnet18, recorded.", config=resnet.config_cls)(build)
    yield name, refs
    _unregister(name)


def tensor_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_loaded_version_keeps_only_the_served_module(
    recorded_builds: tuple[str, list[weakref.ref[nn.Module]]], channels_last: bool
) -> None:
    name, refs = recorded_builds
    config = {"stem": "cifar", "image_size": 8, "num_classes": 3}
    state_dict = trained_state_dict("resnet18", **config)
    arch = get_architecture(name)
    # Reference counting alone must free both modules: an evicted version's tensors are handed
    # back when its last request ends, not whenever the cyclic collector next runs.
    gc.collect()
    gc.disable()
    try:
        loaded = build_loaded(
            name="m",
            version=1,
            sha256="",
            architecture=arch,
            config=arch.parse_config(config),
            state_dict=state_dict,
            device=CPU,
            options=OptimizeOptions(channels_last=channels_last),
        )
        assert len(refs) == 1
        assert refs[0]() is None, "no reference to the plain module survives the load"
        served_ref = weakref.ref(loaded.module)
        assert loaded.optimizations.bn_folded == 20
        assert loaded.optimizations.channels_last == channels_last
        weights = tensor_bytes(state_dict.values())
        served = tensor_bytes([*loaded.module.parameters(), *loaded.module.buffers()])
        assert served <= 1.2 * weights + 64 * 1024, (served, weights)
        x = samples((3, 8, 8), 4)
        expected = outputs(reference_model("resnet18", state_dict, **config), x)
        assert close(loaded.forward(x), expected)
        del loaded
        assert served_ref() is None, "the served module is freed with its LoadedModel"
    finally:
        gc.enable()


def test_each_load_logs_one_line_with_what_was_applied(caplog: pytest.LogCaptureFixture) -> None:
    state_dict = trained_state_dict("mlp_bn")
    with caplog.at_level(logging.INFO, logger="service.serving.loaded"):
        load("mlp_bn", state_dict)
    lines = [r.getMessage() for r in caplog.records if r.name == "service.serving.loaded"]
    assert len(lines) == 1, lines
    assert "loaded m version 1 for serving: 2 BatchNorm folded (0 left)" in lines[0]
    assert "channels_last=False, compiled=False, max abs diff" in lines[0]


# --- through a real server ---------------------------------------------------------------------


def test_version_json_reports_the_optimizations_and_predictions_match_pytorch(
    tmp_path: Path,
) -> None:
    config = {"stem": "cifar", "image_size": 8, "num_classes": 3}
    with running(tmp_path / "data") as (_, client):
        state_dict = serve(client, "r", "resnet18", **config)
        body = client.get("/v1/models/r/versions/1").json()
        report = body["optimizations"]
        assert report is not None
        assert report["bn_folded"] == 20
        assert report["bn_left"] == 0
        assert report["compiled"] is False
        assert isinstance(report["channels_last"], bool)
        assert 0 <= report["max_abs_diff"] < MAX_ABS_DIFF
        assert report["fallback"] is None
        assert report["timings_ms"]["total"] > 0
        listed = client.get("/v1/models/r/versions").json()
        assert [v["optimizations"] for v in listed] == [report]

        x = samples(input_shape("resnet18", config), 9, seed=11)
        out, version = predict_ok(client, "r", x)
        assert version == 1
        assert close(out, outputs(reference_model("resnet18", state_dict, **config), x))

        # A version this process has not loaded reports null, until a request loads it.
        second = trained_state_dict("resnet18", seed=1, **config)
        r = upload(client, "r", pt_bytes(second), promote="false")
        assert r.status_code == 201, r.text
        assert r.json()["optimizations"] is None
        assert client.get("/v1/models/r/versions/2").json()["optimizations"] is None
        out, version = predict_ok(client, "r", x[:1], version=2)
        assert version == 2
        assert close(out, outputs(reference_model("resnet18", second, **config), x[:1]))
        loaded_report = client.get("/v1/models/r/versions/2").json()["optimizations"]
        assert loaded_report["bn_folded"] == 20


# Inductor imports torch.utils.mkldnn, whose torch.jit decorators warn (PyTorch's code, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_setting_compiles_and_warms_before_serving(tmp_path: Path) -> None:
    """BNSERVE_COMPILE=true: the version is compiled inside the load, and answers unchanged.

    Takes ~30-60 s on the 2-core machine (inductor compiles C++ for batch 1 and for the dynamic
    batch size); gcc is part of the dev set-up, so this is never skipped.
    """
    with running(tmp_path / "data", COMPILE=True, MAX_BATCH_SIZE=16) as (srv, client):
        r = client.post("/v1/models", json={"name": "c", "architecture": "mlp_bn"}, headers=AUTH)
        assert r.status_code == 201, r.text
        state_dict = trained_state_dict("mlp_bn")
        r = upload(client, "c", pt_bytes(state_dict))
        assert r.status_code == 201, r.text
        report = r.json()["optimizations"]
        assert report["compiled"] is True, report["fallback"]
        assert report["bn_folded"] == 2
        assert report["max_abs_diff"] < MAX_ABS_DIFF
        assert report["timings_ms"]["compile"] > 0
        handle = srv.app_services.manager._serving["c"]
        assert isinstance(handle.loaded.module, torch._dynamo.eval_frame.OptimizedModule)
        reference = reference_model("mlp_bn", state_dict)
        compiled_frames = counters["frames"]["total"]
        for n in (1, 3, 16, 7):
            x = samples((2,), n, seed=n)
            out, _ = predict_ok(client, "c", x)
            assert close(out, outputs(reference, x)), n
        assert counters["frames"]["total"] == compiled_frames, "no request compiled anything"


def test_compile_is_off_by_default() -> None:
    assert Settings.model_fields["COMPILE"].default is False
    loaded = load("mlp_bn", trained_state_dict("mlp_bn"))
    assert loaded.optimizations.compiled is False
    assert "compile" not in loaded.optimizations.timings_ms
    assert not isinstance(loaded.module, torch._dynamo.eval_frame.OptimizedModule)
