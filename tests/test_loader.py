"""The training batch loader: per-sample seeds, any thread count, the training split only.

Labels are the row numbers (`torch.arange(N)`), so every batch says which rows it holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.preprocess.image import normalize, to_tensor
from service.preprocess.pipeline import ImagePipeline
from service.training.augment import augment_image
from service.training.batches import plan_batches
from service.training.loader import BatchLoader, sample_rng
from service.training.options import Augment
from service.training.trainer import split_dataset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
AUGMENT = Augment.model_validate(
    {
        "random_crop": {"size": 8, "padding": 2},
        "hflip": 0.5,
        "rotation": 10,
        "color_jitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
        "random_grayscale": 0.2,
    }
)


def _images(n: int = 21, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _epoch(
    images: np.ndarray,
    order: torch.Tensor,
    sizes: list[int],
    threads: int,
    epoch: int = 1,
    **kw: Any,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    options: dict[str, Any] = {"augment": AUGMENT, "mean": MEAN, "std": STD, "seed": 11}
    labels = torch.arange(images.shape[0])
    with BatchLoader(images, labels, threads=threads, **(options | kw)) as loader:
        return list(loader.epoch(epoch, order, sizes))


def test_normalize_is_to_tensor_and_normalize_bit_for_bit() -> None:
    pixels = _images(4)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div(255)
    expected = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    got = normalize(pixels, MEAN, STD)
    assert got.dtype == torch.float32
    assert got.shape == (4, 3, 8, 8)
    assert got.is_contiguous()
    assert torch.equal(got, expected)
    pipeline = ImagePipeline(mode="RGB", mean=MEAN, std=STD)
    assert torch.equal(to_tensor(pipeline, Image.fromarray(pixels[0])), expected[0])


def test_each_sample_is_augmented_with_its_own_seed_then_normalized() -> None:
    images = _images()
    order = torch.tensor([5, 3, 17, 0])
    [(x, y)] = _epoch(images, order, [4], threads=0, epoch=2)
    assert y.tolist() == [5, 3, 17, 0]
    for i, row in enumerate(order.tolist()):
        augmented = augment_image(images[row], AUGMENT, sample_rng(11, 2, row))
        assert torch.equal(x[i], normalize(augmented, MEAN, STD))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_batches_are_the_same_for_any_thread_count(threads: int) -> None:
    images = _images()
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    sizes = plan_batches(21, 4)
    reference = _epoch(images, order, sizes, threads=0)
    batches = _epoch(images, order, sizes, threads=threads, prefetch=3)
    assert len(batches) == len(reference) == len(sizes)
    for (x, y), (x0, y0) in zip(batches, reference, strict=True):
        assert torch.equal(x, x0)
        assert torch.equal(y, y0)


def test_batch_sizes_follow_the_plan_a_last_batch_of_one_merged() -> None:
    images = _images(9)
    sizes = plan_batches(9, 4)
    assert sizes == [4, 5]
    batches = _epoch(images, torch.arange(9), sizes, threads=2)
    assert [int(y.numel()) for _, y in batches] == [4, 5]
    with pytest.raises(ValueError, match="add up to 8, not 9"):
        _epoch(images, torch.arange(9), [4, 4], threads=2)


def test_another_epoch_draws_other_augmentations_of_the_same_rows() -> None:
    images = _images()
    order = torch.arange(21)
    [(first, _)] = _epoch(images, order, [21], threads=0, epoch=1)
    [(second, _)] = _epoch(images, order, [21], threads=0, epoch=2)
    assert not torch.equal(first, second)


def test_only_the_training_rows_are_augmented_and_validation_stays_as_served() -> None:
    images = _images()
    before = images.copy()
    train_idx, val_idx = split_dataset(21, 0.25, seed=11)
    sizes = plan_batches(int(train_idx.numel()), 4)
    batches = _epoch(images, train_idx, sizes, threads=2)
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted(train_idx.tolist())  # each training row once
    assert not set(seen.tolist()) & set(val_idx.tolist())
    np.testing.assert_array_equal(images, before)  # the dataset itself is never changed
    # Validation is normalized as a served image is: the pipeline's tensor, no augmentation.
    x_val = normalize(images[val_idx.numpy()], MEAN, STD)
    pipeline = ImagePipeline(mode="RGB", mean=MEAN, std=STD)
    for i, row in enumerate(val_idx.tolist()):
        assert torch.equal(x_val[i], to_tensor(pipeline, Image.fromarray(images[row])))


def test_without_augment_the_batches_are_the_normalized_rows() -> None:
    images = _images()
    order = torch.tensor([2, 4, 6, 8])
    [(x, _y)] = _epoch(images, order, [4], threads=2, augment=None)
    assert torch.equal(x, normalize(images[[2, 4, 6, 8]], MEAN, STD))


def test_gray_images_give_one_channel_batches() -> None:
    images = _images()[..., :1]
    [(x, _)] = _epoch(images, torch.arange(6), [6], threads=1, mean=[0.5], std=[0.25])
    assert x.shape == (6, 1, 8, 8)


def test_leaving_an_epoch_early_and_closing_stops_the_threads() -> None:
    images = _images()
    labels = torch.arange(21)
    loader = BatchLoader(
        images, labels, augment=AUGMENT, mean=MEAN, std=STD, seed=1, threads=2, prefetch=2
    )
    batches = loader.epoch(1, torch.arange(21), plan_batches(21, 2))
    next(batches)
    batches.close()  # a cancelled job: the queued batches are dropped
    loader.close()
    with pytest.raises(RuntimeError):
        next(iter(loader.epoch(1, torch.arange(21), plan_batches(21, 2))))


def test_bad_inputs_are_refused() -> None:
    labels = torch.arange(4)
    with pytest.raises(ValueError, match="uint8 images"):
        BatchLoader(
            np.zeros((4, 8, 8, 3)), labels, augment=None, mean=MEAN, std=STD, seed=0, threads=0
        )
    with pytest.raises(ValueError, match="5 labels"):
        BatchLoader(
            _images(4), torch.arange(5), augment=None, mean=MEAN, std=STD, seed=0, threads=0
        )
    with pytest.raises(ValueError, match="3 channel\\(s\\) but 1 mean/std"):
        normalize(_images(1), [0.5], [0.5])
