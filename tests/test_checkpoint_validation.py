from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from service.checkpoints.reader import read_state_dict
from service.checkpoints.validation import (
    CheckpointReport,
    state_dict_from_safetensors,
    state_dict_to_safetensors,
    validate_state_dict,
)
from service.errors import InvalidCheckpoint


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        out: torch.Tensor = self.head(x.mean(dim=(2, 3)))
        return out


class Wrapper(nn.Module):
    """An architecture whose own keys all start with `module.`: nothing may be stripped."""

    def __init__(self) -> None:
        super().__init__()
        self.module = mlp()


def trained_mlp(steps: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp().train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, 4) * 3 + 1)
    return model


def refusal(state: dict[str, torch.Tensor], model: nn.Module) -> InvalidCheckpoint:
    with pytest.raises(InvalidCheckpoint) as caught:
        validate_state_dict(state, model)
    return caught.value


def test_good_state_dict_round_trips() -> None:
    source = trained_mlp()
    state = {k: v.clone() for k, v in source.state_dict(keep_vars=True).items()}

    out, report = validate_state_dict(state, mlp())

    expected = source.state_dict()
    assert list(out) == list(expected)
    for key, tensor in out.items():
        assert torch.equal(tensor, expected[key]), key
        assert tensor.is_contiguous()
        assert tensor.device.type == "cpu"
        assert not tensor.requires_grad
        assert tensor.untyped_storage().data_ptr() != state[key].untyped_storage().data_ptr()
    assert report.num_tensors == len(expected)
    assert report.num_parameters == sum(p.numel() for p in source.parameters())
    assert report.renamed == []
    assert report.dtype_casts == []
    assert report.warnings == []
    mlp().load_state_dict(out, strict=True)


@pytest.mark.parametrize(
    "prefixes",
    [["module."], ["_orig_mod."], ["module.", "_orig_mod."], ["_orig_mod.", "module."]],
)
def test_wrapper_prefixes_are_stripped_and_reported(prefixes: list[str]) -> None:
    model = ConvNet()
    joined = "".join(prefixes)
    state = {joined + k: v for k, v in model.state_dict().items()}

    out, report = validate_state_dict(state, ConvNet())

    assert list(out) == list(model.state_dict())
    n = len(state)
    assert [r.model_dump() for r in report.renamed] == [{"prefix": p, "count": n} for p in prefixes]


def test_prefix_on_only_some_keys_is_not_stripped() -> None:
    state = dict(mlp().state_dict())
    state["module.0.weight"] = state.pop("0.weight")

    error = refusal(state, mlp())

    assert error.code == "missing_keys"
    problems = {(e["key"], e["problem"]) for e in error.extra["errors"]}
    assert problems == {("0.weight", "missing"), ("module.0.weight", "unexpected")}


def test_architecture_own_module_prefix_is_kept() -> None:
    state = Wrapper().state_dict()

    out, report = validate_state_dict(state, Wrapper())

    assert list(out) == list(state)
    assert report.renamed == []


def test_missing_keys() -> None:
    state = dict(mlp().state_dict())
    del state["3.weight"], state["3.bias"]

    error = refusal(state, mlp())

    assert error.code == "missing_keys"
    assert error.status == 422
    assert "2 keys missing (3.weight, 3.bias)" in error.detail
    assert error.extra["errors"] == [
        {"key": "3.weight", "problem": "missing", "expected": [2, 8]},
        {"key": "3.bias", "problem": "missing", "expected": [2]},
    ]


def test_unexpected_keys() -> None:
    state = dict(mlp().state_dict())
    state["4.weight"] = torch.zeros(3, 2)

    error = refusal(state, mlp())

    assert error.code == "unexpected_keys"
    assert error.extra["errors"] == [{"key": "4.weight", "problem": "unexpected", "found": [3, 2]}]


