from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from service.training.recalibration import recalibrate_bn
from service.training.trainer import (
    EpochMetrics,
    TrainingDiverged,
    TrainParams,
    compare,
    evaluate,
    plan_batches,
    split_dataset,
    train,
    validate_trainable,
)


def _never() -> bool:
    return False


def _mlp(seed: int = 0, outputs: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, outputs))


def _blobs(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs at (-2, -2) and (2, 2), unit variance, classes alternating."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centers = torch.where(y[:, None] == 1, 2.0, -2.0)
    return centers + torch.randn(n, 2, generator=g), y


def _linear_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Linear)]
    )


# --- parameters, split and batch plan -------------------------------------------------------


def test_params_bounds():
    TrainParams(epochs=1, batch_size=2, lr=0.1)
    for bad in (
        {"batch_size": 1},
        {"epochs": 0},
        {"lr": 0},
        {"lr": float("nan")},
        {"l1": float("inf")},
        {"val_fraction": 1.0},
        {"weight_decay": -0.1},
        {"dropout": 0.5},
    ):
        with pytest.raises(ValidationError):
            TrainParams(**({"epochs": 1, "batch_size": 8, "lr": 0.1} | bad))


def test_momentum_is_for_sgd_only():
    TrainParams(epochs=1, batch_size=8, lr=0.1, optimizer="adam")
    with pytest.raises(ValidationError, match="sgd"):
        TrainParams(epochs=1, batch_size=8, lr=0.1, optimizer="adam", momentum=0.5)


def test_plan_batches_never_yields_one():
    for n, bs in itertools.product(range(2, 200), range(2, 70)):
        sizes = plan_batches(n, bs)
        assert sum(sizes) == n
        assert min(sizes) >= 2, (n, bs, sizes)
        assert max(sizes) <= bs + 1
        assert len(sizes) == max(1, n // bs if n % bs == 1 else -(-n // bs))


def test_plan_batches_merges_a_remainder_of_one():
    assert plan_batches(33, 16) == [16, 17]
    assert plan_batches(34, 16) == [16, 16, 2]
    assert plan_batches(5, 100) == [5]
    with pytest.raises(ValueError, match="at least 2"):
        plan_batches(1, 4)


def test_split_is_deterministic_and_partitions():
    train_a, val_a = split_dataset(100, 0.2, seed=7)
    train_b, val_b = split_dataset(100, 0.2, seed=7)
    assert torch.equal(train_a, train_b)
    assert torch.equal(val_a, val_b)
    assert len(val_a) == 20
    assert sorted(torch.cat([train_a, val_a]).tolist()) == list(range(100))
    assert not torch.equal(val_a, split_dataset(100, 0.2, seed=8)[1])


def test_split_sizes():
    assert [len(t) for t in split_dataset(10, 0.0, seed=0)] == [10, 0]
    assert [len(t) for t in split_dataset(3, 0.01, seed=0)] == [2, 1]
    with pytest.raises(ValueError, match="leaves 1 training sample"):
        split_dataset(2, 0.2, seed=0)


def test_validate_trainable_refuses_a_single_train_sample():
    with pytest.raises(ValueError, match="leaves 1 training sample"):
        validate_trainable(3, TrainParams(epochs=1, batch_size=2, lr=0.1, val_fraction=0.5))
    with pytest.raises(ValueError, match="at least 2"):
        validate_trainable(1, TrainParams(epochs=1, batch_size=2, lr=0.1, val_fraction=0.0))
    validate_trainable(3, TrainParams(epochs=1, batch_size=2, lr=0.1, val_fraction=0.2))


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 0.01), ("adamw", 0.01)])
def test_blobs_reach_high_val_accuracy(optimizer, lr):
    x, y = _blobs()
    model = _mlp()
    epochs: list[EpochMetrics] = []
    steps: list[tuple[int, int, int]] = []
    params = TrainParams(epochs=4, batch_size=32, lr=lr, optimizer=optimizer, seed=1)
    result = train(
        model,
        x,
        y,
        task="classification",
        params=params,
        should_stop=_never,
        on_step=lambda *a: steps.append(a),
        on_epoch=epochs.append,
    )
    assert not result.stopped
    assert result.final_val_accuracy is not None
    assert result.final_val_accuracy >= 0.9
    assert result.metrics == epochs
    assert [m.epoch for m in epochs] == [1, 2, 3, 4]
    assert len(result.val_indices) == 80
    # 320 training samples in batches of 32: 10 steps an epoch.
    assert steps[:2] == [(1, 1, 10), (1, 2, 10)]
    assert len(steps) == 40
    assert not model.training
    # The reported numbers are the ones evaluate() gives on the returned split.
    loss, acc = evaluate(model, x[result.val_indices], y[result.val_indices], "classification")
    assert (loss, acc) == (result.final_val_loss, result.final_val_accuracy)


