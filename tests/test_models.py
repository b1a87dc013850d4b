"""Tests for `models/`: every registered architecture, the registry and plugin loading."""

from __future__ import annotations

import ast
import json
import re
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm  # base of BatchNorm1d/2d/3d and SyncBatchNorm

import models
from models import (
    Architecture,
    ConfigError,
    UnknownArchitecture,
    get_architecture,
    list_architectures,
    load_plugins,
    register_architecture,
)
from models.mlp import MLPConfig
from models.registry import _unregister
from models.resnet import ResNetConfig, resnet18

ARCHITECTURES = list_architectures()
CLASSIFIERS = [a for a in ARCHITECTURES if a.default_config().task == "classification"]


def arch_id(arch: Architecture) -> str:
    return arch.name


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def field_errors(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {e["field"]: e["message"] for e in exc.value.errors}


def test_builtin_architectures_are_registered() -> None:
    names = [a.name for a in ARCHITECTURES]
    assert names == sorted(names)
    assert {"seed_cnn", "mnist_cnn", "mlp_bn", "resnet18", "clip3d"} <= set(names)


# --- every architecture ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_default_config_builds_and_predicts_in_eval_mode(arch: Architecture) -> None:
    torch.manual_seed(0)
    cfg = arch.default_config()
    model = arch.build(cfg).eval()
    batch = torch.randn(3, *cfg.input_shape())
    with torch.inference_mode():
        out = model(batch)
        alone = model(batch[:1])  # a batch of one: BatchNorm1d would raise in train mode
    assert out.shape == (3, cfg.num_outputs())
    assert alone.shape == (1, cfg.num_outputs())
    # Eval-mode BN uses running statistics, so a sample's output ignores its batch-mates.
    torch.testing.assert_close(alone, out[:1], rtol=1e-4, atol=1e-5)
    assert arch.description.strip()
    assert "\n" not in arch.description


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
@pytest.mark.parametrize(
    ("eps", "momentum", "affine"), [(1e-5, 0.1, True), (1e-3, None, True), (0.5, 0.01, False)]
)
def test_every_bn_layer_uses_the_config_options(
    arch: Architecture, eps: float, momentum: float | None, affine: bool
) -> None:
    cfg = arch.parse_config({"bn_eps": eps, "bn_momentum": momentum, "bn_affine": affine})
    model = arch.build(cfg)
    layers = bn_layers(model)
    assert layers, f"{arch.name} has no BatchNorm layer"
    for bn in layers:
        assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (
            eps,
            momentum,
            affine,
            True,
        )
    with torch.inference_mode():
        out = model.eval()(torch.randn(2, *cfg.input_shape()))
    assert out.shape == (2, cfg.num_outputs())


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_track_running_stats_false_is_refused_with_the_reason(arch: Architecture) -> None:
    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"track_running_stats": False})
    message = field_errors(exc)["track_running_stats"]
    assert "batch statistics" in message
    assert "other samples in its batch" in message
    assert "track_running_stats" in str(exc.value)
    assert arch.name in str(exc.value)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"no_such_option": 1}, "no_such_option"),
        ({"bn_eps": 0}, "bn_eps"),
        ({"bn_eps": float("nan")}, "bn_eps"),
        ({"bn_momentum": 0}, "bn_momentum"),
        ({"bn_momentum": 1.5}, "bn_momentum"),
    ],
)
def test_bad_options_are_refused_naming_the_field(
    arch: Architecture, raw: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        arch.parse_config(raw)
    assert field in field_errors(exc)
    assert field in str(exc.value)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_config_schema_is_json_and_lists_the_bn_options(arch: Architecture) -> None:
    schema = json.loads(json.dumps(arch.config_schema()))
    assert {"bn_eps", "bn_momentum", "bn_affine", "track_running_stats"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=arch_id)
def test_config_is_frozen_and_round_trips(arch: Architecture) -> None:
    cfg = arch.default_config()
    assert arch.parse_config(cfg.model_dump()) == cfg
    assert arch.parse_config(json.loads(cfg.model_dump_json())) == cfg
    with pytest.raises(ValueError, match="frozen"):
        cfg.bn_eps = 1.0  # type: ignore[misc]


# --- class labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CLASSIFIERS, ids=arch_id)
def test_class_labels(arch: Architecture) -> None:
    n = arch.default_config().num_outputs()
    assert arch.default_config().labels() == [str(i) for i in range(n)]
    names = [f"class-{i}" for i in range(n)]
    assert arch.parse_config({"class_labels": names}).labels() == names

    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"class_labels": names[:-1]})
    assert f"expected {n} class labels" in field_errors(exc)["class_labels"]
    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"class_labels": [*names[:-1], names[0]]})
    assert "unique" in field_errors(exc)["class_labels"]


def test_num_classes_bounds() -> None:
    arch = get_architecture("seed_cnn")
    for bad in (1, 100_001):
        with pytest.raises(ConfigError) as exc:
            arch.parse_config({"num_classes": bad})
        assert "num_classes" in field_errors(exc)


