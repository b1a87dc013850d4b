"""What every contender shares: the models file it serves and the uvicorn options it runs with.

The benchmark writes one JSON file listing each model (`name`, `architecture`, `config`, `weights`:
a state_dict saved with `torch.save`); every contender builds the same modules from it with
`models.get_architecture(...)`, `load_state_dict(strict=True)` and `eval()`, so all of them serve
the very weights bnserve was given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import get_architecture

# The same for every contender, and what bnserve's `python -m service` gets too: uvicorn picks
# uvloop and httptools ("auto") when they are installed; one process; no access log line per
# request (bnserve's own logging is part of what bnserve is measured on).
UVICORN_OPTIONS: dict[str, Any] = {
    "host": "127.0.0.1",
    "loop": "auto",
    "http": "auto",
    "log_level": "warning",
    "access_log": False,
    "timeout_graceful_shutdown": 10,
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    config: dict[str, Any]
    weights: Path


def read_specs(path: Path) -> list[ModelSpec]:
    """The models file the benchmark wrote."""
    raw = json.loads(path.read_text())
    return [
        ModelSpec(m["name"], m["architecture"], dict(m["config"]), Path(m["weights"])) for m in raw
    ]


def build_module(spec: ModelSpec) -> nn.Module:
    """The plain eval-mode module, as anyone would build it from a state_dict."""
    arch = get_architecture(spec.architecture)
    module = arch.build(arch.parse_config(spec.config))
    module.load_state_dict(torch.load(spec.weights, weights_only=True, map_location="cpu"))
    return module.eval()


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models-file", type=Path, required=True)
    return parser.parse_args()
