"""What bnserve requires of an architecture's modules before any work is done on them.

Every BatchNorm layer must keep running statistics. One built with `track_running_stats=False`
(possible in a plugin architecture, whose builder need not take `cfg.batch_norm_options()`)
normalises with the current batch's statistics even in eval mode (PyTorch's BatchNorm docs), so
a prediction would depend on its batch-mates and a batch of one fails in BatchNorm1d. Such a model
is refused when it is created, and again (for models created before this check, or a plugin
changed since) before an upload is read, a job is queued or trained, and in the gate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import ArchConfig, Architecture, get_architecture
from service.db.tables import ModelRow
from service.errors import BNServeError, InvalidInput

CODE = "bn_without_running_stats"


def batchnorms_without_running_stats(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that keep no running mean and variance."""
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None)
    ]


def running_stats_problem(module: nn.Module, architecture: str | None) -> str | None:
    """Why `module` (of `architecture`, if known) cannot serve for want of statistics, or None."""
    layers = batchnorms_without_running_stats(module)
    if not layers:
        return None
    shown = ", ".join(layers[:5]) + (f", and {len(layers) - 5} more" if len(layers) > 5 else "")
    what = f"architecture {architecture!r}" if architecture else "the model"
    return (
        f"{what} has {len(layers)} BatchNorm layer(s) without running "
        f"statistics (track_running_stats=False): {shown}. In eval mode they normalise with "
        "each batch's own statistics, so a prediction would depend on the other samples in its "
        "batch; bnserve serves only BatchNorm layers that track running statistics (build them "
        "with cfg.batch_norm_options())"
    )


def require_running_stats(
    module: nn.Module, architecture: str | None, error: type[BNServeError] = InvalidInput
) -> None:
    """Raise `error` (code `bn_without_running_stats`) if a BN layer keeps no statistics."""
    problem = running_stats_problem(module, architecture)
    if problem is not None:
        raise error(problem, code=CODE)


def check_architecture(arch: Architecture, config: ArchConfig) -> None:
    """Refuse a model whose modules bnserve could not serve, before anything is stored or read.

    The module is built on the meta device (structure only, no memory: a large ResNet costs
    nothing), or for real where a builder cannot work on meta.
    """
    try:
        with torch.device("meta"):
            module = arch.build(config)
    except Exception:
        try:
            module = arch.build(config)
        except Exception as exc:
            raise InvalidInput(
                f"architecture {arch.name!r} could not build a module from this config "
                f"({type(exc).__name__}: {exc})",
                code="invalid_config",
            ) from None
    require_running_stats(module, arch.name)


def check_model(model: ModelRow) -> None:
    """`check_architecture` for a model that exists already."""
    arch = get_architecture(model.architecture)
    check_architecture(arch, arch.parse_config(model.config))
