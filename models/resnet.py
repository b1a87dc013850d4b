"""`resnet18`: ResNet-18 (He et al. 2015, "Deep Residual Learning for Image Recognition").

Module names, shapes and initialisation follow torchvision/models/resnet.py (BSD-3-Clause), so a
state_dict saved from `torchvision.models.resnet18(num_classes=...)` loads with strict=True into the
"imagenet" stem; torchvision itself is not a dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from models.registry import (
    ClassifierConfig,
    DropoutP,
    NumClasses,
    dropout_layer,
    register_architecture,
)

NormLayer = Callable[[int], nn.Module]
Stem = Literal["imagenet", "cifar"]


class ResNetConfig(ClassifierConfig):
    """The stem picks between ImageNet-sized and CIFAR-sized inputs; everything else is shared."""

    num_classes: NumClasses = 10
    in_channels: int = Field(3, ge=1, le=64, description="Channels of the input image.")
    stem: Stem = Field(
        "cifar",
        description="imagenet: 7x7/2 conv + 3x3/2 max-pool (torchvision); "
        "cifar: 3x3/1 conv, no max-pool, for small images such as 32x32.",
    )
    image_size: int = Field(
        32,
        ge=8,
        le=1024,
        description="Height and width of the expected input; the network pools globally, so "
        "this sets the advertised input shape, not the weights.",
    )
    zero_init_residual: bool = Field(
        False,
        description="Start each residual branch's last BN at gamma=0 so blocks begin as identity "
        "(Goyal et al. 2017); only affects fresh weights.",
    )
    dropout: DropoutP = 0.0

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias: the BN that follows has its own shift."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 projection for shortcuts that change shape (He et al. 2015, option B)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the shortcut, then ReLU (He et al. 2015, Fig. 2)."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + identity)
        return out


class ResNet(nn.Module):
    """ResNet built from BasicBlocks; `layers=(2, 2, 2, 2)` is ResNet-18."""

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: Stem = "imagenet",
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self._norm_layer: NormLayer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.maxpool: nn.Module
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # Like the CIFAR nets of He et al. 2015 (Sec. 4.2), start with a 3x3 conv and no
            # pooling so 32x32 inputs are not shrunk to 8x8 before layer1; unlike them, keep
            # ResNet-18's widths (the layout popularised by kuangliu/pytorch-cifar), so only
            # conv1's kernel differs from torchvision's state_dict.
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = self._norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # On the pooled features before the classifier, where torchvision's later nets put it
        # (e.g. efficientnet's classifier); torchvision's resnet has none, so 0 matches it.
        self.dropout = dropout_layer(dropout)
        self.fc = nn.Linear(512, num_classes)

        # torchvision's init; BN layers already start at gamma=1, beta=0 in PyTorch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            # Goyal et al. 2017 ("Accurate, Large Minibatch SGD", cited by torchvision): each block
            # starts as the identity, which helps early training. No-op without affine weights.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    weight = getattr(m.bn2, "weight", None)
                    if isinstance(weight, torch.Tensor):
                        nn.init.zeros_(weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), self._norm_layer(planes)
            )
        layers = [
            BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)
        ]
        self.inplanes = planes
        layers += [
            BasicBlock(planes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: torch.Tensor = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return logits


@register_architecture(
    "resnet18",
    description=(
        "ResNet-18 (He et al. 2015): a stem convolution, four stages of two residual "
        "BasicBlocks (64, 128, 256, 512 channels) with BatchNorm2d after every convolution, "
        "global average pooling, optional dropout and a linear classifier. Module names and "
        "shapes match torchvision's resnet18, so its state_dicts load. stem='imagenet' is "
        "torchvision's 7x7 stride-2 conv plus max-pool for 224x224 images; stem='cifar' "
        "(default) uses a 3x3 stride-1 conv and no max-pool for small images such as 32x32."
    ),
    config=ResNetConfig,
)
def resnet18(cfg: ResNetConfig, *, norm_layer: NormLayer | None = None) -> ResNet:
    """Build ResNet-18; `norm_layer` defaults to BatchNorm2d with the config's BN options."""
    return ResNet(
        (2, 2, 2, 2),
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        stem=cfg.stem,
        zero_init_residual=cfg.zero_init_residual,
        norm_layer=norm_layer or partial(nn.BatchNorm2d, **cfg.batch_norm_options()),
        dropout=cfg.dropout,
    )
