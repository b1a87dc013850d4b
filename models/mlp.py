"""`mlp_bn`: a three-layer perceptron with BatchNorm1d, for tabular features."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from models.registry import (
    ArchConfig,
    ClassLabel,
    DropoutP,
    Task,
    check_class_labels,
    dropout_layer,
    register_architecture,
)


class MLPConfig(ArchConfig):
    """The one built-in architecture that can also do regression, so `task` is a field here."""

    in_features: int = Field(2, ge=1, le=1_000_000, description="Features per sample.")
    out_features: int = Field(
        2, ge=1, le=100_000, description="Outputs per sample (classes, or regression targets)."
    )
    task: Task = Field(
        "classification",
        validate_default=True,
        description="classification: out_features logits; regression: out_features values.",
    )
    class_labels: list[ClassLabel] | None = Field(
        None, description="Classification only: names of the classes in output order."
    )
    dropout: DropoutP = 0.0

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: Task, info: ValidationInfo) -> Task:
        out_features = info.data.get("out_features")
        if value == "classification" and out_features is not None and out_features < 2:
            raise ValueError(
                f"classification needs out_features >= 2, got {out_features}; "
                "use task='regression' for a single output"
            )
        return value

    @field_validator("class_labels")
    @classmethod
    def _check_class_labels(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and info.data.get("task") == "regression":
            raise ValueError("class_labels only apply to task='classification'")
        return check_class_labels(value, info.data.get("out_features"))

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def num_outputs(self) -> int:
        return self.out_features

    def labels(self) -> list[str] | None:
        if self.task == "regression":
            return None
        if self.class_labels is not None:
            return list(self.class_labels)
        return [str(i) for i in range(self.out_features)]


class MLPBN(nn.Module):
    """Linear -> BN -> ReLU (-> Dropout) twice, then a linear head.

    BN before the nonlinearity as in Ioffe & Szegedy 2015 (Sec. 3.2); dropout after it, on the
    hidden units, as in Srivastava et al. 2014.
    """

    def __init__(
        self,
        in_features: int = 2,
        out_features: int = 2,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm1d
        self.fc1 = nn.Linear(in_features, 64)
        self.bn1 = norm_layer(64)
        self.fc2 = nn.Linear(64, 32)
        self.bn2 = norm_layer(32)
        self.fc3 = nn.Linear(32, out_features)
        self.relu = nn.ReLU()
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.bn1(self.fc1(x))))
        x = self.dropout(self.relu(self.bn2(self.fc2(x))))
        logits: torch.Tensor = self.fc3(x)
        return logits


@register_architecture(
    "mlp_bn",
    description=(
        "A multilayer perceptron for tabular data: Linear(in_features, 64), BatchNorm1d, ReLU, "
        "Linear(64, 32), BatchNorm1d, ReLU, Linear(32, out_features), with optional dropout after "
        "each hidden ReLU. Set task to "
        "'classification' (out_features logits, at least 2) or 'regression' (out_features raw "
        "values). Input: a vector of in_features numbers. In eval mode a batch of one works, "
        "because BatchNorm1d then uses its running statistics."
    ),
    config=MLPConfig,
)
def mlp_bn(cfg: MLPConfig) -> MLPBN:
    """Build the MLP with the config's BN options."""
    return MLPBN(
        cfg.in_features,
        cfg.out_features,
        norm_layer=partial(nn.BatchNorm1d, **cfg.batch_norm_options()),
        dropout=cfg.dropout,
    )
