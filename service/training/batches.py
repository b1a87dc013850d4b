"""The batch plan every pass over training data follows: no batch of one ever reaches BatchNorm.

BatchNorm in train mode normalizes with the statistics of the current batch, so a batch of one
sample has no variance to normalize by (PyTorch raises "Expected more than 1 value per channel
when training"). Training and BN recalibration both cut their epochs with `plan_batches`.
"""

from __future__ import annotations

from collections.abc import Callable

# (epoch, step, steps): epochs and steps count from 1, `steps` is the number in this epoch.
StepCallback = Callable[[int, int, int], None]


def plan_batches(n_train: int, batch_size: int) -> list[int]:
    """Batch sizes for one epoch covering every sample once, none of them of size 1.

    A remainder of one sample is merged into the previous batch (one batch of batch_size + 1)
    rather than dropped, so every sample is seen every epoch; DataLoader's drop_last would
    discard the whole remainder instead.
    """
    if n_train < 2:
        raise ValueError(f"need at least 2 training samples for a batch; got {n_train}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2; got {batch_size}")
    full, rest = divmod(n_train, batch_size)
    sizes = [batch_size] * full
    if rest == 1:
        sizes[-1] += 1  # full >= 1 here: n_train >= 2 and rest == 1 imply n_train > batch_size
    elif rest:
        sizes.append(rest)
    return sizes