def test_bn_running_stats_move_and_weights_are_cpu_clones():
    x, y = _blobs(100)
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    params = TrainParams(epochs=2, batch_size=16, lr=0.1, seed=0)
    result = train(model, x, y, task="classification", params=params, should_stop=_never)
    sd = result.state_dict
    assert not torch.equal(sd["1.running_mean"], before["1.running_mean"])
    assert not torch.equal(sd["1.running_var"], before["1.running_var"])
    assert int(sd["1.num_batches_tracked"]) == 2 * len(plan_batches(80, 16))
    for key, value in model.state_dict().items():
        assert sd[key].device.type == "cpu"
        assert torch.equal(sd[key], value)
        assert sd[key].data_ptr() != value.data_ptr()


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = _blobs(120)
    base = _mlp()

    def run(seed: int) -> dict[str, torch.Tensor]:
        params = TrainParams(epochs=2, batch_size=16, lr=0.05, optimizer="adam", seed=seed)
        model = copy.deepcopy(base)
        return train(
            model, x, y, task="classification", params=params, should_stop=_never
        ).state_dict

    a, b, c = run(3), run(3), run(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seed_is_picked_and_recorded_when_none():
    x, y = _blobs(40)
    params = TrainParams(epochs=1, batch_size=8, lr=0.1)
    first = train(_mlp(), x, y, task="classification", params=params, should_stop=_never)
    again = TrainParams(epochs=1, batch_size=8, lr=0.1, seed=first.seed)
    second = train(_mlp(), x, y, task="classification", params=again, should_stop=_never)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)


def test_should_stop_stops_before_the_next_step():
    x, y = _blobs(100)
    calls = 0
    steps: list[tuple[int, int, int]] = []

    def stop_on_third_check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    model = _mlp()
    params = TrainParams(epochs=5, batch_size=8, lr=0.1, seed=0)
    result = train(
        model,
        x,
        y,
        task="classification",
        params=params,
        should_stop=stop_on_third_check,
        on_step=lambda *a: steps.append(a),
    )
    assert result.stopped
    assert calls == 3
    assert steps == [(1, 1, 10), (1, 2, 10)]
    assert result.state_dict == {}
    assert result.metrics == []
    assert not model.training


def test_remainder_of_one_still_trains():
    # 33 training samples with batch_size 16: a naive plan would end with a batch of one, which
    # BatchNorm1d refuses in train mode.
    x, y = _blobs(33)
    params = TrainParams(epochs=2, batch_size=16, lr=0.1, val_fraction=0.0, seed=0)
    result = train(_mlp(), x, y, task="classification", params=params, should_stop=_never)
    assert [m.val_loss for m in result.metrics] == [None, None]
    assert result.final_val_accuracy is None
    assert len(result.val_indices) == 0
    assert int(result.state_dict["1.num_batches_tracked"]) == 4


def test_l1_shrinks_weights():
    x, y = _blobs(200)

    def mean_abs(l1: float) -> float:
        model = _mlp()
        params = TrainParams(epochs=5, batch_size=20, lr=0.05, l1=l1, seed=0)
        train(model, x, y, task="classification", params=params, should_stop=_never)
        return float(_linear_weights(model).abs().mean())

    assert mean_abs(0.01) < mean_abs(0.0)


def test_regression_trains_and_reports_no_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = x @ torch.tensor([1.5, -2.0]) + 0.5
    model = _mlp(outputs=1)
    first_loss, _ = evaluate(model, x, y, "regression")
    params = TrainParams(epochs=10, batch_size=20, lr=0.01, optimizer="adam", seed=0)
    result = train(model, x, y, task="regression", params=params, should_stop=_never)
    assert result.final_val_accuracy is None
    assert result.final_val_loss is not None
    assert result.final_val_loss < first_loss / 4


