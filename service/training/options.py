"""The training options a job takes, as data: validated, without torch.

Their behaviour is in `schedule.py` and `selection.py`; the pydantic models live here so the API
schemas (and the Python client, which imports them) do not import PyTorch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Keep = Literal["best", "last"]
StopReason = Literal["completed", "early_stopping"]


class EarlyStopping(BaseModel):
    # strict, as the API's JobCreate that nests it: "3" is not three epochs.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    patience: int = Field(ge=1, le=1000, description="epochs without improvement before stopping")
    min_delta: float = Field(
        default=0.0, ge=0, description="how much the validation loss must fall to count"
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
