"""Mini-batch training of a private model copy, reproducible from a seed and safe for BatchNorm.

Every batch has at least two samples (`batches.plan_batches`): BatchNorm in train mode cannot
normalize a batch of one. Beside the optimizer the run takes the options of API.md: which epoch
to keep and when to stop early (`selection`), a learning-rate schedule (`schedule`), and two BN
practices for fine-tuning: `bn: "frozen"` keeps every BN layer in eval mode during the run, as
detectron2's FrozenBatchNorm2d does, so small batches never feed it noisy statistics, and
`precise_bn` recomputes the running statistics with the kept weights at the end, as fvcore's
PreciseBN does, since the running averages that momentum leaves behind lag the final weights.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Re-exported: callers and tests reach these as `trainer.plan_batches`, `trainer.TrainParams`.
from service.training.batches import StepCallback as StepCallback
from service.training.batches import plan_batches as plan_batches
from service.training.loader import BatchLoader, TrainingImages
from service.training.options import StopReason
from service.training.params import PreciseBN as PreciseBN
from service.training.params import TrainParams as TrainParams
from service.training.recalibration import recalibrate_bn
from service.training.schedule import build_scheduler, restore_scheduler, scheduler_state
from service.training.selection import EpochSelector
from service.training.state import TrainState, capture_rng, restore_rng

TASKS = ("classification", "regression")

_CPU = torch.device("cpu")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the weights are unusable, so the job must fail."""


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's losses as a job reports them; val fields are None without a validation split."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    # The learning rate every step of this epoch ran at.
    lr: float
    # Wall time of the epoch, validation included (the metrics' epoch-duration histogram). Not
    # compared: two runs with the same seed have the same metrics but not the same durations.
    duration_s: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run leaves: CPU weights, per-epoch metrics and its split."""

    # Detached CPU clones; empty when stopped, since a cancelled job leaves no version behind.
    state_dict: dict[str, torch.Tensor]
    metrics: list[EpochMetrics]
    stopped: bool
    # Rows of the dataset held out for validation, so a serving version can be compared on them.
    val_indices: torch.Tensor
    # Of the returned weights: the kept epoch's, or measured again after precise_bn.
    final_val_loss: float | None
    final_val_accuracy: float | None
    seed: int
    kept_epoch: int = 0
    stop_reason: StopReason = "completed"


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_train = n - n_val
    if n_train < 2:
        raise ValueError(
            f"a dataset of {n} sample(s) with val_fraction {val_fraction} leaves {max(n_train, 0)} "
            "training sample(s); training needs at least 2 because BatchNorm cannot normalize "
            "a batch of one. Upload more samples or lower val_fraction"
        )
    return n_train, n_val


def split_dataset(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, val_idx) so a job's validation rows are known and repeatable."""
    _, n_val = _split_sizes(n, val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def validate_trainable(n: int, params: TrainParams) -> None:
    """Raise ValueError when `n` samples cannot give a train batch of two after the split."""
    _split_sizes(n, params.val_fraction)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return _CPU


def _loss(out: torch.Tensor, y: torch.Tensor, task: str, reduction: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y, reduction=reduction)
    if y.numel() != out.numel():
        raise ValueError(
            f"the model outputs {list(out.shape)} for a batch but the targets are "
            f"{list(y.shape)}; targets must match the model's outputs"
        )
    return F.mse_loss(out, y.reshape(out.shape).to(out.dtype), reduction=reduction)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 256
) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) in eval mode, the way the model will serve.

    Leaves the model in eval mode: the caller decides what mode comes next. Loss is cross-entropy
    per sample for classifiers, mean squared error per output value otherwise.
    """
    _check_task(task)
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty set")
    device = _model_device(model)
    model.eval()
    loss_sum = 0.0
    correct = 0
    count = 0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            out = model(xb)
            loss_sum += float(_loss(out, yb, task, reduction="sum"))
            count += out.numel() if task == "regression" else int(out.shape[0])
            if task == "classification":
                correct += int((out.argmax(dim=1) == yb).sum())
    accuracy = correct / n if task == "classification" else None
    return loss_sum / count, accuracy


def _make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    if params.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)


def _check_data(x: torch.Tensor, y: torch.Tensor, task: str) -> None:
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be N x sample shape and y must have N rows; got {list(x.shape)} and "
            f"{list(y.shape)}"
        )
    if task == "classification" and (y.dtype != torch.int64 or y.ndim != 1):
        raise ValueError(f"classification needs int64 class ids of shape (N,); got {y.dtype}")
    if task == "regression" and not y.dtype.is_floating_point:
        raise ValueError(f"regression needs floating-point targets; got {y.dtype}")


def set_train_mode(model: nn.Module, bn: str) -> None:
    """Train mode, except every BN layer under `bn: "frozen"`: it normalizes with its running
    statistics and leaves them untouched (detectron2's FrozenBatchNorm2d), while its affine
    parameters still get gradients."""
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def precise_bn_rows(
    train_idx: torch.Tensor, batches: int, batch_size: int, seed: int
) -> torch.Tensor:
    """The training rows precise_bn averages over: `batches` batches' worth, drawn with the seed."""
    # seed + 2: a stream distinct from the split's (seed) and the batch order's (seed + 1).
    perm = torch.randperm(train_idx.numel(), generator=torch.Generator().manual_seed(seed + 2))
    return train_idx[perm[: batches * batch_size]]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    task: str,
    params: TrainParams,
    should_stop: Callable[[], bool],
    on_step: StepCallback | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    device: torch.device = _CPU,
    resume: TrainState | None = None,
    on_state: Callable[[TrainState], None] | None = None,
    images: TrainingImages | None = None,
) -> TrainResult:
    """Train `model` in place on (x, y) and return its kept weights, metrics and validation split.

    `model` must be the caller's private copy, never the object that serves predictions: it is
    moved to `device`, put in train mode and its weights and BatchNorm buffers change. It is left
    in eval mode, holding the returned weights, when this returns or raises. With the same seed
    and the same initial weights, two runs on CPU give bit-identical weights.

    `on_state` gets the full state at the end of every epoch (before `on_epoch`); `train(...,
    resume=that state)` with the same data and params continues after that epoch and ends with
    the same weights and metrics, bit for bit on CPU, as a run that never stopped.

    With `params.augment`, `images` holds the same samples as `x` as pixels: the training
    batches are then augmented and normalized from them by loader threads beside the step
    (`loader.BatchLoader`, each sample seeded by job seed, epoch and row, so resuming needs no
    loader state), while validation, precise_bn and the gate keep `x`, never augmented.
    """
    _check_task(task)
    _check_data(x, y, task)
    if params.augment is not None and images is None:
        raise ValueError("augment needs the dataset's images (an image dataset)")
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    if resume is not None and (resume.seed != seed or resume.epoch > params.epochs):
        raise ValueError(
            f"the saved state (seed {resume.seed}, epoch {resume.epoch}) does not belong to a "
            f"run of {params.epochs} epochs with seed {seed}"
        )
    # Global seed for what the model draws itself (Dropout); local generators for the data order.
    torch.manual_seed(seed)
    n = int(x.shape[0])
    train_idx, val_idx = split_dataset(n, params.val_fraction, seed)
    # seed + 1: a stream distinct from the split's, so the split does not echo in the order.
    order_gen = torch.Generator().manual_seed(seed + 1)
    sizes = plan_batches(int(train_idx.numel()), params.batch_size)
    steps = len(sizes)

    model.to(device)
    optimizer = _make_optimizer(model, params)
    scheduler = (
        build_scheduler(optimizer, params.lr_schedule, params.epochs)
        if params.lr_schedule is not None
        else None
    )
    selector = EpochSelector(task=task, keep=params.keep, early=params.early_stopping)
    # L1 on weight matrices and kernels only: biases and BatchNorm's gamma/beta are left out, as
    # is usual for weight penalties (they do not set the model's capacity the same way).
    l1_params = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    x_val, y_val = x[val_idx], y[val_idx]
    metrics: list[EpochMetrics] = []
    done = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(
            {"state": resume.optimizer, "param_groups": optimizer.state_dict()["param_groups"]}
        )
        if scheduler is not None and resume.scheduler is not None:
            restore_scheduler(scheduler, optimizer, resume.scheduler)
        restore_rng(resume.rng, order_gen, device)
        metrics = [EpochMetrics(**m) for m in resume.metrics]
        done = resume.epoch
        if resume.selection:
            best = resume.best_model
            if best is None and params.keep == "best":
                # The best epoch was the saved one: its weights are the model's.
                best = {k: v.detach().to(_CPU, copy=True) for k, v in resume.model.items()}
            selector.restore(resume.selection, best)

    loader = (
        BatchLoader(
            images.pixels,
            y,
            augment=params.augment,
            mean=images.mean,
            std=images.std,
            seed=seed,
            threads=images.threads,
        )
        if params.augment is not None and images is not None
        else None
    )
    try:
        reason: StopReason = "completed"
        for epoch in range(done + 1, params.epochs + 1):
            if selector.should_stop:  # a resumed run whose last saved epoch stopped it
                reason = "early_stopping"
                break
            epoch_started = time.perf_counter()
            set_train_mode(model, params.bn)
            lr = float(optimizer.param_groups[0]["lr"])
            order = train_idx[torch.randperm(train_idx.numel(), generator=order_gen)]
            loss_sum = 0.0
            start = 0
            batches = loader.epoch(epoch, order, sizes) if loader is not None else None
            for step, size in enumerate(sizes, start=1):
                if should_stop():
                    return _stopped(metrics, val_idx, seed)
                rows = order[start : start + size]
                start += size
                assert rows.numel() >= 2, "a batch of one must never reach BatchNorm in train mode"
                if batches is not None:
                    xb, yb = (t.to(device) for t in next(batches))
                else:
                    xb = x[rows].to(device)
                    yb = y[rows].to(device)
                optimizer.zero_grad(set_to_none=True)
                data_loss = _loss(model(xb), yb, task, reduction="mean")
                loss = data_loss
                if params.l1 > 0 and l1_params:
                    loss = loss + params.l1 * torch.stack([p.abs().sum() for p in l1_params]).sum()
                # Checked before the step, so NaN never reaches the weights or the optimizer state.
                if not math.isfinite(float(loss.detach())):
                    raise TrainingDiverged(
                        f"the loss became non-finite at epoch {epoch}, step {step}; lower lr "
                        f"(now {lr}) or check the data's scale"
                    )
                torch.autograd.backward(loss)
                optimizer.step()
                loss_sum += float(data_loss.detach()) * size
                if on_step is not None:
                    on_step(epoch, step, steps)
            if batches is not None:
                batches.close()
            if scheduler is not None:
                scheduler.step()
            val_loss: float | None = None
            val_acc: float | None = None
            if val_idx.numel():
                val_loss, val_acc = evaluate(model, x_val, y_val, task)
            # Reported train loss is the data loss alone, comparable with val_loss (no penalty).
            epoch_metrics = EpochMetrics(
                epoch=epoch,
                train_loss=loss_sum / int(train_idx.numel()),
                val_loss=val_loss,
                val_accuracy=val_acc,
                lr=lr,
                duration_s=time.perf_counter() - epoch_started,
            )
            metrics.append(epoch_metrics)
            selector.update(epoch, val_loss, val_acc, model.state_dict)
            if on_state is not None:
                on_state(
                    TrainState(
                        epoch=epoch,
                        seed=seed,
                        metrics=[asdict(m) for m in metrics],
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict()["state"],
                        rng=capture_rng(order_gen, device),
                        scheduler=(
                            scheduler_state(scheduler, optimizer) if scheduler is not None else None
                        ),
                        selection=selector.state(),
                        best_model=(
                            None if selector.best_epoch == epoch else selector.best_weights
                        ),
                    )
                )
            if on_epoch is not None:
                on_epoch(epoch_metrics)
            if selector.should_stop:
                reason = "early_stopping"
                break
        return _finish(
            model,
            x,
            y,
            task,
            params,
            seed,
            train_idx,
            val_idx,
            metrics,
            selector,
            reason,
            should_stop,
            device,
        )
    finally:
        if loader is not None:
            loader.close()
        model.eval()


