"""The training options of issue 16 in process: kept epoch, early stopping, lr schedules, BN modes.

Each test trains the tiny BN MLP on two blobs for a few epochs (well under a second each); the
job-level tests with real worker processes are in tests/test_jobs_options.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from models import get_architecture
from service.training.batches import plan_batches
from service.training.state import TrainState, decode, encode
from service.training.trainer import (
    TrainParams,
    TrainResult,
    precise_bn_rows,
    split_dataset,
    train,
)

BASE: dict[str, Any] = {"epochs": 4, "batch_size": 16, "lr": 0.05, "seed": 3}


def _never() -> bool:
    return False


def _model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    arch = get_architecture("mlp_bn")
    torch.manual_seed(seed)
    return arch.build(arch.parse_config({"dropout": dropout}))


def _blobs(n: int = 200, seed: int = 0, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return torch.where(y[:, None] == 1, 1.0, -1.0) + noise * torch.randn(n, 2, generator=g), y


def _train(model: nn.Module | None = None, **params: Any) -> TrainResult:
    x, y = _blobs()
    return train(
        model if model is not None else _model(),
        x,
        y,
        task="classification",
        params=TrainParams(**(BASE | params)),
        should_stop=_never,
    )


def bn_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in names}


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"keep": "first"}, "keep"),
        ({"early_stopping": {"patience": 0}}, "patience"),
        ({"early_stopping": {"patience": 2, "min_delta": -1}}, "min_delta"),
        ({"early_stopping": {"patience": 2}, "val_fraction": 0}, "val_fraction"),
        ({"lr_schedule": {"kind": "linear"}}, "kind"),
        ({"lr_schedule": {"kind": "step"}}, "step_size"),
        ({"lr_schedule": {"kind": "cosine", "gamma": 0.5}}, "'step' only"),
        ({"lr_schedule": {"kind": "cosine", "warmup_epochs": 4}}, "warmup_epochs"),
        ({"lr_schedule": {"kind": "step", "step_size": 1, "gamma": 0}}, "gamma"),
        ({"bn": "eval"}, "bn"),
        ({"precise_bn": {"batches": 0}}, "batches"),
        ({"precise_bn": {"batches": "3"}}, "batches"),
    ],
)
def test_bad_options_are_refused(change, match):
    with pytest.raises(ValidationError, match=match):
        TrainParams(**(BASE | change))


def test_defaults_keep_the_best_epoch_and_train_bn():
    params = TrainParams(**BASE)
    assert (params.keep, params.bn, params.early_stopping, params.lr_schedule) == (
        "best",
        "train",
        None,
        None,
    )


# --- lr schedules -----------------------------------------------------------------------------


def test_step_schedule_with_warmup_reports_each_epochs_rate():
    schedule = {"kind": "step", "warmup_epochs": 2, "step_size": 2, "gamma": 0.5}
    result = _train(epochs=7, lr=0.06, lr_schedule=schedule)
    lrs = [m.lr for m in result.metrics]
    assert lrs == pytest.approx([0.02, 0.04, 0.06, 0.06, 0.03, 0.03, 0.015])


def test_cosine_schedule_anneals_towards_zero_and_the_last_epoch_still_learns():
    result = _train(epochs=5, lr=0.1, lr_schedule={"kind": "cosine"})
    lrs = [m.lr for m in result.metrics]
    expected = [0.05 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] > 0


def test_without_a_schedule_every_epoch_reports_the_job_lr():
    assert [m.lr for m in _train(lr=0.07).metrics] == [0.07] * BASE["epochs"]


# --- keep and early stopping ------------------------------------------------------------------


def test_keep_best_returns_the_best_epochs_weights():
    # A high lr with noisy blobs makes the validation metrics go up and down.
    params = {"epochs": 6, "lr": 0.5, "batch_size": 8}
    x, y = _blobs(noise=1.6)
    best = train(
        _model(),
        x,
        y,
        task="classification",
        params=TrainParams(**(BASE | params)),
        should_stop=_never,
    )
    accs = [(m.val_accuracy, -(m.val_loss or 0)) for m in best.metrics]
    kept = max(range(len(accs)), key=lambda i: (accs[i], -i)) + 1
    assert best.kept_epoch == kept
    assert best.final_val_accuracy == best.metrics[kept - 1].val_accuracy
    assert best.final_val_loss == best.metrics[kept - 1].val_loss
    # A run that stops at the kept epoch, keeping its last, ends with the same weights.
    short = train(
        _model(),
        x,
        y,
        task="classification",
        params=TrainParams(**(BASE | params | {"epochs": kept, "keep": "last"})),
        should_stop=_never,
    )
    for key, value in short.state_dict.items():
        assert torch.equal(best.state_dict[key], value), key
    assert best.stop_reason == "completed"


def test_keep_last_returns_the_last_epoch():
    result = _train(keep="last")
    assert result.kept_epoch == BASE["epochs"]
    assert result.final_val_loss == result.metrics[-1].val_loss


def test_keep_best_without_a_validation_split_keeps_the_last_epoch():
    result = _train(val_fraction=0.0)
    assert result.kept_epoch == BASE["epochs"]


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # min_delta larger than any plausible improvement: every epoch after the first is "bad".
    result = _train(epochs=10, early_stopping={"patience": 2, "min_delta": 10.0})
    assert [m.epoch for m in result.metrics] == [1, 2, 3]
    assert result.stop_reason == "early_stopping"
    full = _train(epochs=10, early_stopping={"patience": 20})
    assert len(full.metrics) == 10
    assert full.stop_reason == "completed"


# --- BN modes ---------------------------------------------------------------------------------


def test_frozen_bn_keeps_running_stats_bit_identical_and_trains_affine_params():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    result = _train(model, bn="frozen")
    after = result.state_dict
    for key, value in bn_stats(before).items():
        assert torch.equal(after[key], value), key
    for key in ("bn1.weight", "bn1.bias", "fc1.weight"):
        assert not torch.equal(after[key], before[key]), key
    moved = _train(_model(), bn="train").state_dict
    assert not torch.equal(moved["bn1.running_mean"], before["bn1.running_mean"])


def direct_bn_stats(
    weights: dict[str, torch.Tensor], x: torch.Tensor, batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """BN statistics as PyTorch's cumulative average (momentum=None) over `batches` of x."""
    model = _model()
    model.load_state_dict(weights)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for rows in batches:
            model(x[rows])
    return bn_stats(model.state_dict())


