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

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Size = int | tuple[int, int]
CHANNELS = {"RGB": 3, "L": 1}
MAX_SIDE = 8192


def _pair(size: Size) -> tuple[int, int]:
    """(height, width), as torchvision reads an int or an [h, w] size."""
    return (size, size) if isinstance(size, int) else size


class ImagePipeline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["RGB", "L"] = Field(description="PIL colour mode every image is converted to")
    resize: int | tuple[int, int] | None = Field(
        None, description="torchvision Resize: an int for the shorter side, or [h, w]"
    )
    center_crop: int | tuple[int, int] | None = Field(
        None, description="torchvision CenterCrop: an int for a square, or [h, w]"
    )
    mean: list[float] = Field(description="per channel, after ToTensor's scaling to [0, 1]")
    std: list[float] = Field(description="per channel, each > 0")

    @field_validator("resize", "center_crop")
    @classmethod
    def _check_size(cls, value: Size | None) -> Size | None:
        if value is not None and not all(1 <= side <= MAX_SIDE for side in _pair(value)):
            raise ValueError(f"sizes must be between 1 and {MAX_SIDE} pixels")
        return value

    @model_validator(mode="after")
    def _check_channels(self) -> ImagePipeline:
        channels = CHANNELS[self.mode]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mode {self.mode} has {channels} channel(s): mean and std need {channels} "
                f"value(s) each, got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(s) and s > 0 for s in self.std
        ):
            raise ValueError("mean must be finite and std finite and > 0")
        return self

    @property
    def channels(self) -> int:
        return CHANNELS[self.mode]

    def output_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of every output, or None when it depends on the image (no fixed size)."""
        if self.center_crop is not None:
            return (self.channels, *_pair(self.center_crop))
        if isinstance(self.resize, tuple):
            return (self.channels, *self.resize)
        return None

    def check_for(self, input_shape: tuple[int, ...]) -> str | None:
        """Why this pipeline cannot feed an architecture taking `input_shape`, or None."""
        if len(input_shape) != 3:
            return f"the architecture takes {list(input_shape)}, not images (C, H, W)"
        fixed = self.output_shape()
        if fixed is not None and fixed != tuple(input_shape):
            return (
                f"the pipeline gives {list(fixed)} but the architecture takes {list(input_shape)}"
            )
        if fixed is None and self.channels != input_shape[0]:
            return (
                f"the pipeline gives {self.channels} channel(s) ({self.mode}) but the "
                f"architecture takes {list(input_shape)}"
            )
        return None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The float32 (C, H, W) tensor torchvision's Compose of these transforms would give."""
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.resize is not None:
            image = resize(image, self.resize)
        if self.center_crop is not None:
            image = center_crop(image, _pair(self.center_crop))
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
        tensor = tensor.to(torch.float32).div(255)  # ToTensor
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return tensor.sub_(mean).div_(std)  # Normalize


class Preprocess(BaseModel):
    """A model's input pipeline; `image` is the only kind so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImagePipeline


def resize(image: Image.Image, size: Size) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image (bilinear)."""
    width, height = image.size
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) == (width, height):
            return image
    else:
        new_h, new_w = size
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