def _stopped(metrics: list[EpochMetrics], val_idx: torch.Tensor, seed: int) -> TrainResult:
    # No weights: a cancelled job leaves no version behind.
    return TrainResult(
        state_dict={},
        metrics=metrics,
        stopped=True,
        val_indices=val_idx,
        final_val_loss=None,
        final_val_accuracy=None,
        seed=seed,
    )


def _finish(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    params: TrainParams,
    seed: int,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    metrics: list[EpochMetrics],
    selector: EpochSelector,
    reason: StopReason,
    should_stop: Callable[[], bool],
    device: torch.device,
) -> TrainResult:
    """Put the kept epoch's weights in `model`, run precise_bn on them, and describe the result."""
    kept = selector.kept_epoch
    if kept != selector.last_epoch and selector.best_weights is not None:
        model.load_state_dict(selector.best_weights)
    chosen = metrics[kept - 1] if kept else None
    val_loss = chosen.val_loss if chosen else None
    val_acc = chosen.val_accuracy if chosen else None
    if params.precise_bn is not None:
        rows = precise_bn_rows(train_idx, params.precise_bn.batches, params.batch_size, seed)
        done = recalibrate_bn(
            model,
            x[rows],
            batch_size=params.batch_size,
            should_stop=should_stop,
            device=device,
            seed=seed + 3,
        )
        if not done:
            return _stopped(metrics, val_idx, seed)
        if val_idx.numel():
            # New statistics, new outputs: if_better must judge the weights it would publish.
            val_loss, val_acc = evaluate(model, x[val_idx], y[val_idx], task)
    return TrainResult(
        state_dict={k: v.detach().to(_CPU, copy=True) for k, v in model.state_dict().items()},
        metrics=metrics,
        stopped=False,
        val_indices=val_idx,
        final_val_loss=val_loss,
        final_val_accuracy=val_acc,
        seed=seed,
        kept_epoch=kept,
        stop_reason=reason,
    )


def compare(new: tuple[float, float | None], old: tuple[float, float | None], task: str) -> bool:
    """Whether `new` (val_loss, val_accuracy) is at least as good as `old`, per API.md if_better.

    Classifiers: higher validation accuracy wins, ties go to the lower (or equal) validation
    loss. Otherwise: lower (or equal) validation loss. Both must come from the same validation
    rows (`TrainResult.val_indices`). NaN never counts as at least as good.
    """
    _check_task(task)
    new_loss, new_acc = new
    old_loss, old_acc = old
    if task == "classification":
        if new_acc is None or old_acc is None:
            raise ValueError("comparing classifiers needs a validation accuracy for both")
        if new_acc != old_acc:
            return new_acc > old_acc
    return new_loss <= old_loss
