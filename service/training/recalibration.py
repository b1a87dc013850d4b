"""Re-estimate BatchNorm running statistics on a dataset without changing any weight.

Useful when the serving data's distribution drifted from the training data's, or when a
checkpoint's running stats are missing or stale: only the buffers `running_mean`, `running_var`
and `num_batches_tracked` change. The technique is torch.optim.swa_utils.update_bn's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from service.training.batches import StepCallback, plan_batches

_CPU = torch.device("cpu")


def recalibrate_bn(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int,
    should_stop: Callable[[], bool],
    on_step: StepCallback | None = None,
    device: torch.device = _CPU,
    seed: int = 0,
) -> bool:
    """Set every BatchNorm layer's running stats to those of `x`; False if stopped (stats kept).

    `model` must be the caller's private copy: it is moved to `device` and left in eval mode.
    Parameters are never touched; on a stop or an error the old statistics are put back, so the
    model is either fully recalibrated or unchanged. `on_step` gets (1, step, steps).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("the model has no BatchNorm layer that tracks running statistics")
    n = int(x.shape[0])
    sizes = plan_batches(n, batch_size)  # no batch of one: BN cannot normalize it in train mode
    steps = len(sizes)
    # Batches drawn in a shuffled order: uploads are often sorted by class, and sorted batches
    # would make every batch's variance, and what later layers see, unrepresentative.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    model.to(device)
    saved = [(bn.momentum, [t.clone() for t in _stats(bn)]) for bn in layers]
    # Only BN layers in train mode: Dropout and the like stay as they serve (off), so the
    # statistics describe what each BN layer will see at inference.
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.train()
    done = False
    try:
        seen = 0
        start = 0
        with torch.no_grad():
            for step, size in enumerate(sizes, start=1):
                if should_stop():
                    return False
                rows = order[start : start + size]
                start += size
                # momentum=None would give a cumulative average in which every *batch* weighs
                # the same (PyTorch BatchNorm docs); size / (seen + size) makes it the same
                # cumulative average with every *sample* weighing the same, so a short last
                # batch does not count as a full one and the first layer's running_mean is the
                # dataset mean exactly.
                for bn in layers:
                    bn.momentum = size / (seen + size)
                model(x[rows].to(device))
                seen += size
                if on_step is not None:
                    on_step(1, step, steps)
        done = True
        return True
    finally:
        for bn, (momentum, old) in zip(layers, saved, strict=True):
            bn.momentum = momentum
            if not done:
                for t, o in zip(_stats(bn), old, strict=True):
                    t.copy_(o)
        model.eval()


def _stats(bn: _BatchNorm) -> list[torch.Tensor]:
    return [
        t
        for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        if isinstance(t, torch.Tensor)
    ]
