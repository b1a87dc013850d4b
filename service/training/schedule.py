"""Learning-rate schedules by epoch, built from torch.optim.lr_scheduler's own classes.

A schedule steps once per epoch, after the epoch's last optimizer step, so every step of an
epoch runs at the rate its metrics report. Warm-up is `LinearLR` from lr / (warmup_epochs + 1)
up to lr (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.2: gradual warm-up), then
`SequentialLR` hands over to `StepLR` or to `CosineAnnealingLR` over the remaining epochs (down to
0 after the last one, so the last epoch still learns; Loshchilov & Hutter 2017, SGDR, without
restarts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from service.training.options import DEFAULT_GAMMA, LRSchedule, check_schedule


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, epochs: int
) -> LRScheduler:
    """The epoch scheduler for `schedule` over a run of `epochs` epochs."""
    check_schedule(schedule, epochs)
    warmup = schedule.warmup_epochs
    main: LRScheduler
    if schedule.kind == "step":
        assert schedule.step_size is not None  # the validator requires it
        gamma = schedule.gamma if schedule.gamma is not None else DEFAULT_GAMMA
        main = StepLR(optimizer, step_size=schedule.step_size, gamma=gamma)
    else:
        main = CosineAnnealingLR(optimizer, T_max=epochs - warmup)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def scheduler_state(scheduler: LRScheduler, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON-able state; the optimizer's current rates too, since SequentialLR's `_last_lr` may
    lag them and param_groups are rebuilt from the job's parameters on resume."""
    return {
        "scheduler": scheduler.state_dict(),
        "lr": [float(g["lr"]) for g in optimizer.param_groups],
    }


def restore_scheduler(
    scheduler: LRScheduler, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, state["lr"], strict=True):
        group["lr"] = lr
