"""What bnserve requires of an architecture's modules before any work is done on them.

Every BatchNorm layer must keep running statistics. One built with `track_running_stats=False`
(possible in a plugin architecture, whose builder need not take `cfg.batch_norm_options()`)
normalises with the current batch's statistics even in eval mode (PyTorch's BatchNorm docs), so
a prediction would depend on its batch-mates and a batch of one fails in BatchNorm1d. Such a model
is refused when it is created, and again (for models created before this check, or a plugin
changed since) before an upload is read, a job is queued or trained, and in the gate.
"""

from __future__ import annotations

import functools

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
    """Refuse a model whose modules bnserve could not serve, before anything is stored or read."""
    problem = _problem(arch, config.model_dump_json())
    if problem is not None:
        raise InvalidInput(problem[1], code=problem[0])


# Building is the only way to see a plugin's layers, and costs up to a second and a few hundred
# MB for the largest configs (the meta device would hold no memory, but its first use imports
# torch._dynamo: 10 s here). Remembered per architecture and config, since a plugin changes only
# with a restart; the built-in architectures (`models/`) are not built at all: their configs
# refuse track_running_stats=false and every BN layer of theirs takes the config's options.
@functools.lru_cache(maxsize=256)
def _problem(arch: Architecture, config_json: str) -> tuple[str, str] | None:
    """(code, detail) of what keeps `arch` with this config from serving, or None."""
    if arch.builder.__module__.split(".")[0] == "models":
        return None
    try:
        module = arch.build(arch.config_cls.model_validate_json(config_json))
    except Exception as exc:
        return "invalid_config", (
            f"architecture {arch.name!r} could not build a module from this config "
            f"({type(exc).__name__}: {exc})"
        )
    problem = running_stats_problem(module, arch.name)
    return None if problem is None else (CODE, problem)


def check_model(model: ModelRow) -> None:
    """`check_architecture` for a model that exists already."""
    arch = get_architecture(model.architecture)
    check_architecture(arch, arch.parse_config(model.config))
