"""`seed_cnn`: the single conv-BN-ReLU block classifier from the article bnserve started from."""

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

# The article's net is tied to CIFAR-sized input: `fc` consumes the full 16x32x32 feature map.
IMAGE_SIZE = 32


class SeedCNNConfig(ClassifierConfig):
    """Only the head and BN options vary; the input is fixed at 3x32x32."""

    num_classes: NumClasses = 10
    dropout: DropoutP = 0.0

    def input_shape(self) -> tuple[int, ...]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)


class SeedCNN(nn.Module):
    """Attribute names mirror the article's class so its state_dicts load with strict=True."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1),
            norm_layer(16),
            nn.ReLU(),
        )
        # Outside layer1, so its indices (and the article's state_dict keys) stay as they are.
        self.dropout = dropout_layer(dropout)
        self.fc = nn.Linear(16 * IMAGE_SIZE * IMAGE_SIZE, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.dropout(torch.flatten(self.layer1(x), 1)))
        return logits


@register_architecture(
    "seed_cnn",
    description=(
        "The small CNN from the BatchNorm article bnserve grew out of: one 3x3 convolution with "
        "16 channels, BatchNorm2d and ReLU, then a linear classifier over the flattened 16x32x32 "
        "feature map (optional dropout before it). Input: 3x32x32 images (CIFAR-10 sized). Its "
        "state_dict keys (layer1.0, layer1.1, fc) match the article's class, so checkpoints "
        "saved from it load unchanged."
    ),
    config=SeedCNNConfig,
)
def seed_cnn(cfg: SeedCNNConfig) -> SeedCNN:
    """Build the article's CNN with the config's BN options."""
    return SeedCNN(
        cfg.num_classes,
        norm_layer=partial(nn.BatchNorm2d, **cfg.batch_norm_options()),
        dropout=cfg.dropout,
    )