def test_shape_mismatch_names_expected_and_found() -> None:
    state = dict(ConvNet().state_dict())
    state["conv.weight"] = torch.zeros(8, 3, 3, 3)

    error = refusal(state, ConvNet())

    assert error.code == "shape_mismatch"
    assert "conv.weight: expected [16, 3, 3, 3], found [8, 3, 3, 3]" in error.detail
    assert error.extra["errors"] == [
        {
            "key": "conv.weight",
            "problem": "shape_mismatch",
            "expected": [16, 3, 3, 3],
            "found": [8, 3, 3, 3],
        }
    ]


def test_all_problems_are_reported_at_once() -> None:
    state = dict(mlp().state_dict())
    del state["3.bias"]
    state["0.weight"] = torch.zeros(8, 5)
    state["1.running_var"] = torch.full((8,), -1.0)
    state["3.weight"] = torch.full((2, 8), float("nan"))

    error = refusal(state, mlp())

    assert error.code == "missing_keys"
    assert {e["problem"] for e in error.extra["errors"]} == {
        "missing",
        "shape_mismatch",
        "non_finite",
        "negative_running_var",
    }
    assert error.detail.index("missing") < error.detail.index("shape mismatch")


def test_lightning_style_nesting_gets_a_hint() -> None:
    state = {f"model.{k}": v for k, v in mlp().state_dict().items()}

    error = refusal(state, mlp())

    assert error.code == "missing_keys"
    assert "'model.' prefix" in error.detail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_weights_are_cast_and_reported(dtype: torch.dtype) -> None:
    source = trained_mlp()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}

    out, report = validate_state_dict(state, mlp())

    assert all(out[k].dtype == v.dtype for k, v in source.state_dict().items())
    assert torch.allclose(out["0.weight"], source.state_dict()["0.weight"], atol=1e-2)
    name = str(dtype).removeprefix("torch.")
    casts = report.model_dump(mode="json")["dtype_casts"]
    assert {"key": "0.weight", "from": name, "to": "float32"} in casts
    assert len(casts) == sum(1 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_weights_of_other_kinds_are_refused(dtype: torch.dtype) -> None:
    state = dict(mlp().state_dict())
    state["0.weight"] = torch.zeros(8, 4).to(dtype)

    error = refusal(state, mlp())

    assert error.code == "bad_dtype"
    assert error.extra["errors"] == [
        {
            "key": "0.weight",
            "problem": "dtype",
            "expected": "float32",
            "found": str(dtype).removeprefix("torch."),
        }
    ]


def test_sparse_weights_are_refused() -> None:
    state = dict(mlp().state_dict())
    state["0.weight"] = state["0.weight"].to_sparse()

    error = refusal(state, mlp())

    assert error.code == "bad_layout"
    assert error.extra["errors"][0]["found"] == "sparse_coo"
    assert error.extra["errors"][0]["expected"] == "strided"
    assert "sparse_coo" in error.detail
    assert "float32, expected float32" not in error.detail


def test_float_num_batches_tracked_is_refused() -> None:
    state = dict(mlp().state_dict())
    state["1.num_batches_tracked"] = torch.tensor(3.0)

    error = refusal(state, mlp())

    assert error.code == "bad_dtype"
    assert error.extra["errors"][0]["key"] == "1.num_batches_tracked"


def test_int32_num_batches_tracked_is_widened() -> None:
    state = dict(trained_mlp().state_dict())
    state["1.num_batches_tracked"] = torch.tensor(3, dtype=torch.int32)

    out, report = validate_state_dict(state, mlp())

    assert out["1.num_batches_tracked"].dtype == torch.int64
    assert report.bn_layers[0].num_batches_tracked == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    state = dict(ConvNet().state_dict())
    bias = state["head.bias"].clone()
    bias[1] = value
    state["head.bias"] = bias

    error = refusal(state, ConvNet())

    assert error.code == "non_finite"
    assert "head.bias" in error.detail
    assert [e["key"] for e in error.extra["errors"]] == ["head.bias"]


def test_overflow_when_casting_is_refused() -> None:
    state = dict(mlp().state_dict())
    state["3.bias"] = torch.tensor([1e300, 0.0], dtype=torch.float64)

    error = refusal(state, mlp())

    assert error.code == "non_finite"


def test_negative_running_var_is_refused() -> None:
    state = dict(ConvNet().state_dict())
    var = state["bn.running_var"].clone()
    var[3] = -0.5
    state["bn.running_var"] = var

    error = refusal(state, ConvNet())

    assert error.code == "negative_running_var"
    assert error.extra["errors"] == [
        {"key": "bn.running_var", "problem": "negative_running_var", "count": 1, "min": -0.5}
    ]


def test_missing_num_batches_tracked_is_tolerated() -> None:
    source = trained_mlp()
    state = dict(source.state_dict())
    del state["1.num_batches_tracked"]

    out, report = validate_state_dict(state, mlp())

    assert list(out) == list(source.state_dict())
    assert torch.equal(out["1.num_batches_tracked"], torch.tensor(0))
    assert any("num_batches_tracked" in w and "0.4.1" in w for w in report.warnings)
    (layer,) = report.bn_layers
    assert layer.num_batches_tracked is None
    assert layer.stats_trained  # the running statistics themselves were trained


def test_fresh_batchnorm_is_flagged_untrained() -> None:
    _, report = validate_state_dict(ConvNet().state_dict(), ConvNet())

    (layer,) = report.bn_layers
    assert layer.model_dump() == {
        "name": "bn",
        "kind": "BatchNorm2d",
        "num_features": 16,
        "num_batches_tracked": 0,
        "running_mean_abs_mean": 0.0,
        "running_var_mean": 1.0,
        "stats_trained": False,
    }
    assert any("recalibrat" in w for w in report.warnings)


def test_trained_batchnorm_is_reported() -> None:
    source = trained_mlp(steps=3)

    _, report = validate_state_dict(source.state_dict(), mlp())

    (layer,) = report.bn_layers
    assert layer.name == "1"
    assert layer.kind == "BatchNorm1d"
    assert layer.num_batches_tracked == 3
    assert layer.stats_trained
    assert layer.running_mean_abs_mean > 0
    assert report.warnings == []


def test_report_is_json_serializable() -> None:
    state = {f"module.{k}": v.half() for k, v in mlp().state_dict().items()}
    state["module.1.num_batches_tracked"] = torch.tensor(0)

    _, report = validate_state_dict(state, mlp())
    report.format, report.unwrapped_from = "pt", "state_dict"

    body = json.loads(report.model_dump_json())
    assert set(body) == set(CheckpointReport.model_fields)
    assert body["format"] == "pt"
    assert body["renamed"] == [{"prefix": "module.", "count": len(state)}]
    assert body["dtype_casts"][0]["from"] == "float16"


def test_canonical_dict_saves_as_safetensors() -> None:
    # Tied weights share storage and a transposed tensor is not contiguous: safetensors refuses
    # both, as this input shows, so the canonical copy must have neither.
    state = dict(trained_mlp().state_dict())
    state["1.bias"] = state["1.weight"]
    state["0.weight"] = state["0.weight"].t().contiguous().t()
    with pytest.raises((RuntimeError, ValueError)):
        state_dict_to_safetensors(state)

    out, _ = validate_state_dict(state, mlp())
    restored = state_dict_from_safetensors(state_dict_to_safetensors(out))

    assert set(restored) == set(out)
    for key, tensor in out.items():
        assert torch.equal(restored[key], tensor), key
    mlp().load_state_dict(restored, strict=True)


def test_data_parallel_file_end_to_end(tmp_path: Path) -> None:
    source = trained_mlp()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 2},
        tmp_path / "ddp.pt",
    )

    state, info = read_state_dict(tmp_path / "ddp.pt", "ddp.pt")
    out, report = validate_state_dict(state, mlp())

    assert info.unwrapped_from == "state_dict"
    assert report.renamed[0].prefix == "module."
    model = mlp()
    model.load_state_dict(out)
    x = torch.randn(5, 4)
    assert torch.equal(model.eval()(x), source.eval()(x))
