"""A training job's hyperparameters and options, bounded so a bad request fails before it queues.

The API validates a job's fields with these models (`routes/jobs.py`), stores what they dump as
the job's params, and the worker validates them again before it trains.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.training.options import Augment, EarlyStopping, Keep, LRSchedule, check_schedule


class PreciseBN(BaseModel):
    """Recompute BN running statistics over `batches` training batches after the last epoch."""

    # strict, as the API's JobCreate that nests it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    batches: int = Field(ge=1, le=100_000, description="training batches to average over")


class TrainParams(BaseModel):
    """A training job's hyperparameters, bounded so that a bad request fails before it queues."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(ge=1, le=1000)
    # A batch of one cannot pass through BatchNorm in train mode.
    batch_size: int = Field(ge=2, le=65536)
    lr: float = Field(gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    # L2 through the optimizer's own weight_decay (decoupled for AdamW, Loshchilov & Hutter 2019).
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    # PyTorch optimizers have no L1 option; it is added to the loss by hand.
    l1: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    # Up to 2**63 - 1 so it fits a signed 64-bit database column.
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    keep: Keep = "best"
    early_stopping: EarlyStopping | None = None
    lr_schedule: LRSchedule | None = None
    bn: Literal["train", "frozen"] = "train"
    precise_bn: PreciseBN | None = None
    # Image datasets only; applied to the training split by `loader.BatchLoader`.
    augment: Augment | None = None

    @model_validator(mode="after")
    def _momentum_only_for_sgd(self) -> TrainParams:
        if self.optimizer != "sgd" and "momentum" in self.model_fields_set:
            raise ValueError(
                f"momentum applies to optimizer 'sgd' only; {self.optimizer!r} uses its own "
                "moment estimates, so leave momentum out"
            )
        return self

    @model_validator(mode="after")
    def _options_fit_the_run(self) -> TrainParams:
        if self.lr_schedule is not None:
            check_schedule(self.lr_schedule, self.epochs)
        if self.early_stopping is not None and self.val_fraction == 0:
            raise ValueError("early_stopping watches the validation loss: set val_fraction > 0")
        return self