def test_mlp_regression() -> None:
    arch = get_architecture("mlp_bn")
    cfg = arch.parse_config({"task": "regression", "in_features": 5, "out_features": 1})
    assert isinstance(cfg, MLPConfig)
    assert (cfg.task, cfg.num_outputs(), cfg.labels(), cfg.input_shape()) == (
        "regression",
        1,
        None,
        (5,),
    )
    with torch.inference_mode():
        assert arch.build(cfg).eval()(torch.randn(1, 5)).shape == (1, 1)


def test_mlp_refuses_classification_with_one_output_and_labels_for_regression() -> None:
    arch = get_architecture("mlp_bn")
    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"out_features": 1})
    assert "regression" in field_errors(exc)["task"]
    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"task": "regression", "class_labels": ["a", "b"]})
    assert "classification" in field_errors(exc)["class_labels"]
    with pytest.raises(ConfigError) as exc:
        arch.parse_config({"out_features": 3, "class_labels": ["a", "b"]})
    assert "expected 3" in field_errors(exc)["class_labels"]


# --- key layouts that checkpoints depend on ----------------------------------------------------


class ArticleCNN(nn.Module):
    """The article's class, as written there: seed_cnn must load its state_dicts."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer1(x)
        out = out.reshape(out.size(0), -1)
        return self.fc(out)


def test_seed_cnn_matches_the_article_class() -> None:
    torch.manual_seed(0)
    article = ArticleCNN().eval()
    arch = get_architecture("seed_cnn")
    ours = arch.build(arch.default_config()).eval()
    theirs_sd, ours_sd = article.state_dict(), ours.state_dict()
    assert (
        list(ours_sd)
        == list(theirs_sd)
        == [
            "layer1.0.weight",
            "layer1.0.bias",
            "layer1.1.weight",
            "layer1.1.bias",
            "layer1.1.running_mean",
            "layer1.1.running_var",
            "layer1.1.num_batches_tracked",
            "fc.weight",
            "fc.bias",
        ]
    )
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}

    with torch.no_grad():  # non-trivial running statistics, so loading them is observable
        article.layer1[1].running_mean.uniform_(-1, 1)
        article.layer1[1].running_var.uniform_(0.5, 2)
    ours.load_state_dict(article.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), article(x))


def torchvision_resnet18_keys() -> set[str]:
    """State_dict keys of torchvision.models.resnet18(), spelled out from its naming rules."""

    def bn(prefix: str) -> list[str]:
        suffixes = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return [f"{prefix}.{s}" for s in suffixes]

    keys = {"conv1.weight", *bn("bn1"), "fc.weight", "fc.bias"}
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys |= {f"{p}.conv1.weight", *bn(f"{p}.bn1"), f"{p}.conv2.weight", *bn(f"{p}.bn2")}
            if layer > 1 and block == 0:  # stride 2 and wider: a 1x1 projection shortcut
                keys |= {f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")}
    return keys


@pytest.mark.parametrize(("stem", "kernel"), [("cifar", 3), ("imagenet", 7)])
def test_resnet18_state_dict_matches_torchvision(stem: str, kernel: int) -> None:
    arch = get_architecture("resnet18")
    cfg = arch.parse_config({"stem": stem, "num_classes": 7})
    sd = arch.build(cfg).state_dict()
    # 62 parameters (conv1 + bn1: 3, 8 blocks x 6, 3 shortcuts x 3, fc: 2) + 20 BNs x 3 buffers.
    assert len(sd) == 122
    assert set(sd) == torchvision_resnet18_keys()
    assert "layer4.1.bn2.running_var" in sd
    assert sd["conv1.weight"].shape == (64, 3, kernel, kernel)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["fc.weight"].shape == (7, 512)


def test_resnet18_imagenet_stem_and_options() -> None:
    arch = get_architecture("resnet18")
    cfg = arch.parse_config(
        {"stem": "imagenet", "image_size": 64, "in_channels": 1, "zero_init_residual": True}
    )
    assert cfg.input_shape() == (1, 64, 64)
    model = arch.build(cfg).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    assert torch.count_nonzero(model.state_dict()["layer3.1.bn2.weight"]) == 0
    assert torch.count_nonzero(model.state_dict()["layer3.1.bn1.weight"]) > 0


def test_resnet18_norm_layer_is_injectable() -> None:
    cfg = ResNetConfig()
    model = resnet18(cfg, norm_layer=partial(nn.BatchNorm2d, eps=0.25))
    assert {bn.eps for bn in bn_layers(model)} == {0.25}


# --- registry ----------------------------------------------------------------------------------


def test_duplicate_registration_is_refused() -> None:
    seed = get_architecture("seed_cnn")
    with pytest.raises(ValueError, match="'seed_cnn' is already registered"):
        register_architecture("seed_cnn", description="again", config=seed.config_cls)(seed.builder)
    assert get_architecture("seed_cnn") is seed


def test_bad_names_and_configs_are_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="must match"):
        register_architecture("has space", description="", config=MLPConfig)
    with pytest.raises(TypeError, match="ArchConfig subclass"):
        register_architecture("x", description="", config=dict)  # type: ignore[arg-type]


def test_unknown_architecture_lists_the_known_names() -> None:
    with pytest.raises(UnknownArchitecture) as exc:
        get_architecture("nope")
    assert isinstance(exc.value, KeyError)
    assert str(exc.value).startswith("unknown architecture 'nope'; known: ")
    for arch in ARCHITECTURES:
        assert arch.name in str(exc.value)


def test_build_refuses_another_architectures_config() -> None:
    with pytest.raises(TypeError, match="needs a"):
        get_architecture("seed_cnn").build(get_architecture("mlp_bn").default_config())


def test_models_never_import_service() -> None:
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "service" or n.startswith("service.") for n in names), path


# --- plugins -----------------------------------------------------------------------------------


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path; modules imported from it and what they registered are undone."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before_modules, before_archs = set(sys.modules), {a.name for a in list_architectures()}
    yield tmp_path
    for name in set(sys.modules) - before_modules:
        del sys.modules[name]
    for arch in list_architectures():
        if arch.name not in before_archs:
            _unregister(arch.name)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def docstring_example() -> str:
    """The plugin example in `models/__init__.py` (reused in the README)."""
    match = re.search(r"::\n\n(.*?)\n\n(?=\S)", models.__doc__ or "", re.DOTALL)
    assert match, "models/__init__.py lost its plugin example"
    lines = match.group(1).splitlines()
    return "\n".join(line.removeprefix("    ") for line in lines) + "\n"


def test_load_plugins_registers_the_docstring_example(plugin_dir: Path) -> None:
    module, name = unique("bnserve_test_plugin"), unique("tiny_mlp")
    code = docstring_example().replace('"tiny_mlp"', f'"{name}"')
    (plugin_dir / f"{module}.py").write_text(code)

    assert load_plugins([module, f" {module} ", ""]) == [module, module]
    arch = get_architecture(name)
    assert arch.description.startswith("An 8-feature")
    cfg = arch.default_config()
    model = arch.build(cfg).eval()
    assert {bn.eps for bn in bn_layers(arch.build(arch.parse_config({"bn_eps": 0.01})))} == {0.01}
    with torch.inference_mode():
        assert model(torch.randn(1, *cfg.input_shape())).shape == (1, cfg.num_outputs())
    assert load_plugins([module]) == [module]  # cached import: no duplicate-registration error


def test_load_plugins_names_a_missing_module() -> None:
    missing = unique("bnserve_no_such_plugin")
    with pytest.raises(ImportError, match=missing) as exc:
        load_plugins([missing])
    assert exc.value.name == missing


def test_a_failing_plugin_is_named_and_its_registrations_undone(plugin_dir: Path) -> None:
    module, name = unique("bnserve_broken_plugin"), unique("half_done")
    (plugin_dir / f"{module}.py").write_text(
        "from models import get_architecture, register_architecture\n"
        "seed = get_architecture('seed_cnn')\n"
        f"register_architecture({name!r}, description='x', config=seed.config_cls)(seed.builder)\n"
        "raise RuntimeError('plugin bug')\n"
    )
    with pytest.raises(ImportError, match=rf"{module}.*RuntimeError: plugin bug"):
        load_plugins([module])
    with pytest.raises(UnknownArchitecture):
        get_architecture(name)


# --- dropout -----------------------------------------------------------------------------------

WITH_DROPOUT = [a for a in ARCHITECTURES if "dropout" in a.config_cls.model_fields]


def test_dropout_is_offered_where_it_fits() -> None:
    assert {a.name for a in WITH_DROPOUT} == {"mlp_bn", "seed_cnn", "mnist_cnn", "resnet18"}
    for arch in WITH_DROPOUT:
        assert arch.default_config().model_dump()["dropout"] == 0.0
        for bad in (-0.1, 1.0, float("nan")):
            with pytest.raises(ConfigError) as exc:
                arch.parse_config({"dropout": bad})
            assert "dropout" in field_errors(exc)


@pytest.mark.parametrize("arch", WITH_DROPOUT, ids=arch_id)
def test_dropout_is_active_in_training_only_and_adds_no_state(arch: Architecture) -> None:
    torch.manual_seed(0)
    plain = arch.build(arch.default_config())
    dropped = arch.build(arch.parse_config({"dropout": 0.5}))
    # No parameters or buffers: the same keys, so checkpoints load whatever p is.
    assert list(dropped.state_dict()) == list(plain.state_dict())
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, *arch.default_config().input_shape())
    with torch.no_grad():
        dropped.train()
        assert not torch.equal(dropped(x), dropped(x))
        dropped.load_state_dict(plain.state_dict())  # train-mode BN moved its statistics
        dropped.eval()
        plain.eval()
        assert torch.equal(dropped(x), dropped(x))
        assert torch.equal(dropped(x), plain(x))
