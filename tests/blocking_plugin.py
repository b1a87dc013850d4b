"""A test-only architecture plugin whose forward passes wait while a file exists.

A server started with `BNSERVE_ARCHITECTURE_PLUGINS=tests.blocking_plugin` and
`BLOCKING_PLUGIN_FILE=<path>` holds every forward pass, the load's gate probe included, while
`<path>` exists, and touches `<path>.entered` when one starts waiting: so a test can hold a
version load in another process at a known point and act while it is held (`test_identity.py`).
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from models import ClassifierConfig, NumClasses, register_architecture

NAME = "blocking_mlp"
# Read by this plugin only (not a bnserve setting): set in the server process's environment.
FILE_ENV = "BLOCKING_PLUGIN_FILE"
MAX_WAIT_S = 60.0


class BlockingConfig(ClassifierConfig):
    num_classes: NumClasses = 2

    def input_shape(self) -> tuple[int, ...]:
        return (4,)


def wait_while_blocked() -> None:
    path = os.environ.get(FILE_ENV)
    if not path or not Path(path).exists():
        return
    Path(path + ".entered").touch()
    deadline = time.monotonic() + MAX_WAIT_S
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


class BlockingMLP(nn.Module):
    def __init__(self, cfg: BlockingConfig) -> None:
        super().__init__()
        bn = partial(nn.BatchNorm1d, **cfg.batch_norm_options())
        self.fc = nn.Linear(4, 8)
        self.bn = bn(8)
        self.out = nn.Linear(8, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wait_while_blocked()
        out: torch.Tensor = self.out(torch.relu(self.bn(self.fc(x))))
        return out


@register_architecture(
    NAME, description="Test only: forwards wait on a file.", config=BlockingConfig
)
def blocking_mlp(cfg: BlockingConfig) -> nn.Module:
    return BlockingMLP(cfg)
