"""Which epoch a run keeps, and when it stops early.

`keep: "best"` keeps the epoch that `if_better` would prefer (API.md): the highest validation
accuracy for classifiers, ties going to the lower validation loss; the lowest validation loss
otherwise. Exact ties keep the earlier epoch. Without a validation split there is nothing to rank
by, so the last epoch is kept.

Early stopping watches the validation loss, as Keras' and Lightning's EarlyStopping do by
default: on a small split accuracy moves in steps of 1/n and would stop a run that is still
improving. An epoch improves when its loss is below the best so far by more than `min_delta`;
after `patience` epochs without one, the run stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.training.options import EarlyStopping, Keep


def strictly_better(
    new: tuple[float, float | None], old: tuple[float, float | None], task: str
) -> bool:
    """Whether (val_loss, val_accuracy) `new` beats `old` by the if_better order, ties excluded."""
    new_loss, new_acc = new
    old_loss, old_acc = old
    ranked_by_accuracy = task == "classification" and None not in (new_acc, old_acc)
    if ranked_by_accuracy and new_acc != old_acc:
        return (new_acc or 0.0) > (old_acc or 0.0)
    return new_loss < old_loss


@dataclass
class EpochSelector:
    """The best epoch so far (with its weights, for keep=best) and the early-stopping counters."""

    task: str
    keep: Keep
    early: EarlyStopping | None
    best_epoch: int | None = None
    best_metrics: tuple[float, float | None] | None = None
    # CPU clones of the best epoch's weights; kept only for keep=best.
    best_weights: dict[str, torch.Tensor] | None = None
    watched_loss: float | None = None
    bad_epochs: int = 0
    last_epoch: int = 0

    def update(
        self,
        epoch: int,
        val_loss: float | None,
        val_accuracy: float | None,
        weights: Callable[[], dict[str, torch.Tensor]],
    ) -> None:
        """Record a finished epoch; `weights()` gives its state_dict, called only when kept."""
        self.last_epoch = epoch
        if val_loss is None:
            return
        current = (val_loss, val_accuracy)
        if self.best_metrics is None or strictly_better(current, self.best_metrics, self.task):
            self.best_epoch, self.best_metrics = epoch, current
            if self.keep == "best":
                self.best_weights = {
                    k: v.detach().to("cpu", copy=True) for k, v in weights().items()
                }
        if self.early is not None:
            if self.watched_loss is None or val_loss < self.watched_loss - self.early.min_delta:
                self.watched_loss, self.bad_epochs = val_loss, 0
            else:
                self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return self.early is not None and self.bad_epochs >= self.early.patience

    @property
    def kept_epoch(self) -> int:
        if self.keep == "best" and self.best_epoch is not None:
            return self.best_epoch
        return self.last_epoch

    def state(self) -> dict[str, Any]:
        """JSON-able counters; the best weights travel as tensors beside them."""
        return {
            "best_epoch": self.best_epoch,
            "best_metrics": list(self.best_metrics) if self.best_metrics else None,
            "watched_loss": self.watched_loss,
            "bad_epochs": self.bad_epochs,
            "last_epoch": self.last_epoch,
        }

    def restore(self, state: dict[str, Any], best_weights: dict[str, torch.Tensor] | None) -> None:
        self.best_epoch = state["best_epoch"]
        metrics = state["best_metrics"]
        self.best_metrics = (float(metrics[0]), metrics[1]) if metrics else None
        self.watched_loss = state["watched_loss"]
        self.bad_epochs = int(state["bad_epochs"])
        self.last_epoch = int(state["last_epoch"])
        self.best_weights = best_weights
