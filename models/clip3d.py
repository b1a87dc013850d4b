"""`clip3d`: a small Conv3d + BatchNorm3d classifier for short video clips."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from pydantic import Field
from torch import nn

from models.registry import ClassifierConfig, NumClasses, register_architecture


class Clip3DConfig(ClassifierConfig):
    """Clip size is free (global pooling), but the 2x2x2 max-pool needs at least 2 per axis."""

    num_classes: NumClasses = 5
    in_channels: int = Field(3, ge=1, le=64, description="Channels per frame (3 for RGB).")
    frames: int = Field(8, ge=2, le=256, description="Frames per clip.")
    size: int = Field(32, ge=2, le=512, description="Height and width of each frame.")

    def input_shape(self) -> tuple[int, ...]:
        # (C, T, H, W): the layout nn.Conv3d and torchvision's video models expect.
        return (self.in_channels, self.frames, self.size, self.size)


class Clip3DNet(nn.Module):
    """Two 3x3x3 conv-BN-ReLU stages, then global average pooling and a linear head."""

    def __init__(
        self,
        num_classes: int = 5,
        in_channels: int = 3,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm3d
        # No conv bias: the BN right after subtracts the mean and adds its own shift (as in
        # torchvision's video ResNets, torchvision/models/video/resnet.py).
        self.conv1 = nn.Conv3d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = norm_layer(16)
        self.pool = nn.MaxPool3d(2)
        self.conv2 = nn.Conv3d(16, 32, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm_layer(32)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn2(self.conv2(x))))
        logits: torch.Tensor = self.fc(torch.flatten(x, 1))
        return logits


@register_architecture(
    "clip3d",
    description=(
        "A small 3D CNN for short video clips: two stages of 3x3x3 convolution (16 then 32 "
        "channels) with BatchNorm3d and ReLU, a 2x2x2 max-pool between them, global average "
        "pooling and a linear classifier. Input: clips of shape (channels, frames, size, size), "
        "3x8x32x32 by default. Cheap enough to serve on CPU."
    ),
    config=Clip3DConfig,
)
def clip3d(cfg: Clip3DConfig) -> Clip3DNet:
    """Build the clip classifier with the config's BN options."""
    return Clip3DNet(
        cfg.num_classes,
        cfg.in_channels,
        norm_layer=partial(nn.BatchNorm3d, **cfg.batch_norm_options()),
    )
