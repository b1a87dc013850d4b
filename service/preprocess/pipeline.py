"""A model's image pipeline as data: torchvision's transforms by name, validated, no torch.

The transforms themselves are in `image.py`; this module holds only the pydantic models, so the
API schemas (and the Python client, which imports them) need neither torch nor Pillow.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Size = int | tuple[int, int]
CHANNELS = {"RGB": 3, "L": 1}
MAX_SIDE = 8192


def pair(size: Size) -> tuple[int, int]:
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
        if value is not None and not all(1 <= side <= MAX_SIDE for side in pair(value)):
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
            return (self.channels, *pair(self.center_crop))
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


class Preprocess(BaseModel):
    """A model's input pipeline; `image` is the only kind so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImagePipeline
