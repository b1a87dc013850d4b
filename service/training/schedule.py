"""Learning-rate schedules by epoch, built from torch.optim.lr_scheduler's own classes.

A schedule steps once per epoch, after the epoch's last optimizer step, so every step of an
epoch runs at the rate its metrics report. Warm-up is `LinearLR` from lr / (warmup_epochs + 1)
up to lr (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.2: gradual warm-up), then
`SequentialLR` hands over to `StepLR` or to `CosineAnnealingLR` over the remaining epochs (down to
0 after the last one, so the last epoch still learns; Loshchilov & Hutter 2017, SGDR, without
restarts).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)


class LRSchedule(BaseModel):
    """`step`: multiply by gamma every step_size epochs; `cosine`: anneal to 0 by the last one."""

    # strict, as the API's JobCreate that nests it: "3" is not three epochs.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    kind: Literal["step", "cosine"]
    warmup_epochs: int = Field(
        default=0, ge=0, le=1000, description="epochs of linear warm-up from lr/(n+1) up to lr"
    )
    step_size: int | None = Field(
        default=None, ge=1, le=1000, description="kind 'step': epochs between two decays"
    )
    gamma: float | None = Field(
        default=None, gt=0, le=1, description="kind 'step': the factor of each decay (0.1)"
    )

    @model_validator(mode="after")
    def _step_fields_for_step_only(self) -> LRSchedule:
        if self.kind != "step" and (self.step_size is not None or self.gamma is not None):
            raise ValueError("lr_schedule: step_size and gamma apply to kind 'step' only")
        if self.kind == "step" and self.step_size is None:
            raise ValueError("lr_schedule: kind 'step' needs step_size (epochs between decays)")
        return self


# StepLR's own default decay.
DEFAULT_GAMMA = 0.1


def check_schedule(schedule: LRSchedule, epochs: int) -> None:
    """Refuse a warm-up that leaves no epoch for the schedule itself."""
    if schedule.warmup_epochs >= epochs:
        raise ValueError(
            f"lr_schedule.warmup_epochs ({schedule.warmup_epochs}) must be fewer than epochs "
            f"({epochs})"
        )


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