def recalibration_batches(rows: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The batches precise_bn feeds: recalibration's own shuffle (seed + 3) and batch plan."""
    order = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed + 3))]
    return list(torch.split(order, plan_batches(rows.numel(), batch_size)))


def test_precise_bn_sets_the_stats_the_kept_weights_give_over_those_batches():
    # 200 rows, val 40: 160 training rows, 10 batches of 16 (equal sizes, so PyTorch's
    # per-batch cumulative average is the same as recalibration's per-sample one).
    batches, seed, bs = 10, BASE["seed"], BASE["batch_size"]
    x, _ = _blobs()
    result = _train(precise_bn={"batches": batches})
    plain = _train()
    train_idx, _ = split_dataset(x.shape[0], 0.2, seed)
    rows = precise_bn_rows(train_idx, batches, bs, seed)
    assert rows.numel() == batches * bs == train_idx.numel()
    direct = direct_bn_stats(result.state_dict, x, recalibration_batches(rows, bs, seed))
    ours = bn_stats(result.state_dict)
    for key in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert torch.allclose(ours[key], direct[key], rtol=1e-4, atol=1e-6), key
        # Without precise_bn the momentum average lags: far from the estimate over the data.
        assert not torch.allclose(bn_stats(plain.state_dict)[key], direct[key], rtol=1e-2), key
    # The first layer's mean is the exact mean over the training rows.
    with torch.no_grad():
        fc1 = nn.functional.linear(
            x[rows], result.state_dict["fc1.weight"], result.state_dict["fc1.bias"]
        )
    assert torch.allclose(ours["bn1.running_mean"], fc1.mean(0), atol=1e-5)
    # Weights other than BN buffers are the kept epoch's, untouched.
    for key in ("fc1.weight", "bn1.weight", "fc3.bias"):
        assert torch.equal(result.state_dict[key], plain.state_dict[key]), key


def test_precise_bn_reevaluates_the_published_weights():
    result = _train(precise_bn={"batches": 3})
    kept = result.metrics[result.kept_epoch - 1]
    assert result.final_val_loss != kept.val_loss


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_changes_train_mode_forwards_only():
    model = _model(dropout=0.5)
    x, _ = _blobs(32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert _model(dropout=0.5).state_dict().keys() == _model().state_dict().keys()


# --- resume -----------------------------------------------------------------------------------

OPTIONS = {
    "keep": "best",
    "early_stopping": {"patience": 2, "min_delta": 0.01},
    "lr_schedule": {"kind": "cosine", "warmup_epochs": 1},
    "precise_bn": {"batches": 4},
    "epochs": 8,
    "lr": 0.5,
}


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resumed_run_with_every_option_equals_an_uninterrupted_one(tmp_path: Path, stop_after):
    x, y = _blobs(noise=1.6)
    params = TrainParams(**(BASE | OPTIONS))

    def run(**kwargs: Any) -> TrainResult:
        return train(
            _model(kwargs.pop("init", 0), dropout=0.3),
            x,
            y,
            task="classification",
            params=params,
            **kwargs,
        )

    whole = run(should_stop=_never)
    saved: list[Path] = []

    def keep(state: TrainState) -> None:
        path = tmp_path / f"epoch-{state.epoch}.safetensors"
        path.write_bytes(encode(state, {}))
        saved.append(path)

    stopped = run(should_stop=lambda: len(saved) >= stop_after, on_state=keep)
    state, _ = decode(str(saved[-1]))
    torch.manual_seed(999)
    resumed = run(should_stop=_never, resume=state, init=7)
    assert not stopped.stopped or len(saved) == stop_after
    assert resumed.metrics == whole.metrics
    assert (resumed.kept_epoch, resumed.stop_reason) == (whole.kept_epoch, whole.stop_reason)
    assert resumed.final_val_loss == whole.final_val_loss
    for key, value in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[key], value), key
