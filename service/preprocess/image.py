"""A model's image pipeline, defined as torchvision's transforms on a PIL image.

`convert(mode)`, `Resize` (bilinear), `CenterCrop`, `ToTensor`, `Normalize`, in that order, with
torchvision's own arithmetic (the resized size, the crop offsets, the zero padding of a crop larger
than the image, `/ 255`, `(x - mean) / std`), so a pipeline written for torchvision gives the same
tensor here. torchvision itself is not used: its wheel for torch 2.13 needs the CUDA build of torch
and does not import with the CPU wheel, so Pillow resizes and crops and torch does the rest.

A BN model fails silently when serving preprocessing differs from training's (no Normalize,
another mean, BGR for RGB): every BN layer's input moves off the running statistics it learned.
So the pipeline belongs to the model, fixed when the model is created: every version of the model,
uploaded or trained, is served through the pipeline it was made for, and a roll-back cannot pair
weights with another pipeline. EXIF orientation is not applied, as torchvision's loaders do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps

from service.errors import PayloadTooLarge
from service.preprocess.pipeline import ImagePipeline, Size, pair


class ResizeTooLarge(PayloadTooLarge):
    """A Resize whose output would hold more pixels than allowed (an extreme aspect ratio)."""

    def __init__(self, size: tuple[int, int], max_pixels: int) -> None:
        super().__init__(
            f"resizing it to the pipeline's size gives {size[0]} x {size[1]} pixels, over the "
            f"limit of {max_pixels} (BNSERVE_MAX_IMAGE_PIXELS): its aspect ratio is too extreme",
            code="image_too_large",
        )


def to_tensor(
    pipeline: ImagePipeline, image: Image.Image, *, max_pixels: int | None = None
) -> torch.Tensor:
    """The float32 (C, H, W) tensor torchvision's Compose of these transforms would give."""
    return normalize(to_pixels(pipeline, image, max_pixels=max_pixels), pipeline.mean, pipeline.std)


def to_pixels(
    pipeline: ImagePipeline, image: Image.Image, *, max_pixels: int | None = None
) -> npt.NDArray[np.uint8]:
    """The uint8 (H, W, C) pixels after convert, Resize and CenterCrop: before ToTensor.

    Training keeps images in this form (augmentations work on them), so that it and serving
    both end in `normalize`, one code path for the same tensor. `max_pixels` bounds Resize's
    output as decoding bounds its input: an int `resize` scales the long side with the short
    one, so a 1 x 16,777,216 image that passes the header check would resize to 28 x 470M.
    """
    if image.mode != pipeline.mode:
        image = image.convert(pipeline.mode)
    if pipeline.resize is not None:
        image = resize(image, pipeline.resize, max_pixels=max_pixels)
    if pipeline.center_crop is not None:
        image = center_crop(image, pair(pipeline.center_crop))
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor then Normalize of uint8 (..., H, W, C) pixels: float32 (..., C, H, W).

    The one definition of those two steps, for a served image and for a training batch alike.
    torchvision's float32 `(v / 255 - mean) / std` for each of the 256 values of a channel,
    looked up per pixel: the same values bit for bit, in one pass instead of five (0.8 ms
    against 2.3 ms per 224 x 224 RGB image). In numpy, not torch: the trainer's loader threads
    call it, and a torch op there would start an OpenMP team of every core beside the step.
    """
    values = np.arange(256, dtype=np.float32) / np.float32(255)  # ToTensor
    mean_ = np.asarray(mean, dtype=np.float32)[:, None]
    std_ = np.asarray(std, dtype=np.float32)[:, None]
    table = (values[None, :] - mean_) / std_  # Normalize, per channel and value
    channels = pixels.shape[-1]
    if table.shape[0] != channels:
        raise ValueError(f"{channels} channel(s) but {table.shape[0]} mean/std values")
    out = np.empty((*pixels.shape[:-3], channels, *pixels.shape[-3:-1]), dtype=np.float32)
    for c in range(channels):
        np.take(table[c], pixels[..., c], out=out[..., c, :, :])
    return torch.from_numpy(out)


def resize(image: Image.Image, size: Size, *, max_pixels: int | None = None) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image (bilinear); `ResizeTooLarge` past `max_pixels`."""
    width, height = image.size
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) == (width, height):
            return image
    else:
        new_h, new_w = size
    if max_pixels is not None and new_w * new_h > max_pixels:
        raise ResizeTooLarge((new_w, new_h), max_pixels)
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision `CenterCrop(size)`: zero padding first where the crop is larger."""
    crop_h, crop_w = size
    width, height = image.size
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=0)
        width, height = image.size
        if (crop_w, crop_h) == (width, height):
            return image
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return image.crop((left, top, left + crop_w, top + crop_h))
