"""An epoch's training batches of an image dataset, augmented and normalized beside the step.

The training step waits on nothing but the batch it takes: loader threads build the next few
batches meanwhile (augmentation with Pillow and ToTensor/Normalize with numpy both release the
GIL for their pixel work). Each sample is augmented with a generator seeded from (job seed,
epoch, dataset row), so a batch is the same whichever thread built it, for any thread count:
a resumed job needs no loader state, and the same job trains the same weights.

The trainer keeps what it owns today, the batch order (its `order_gen`) and the batch sizes
(`batches.plan_batches`, no batch of one); this module only turns those rows into tensors. It
draws from numpy generators only, never torch's global one, which Dropout and the resume state
read. In the epoch loop, in place of `x[rows]`:

    with BatchLoader(images, y, augment=params.augment, mean=mean, std=std, seed=seed,
                     threads=loader_threads) as loader:
        ...
        batches = loader.epoch(epoch, order, sizes)
        try:
            for step, (xb, yb) in enumerate(batches, start=1): ...
        finally:
            batches.close()

and validation, never augmented: `normalize(images[val_idx.numpy()], mean, std)`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from service.preprocess.image import normalize
from service.training.augment import augment_image
from service.training.options import Augment

# (x float32 [B, C, H, W], y rows of the labels)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainingImages:
    """An image dataset's pixels for a job that augments them: uint8 N x H x W x C at the
    model's input size (its pipeline's convert, Resize and CenterCrop done), the pipeline's
    Normalize, and the loader threads to build batches on."""

    pixels: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threads: int


# The augmentation's random stream, apart from the split's (seed), the batch order's (seed + 1),
# precise_bn's rows (seed + 2) and its recalibration's (seed + 3).
AUGMENT_STREAM = 4


def sample_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    """The generator that augments dataset row `row` in epoch `epoch` of a job with `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, AUGMENT_STREAM, epoch, row]))


def build_batch(
    images: np.ndarray,
    labels: torch.Tensor,
    rows: np.ndarray,
    *,
    augment: Augment | None,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    epoch: int,
) -> Batch:
    """One batch of `rows`: each sample augmented (when `augment` is set), then normalized."""
    if augment is None:
        pixels = images[rows]
    else:
        pixels = np.stack(
            [augment_image(images[r], augment, sample_rng(seed, epoch, int(r))) for r in rows]
        )
    return normalize(pixels, mean, std), labels[torch.from_numpy(rows)]


class BatchLoader:
    """Builds a job's training batches on `threads` threads, up to `prefetch` batches ahead.

    `threads=0` builds each batch in the caller's thread when it is asked for (no prefetch): the
    reference the threaded batches equal. Close it (or use it as a context manager) when the job
    ends, so its threads go too.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: torch.Tensor,
        *,
        augment: Augment | None,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        threads: int,
        prefetch: int | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(
                f"the loader takes uint8 images N x H x W x 1 or 3; got {images.dtype} "
                f"{list(images.shape)}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if threads < 0:
            raise ValueError(f"threads must be >= 0; got {threads}")
        self._images = images
        self._labels = labels
        self._augment = augment
        self._mean = list(mean)
        self._std = list(std)
        self._seed = seed
        # Two batches a thread keeps every thread busy while the step consumes the oldest one.
        self._prefetch = max(1, prefetch if prefetch is not None else 2 * threads)
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="bnserve-loader") if threads else None
        )

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _build(self, rows: np.ndarray, epoch: int) -> Batch:
        return build_batch(
            self._images,
            self._labels,
            rows,
            augment=self._augment,
            mean=self._mean,
            std=self._std,
            seed=self._seed,
            epoch=epoch,
        )

    def epoch(
        self, epoch: int, order: torch.Tensor, sizes: Sequence[int]
    ) -> Generator[Batch, None, None]:
        """The batches of one epoch: `order` (dataset rows) cut into `sizes`, in that order.

        Leaving the loop early (a cancelled job) drops the batches not yet taken; close the
        generator (or the loader) to cancel the ones still queued.
        """
        if sum(sizes) != order.numel():
            raise ValueError(f"batch sizes add up to {sum(sizes)}, not {order.numel()} rows")
        rows = np.asarray(order, dtype=np.int64)
        cuts = np.cumsum([0, *sizes])
        plan = [rows[start:end] for start, end in itertools.pairwise(cuts)]
        if self._pool is None:
            for batch_rows in plan:
                yield self._build(batch_rows, epoch)
            return
        pending: deque[Future[Batch]] = deque()
        upcoming = iter(plan)
        try:
            for batch_rows in upcoming:
                pending.append(self._pool.submit(self._build, batch_rows, epoch))
                if len(pending) >= self._prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                next_rows = next(upcoming, None)
                if next_rows is not None:
                    pending.append(self._pool.submit(self._build, next_rows, epoch))
                yield batch
        finally:
            for future in pending:
                future.cancel()
