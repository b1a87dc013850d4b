"""`mnist_cnn`: two conv-BN-ReLU-pool stages for 28x28 grayscale digits."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from models.registry import (
    ClassifierConfig,
    DropoutP,
    NumClasses,
    dropout_layer,
    register_architecture,
)


class MNISTCNNConfig(ClassifierConfig):
    """Input is fixed at 1x28x28: `fc` consumes the 64x7x7 map left after two 2x2 pools."""

    num_classes: NumClasses = 10
    dropout: DropoutP = 0.0

    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)


class MNISTCNN(nn.Module):
    """BN sits between each convolution and its ReLU, as in Ioffe & Szegedy 2015 (Sec. 3.2)."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.bn1 = norm_layer(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn2 = norm_layer(64)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dropout = dropout_layer(dropout)
        self.fc = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        logits: torch.Tensor = self.fc(self.dropout(torch.flatten(x, 1)))
        return logits


@register_architecture(
    "mnist_cnn",
    description=(
        "A classic MNIST-style CNN: two stages of 3x3 convolution (32 then 64 channels), "
        "BatchNorm2d, ReLU and 2x2 max-pooling, then a linear classifier over the 64x7x7 "
        "features (optional dropout before it). Input: 1x28x28 grayscale images (MNIST, "
        "Fashion-MNIST)."
    ),
    config=MNISTCNNConfig,
)
def mnist_cnn(cfg: MNISTCNNConfig) -> MNISTCNN:
    """Build the MNIST CNN with the config's BN options."""
    return MNISTCNN(
        cfg.num_classes,
        norm_layer=partial(nn.BatchNorm2d, **cfg.batch_norm_options()),
        dropout=cfg.dropout,
    )