def test_divergence_raises_and_leaves_eval_mode():
    x = torch.randn(20, 2)
    y = torch.full((20,), 1e30)  # squared error overflows float32
    model = _mlp(outputs=1)
    params = TrainParams(epochs=1, batch_size=4, lr=0.1, seed=0)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(model, x, y, task="regression", params=params, should_stop=_never)
    assert not model.training


def test_wrong_label_dtype_refused():
    x, y = _blobs(20)
    params = TrainParams(epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="int64"):
        train(_mlp(), x, y.float(), task="classification", params=params, should_stop=_never)


def test_evaluate_matches_a_manual_computation_and_sets_eval_mode():
    x, y = _blobs(50)
    model = _mlp()
    model.train()
    loss, acc = evaluate(model, x, y, "classification", batch_size=7)
    assert not model.training
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert acc == float((out.argmax(1) == y).float().mean())


def test_compare_tie_rules():
    assert compare((0.5, 0.9), (0.1, 0.8), "classification")  # higher accuracy wins
    assert not compare((0.1, 0.8), (0.5, 0.9), "classification")
    assert compare((0.3, 0.9), (0.4, 0.9), "classification")  # tie: lower loss
    assert compare((0.4, 0.9), (0.4, 0.9), "classification")  # equal counts as good
    assert not compare((0.5, 0.9), (0.4, 0.9), "classification")
    assert compare((0.4, None), (0.4, None), "regression")
    assert not compare((0.41, None), (0.4, None), "regression")
    assert not compare((float("nan"), None), (0.4, None), "regression")
    with pytest.raises(ValueError, match="accuracy"):
        compare((0.4, None), (0.4, 0.9), "classification")


# --- BatchNorm recalibration --------------------------------------------------------------------


def _bn_first() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm1d(3), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)
    )


def _shifted(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g) * torch.tensor([1.0, 5.0, 0.2]) + torch.tensor(
        [3.0, -1.0, 10.0]
    )


def test_recalibration_keeps_weights_and_finds_the_dataset_mean():
    model = _bn_first()
    params_before = {k: p.detach().clone() for k, p in model.named_parameters()}
    x = _shifted(203)  # batch_size 50: batches 50, 50, 50, 50 and a short 3
    steps: list[tuple[int, int, int]] = []
    done = recalibrate_bn(
        model, x, batch_size=50, should_stop=_never, on_step=lambda *a: steps.append(a)
    )
    assert done
    assert steps == [(1, step, 5) for step in range(1, 6)]
    for k, p in model.named_parameters():
        assert torch.equal(p, params_before[k]), k
    first = model[0]
    assert torch.allclose(first.running_mean, x.mean(0), atol=1e-5, rtol=0)
    # Batch variances average to the dataset's: close, though not exact with several batches.
    assert torch.allclose(first.running_var, x.var(0), rtol=0.1)
    assert int(first.num_batches_tracked) == 5
    assert all(bn.momentum == 0.1 for bn in (model[0], model[2]))
    assert not model.training


def test_recalibration_in_one_batch_is_exact_and_ignores_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 2))
    x = _shifted(64)
    assert recalibrate_bn(model, x, batch_size=64, should_stop=_never)
    assert torch.allclose(model[1].running_mean, x.mean(0), atol=1e-5, rtol=0)
    # Dropout stays off (as in serving); left on it would inflate the variance.
    assert torch.allclose(model[1].running_var, x.var(0), rtol=1e-5)


def test_recalibration_stopped_leaves_stats_unchanged():
    model = _bn_first()
    before = copy.deepcopy(model.state_dict())
    calls = 0

    def stop_on_second_check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 2

    assert not recalibrate_bn(model, _shifted(100), batch_size=10, should_stop=stop_on_second_check)
    assert calls == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].momentum == 0.1
    assert not model.training


def test_recalibration_needs_batchnorm_and_two_samples():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(3, 2), torch.zeros(4, 3), batch_size=2, should_stop=_never)
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate_bn(_bn_first(), torch.zeros(1, 3), batch_size=2, should_stop=_never)
