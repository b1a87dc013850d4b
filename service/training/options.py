"""The training options a job takes, as data: validated, without torch.

Their behaviour is in `schedule.py` and `selection.py`; the pydantic models live here so the API
schemas (and the Python client, which imports them) do not import PyTorch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Keep = Literal["best", "last"]
StopReason = Literal["completed", "early_stopping"]


class EarlyStopping(BaseModel):
    # strict, as the API's JobCreate that nests it: "3" is not three epochs.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    patience: int = Field(ge=1, le=1000, description="epochs without improvement before stopping")
    min_delta: float = Field(
        default=0.0, ge=0, description="how much the validation loss must fall to count"
    )


class LRSchedule(BaseModel):
    """`step`: multiply by gamma every step_size epochs; `cosine`: anneal to 0 by the last one."""

    # strict, as the API's JobCreate that nests it: "3" is not three epochs.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    kind: Literal["step", "cosine"]
    warmup_epochs: int = Field(
        default=0, ge=0, le=1000, description="epochs of linear warm-up from lr/(n+1) up to lr"
    )
    step_size: int | None = Field(
        default=None, ge=1, le=1000, description="kind 'step': epochs between two decays"
    )
    gamma: float | None = Field(
        default=None, gt=0, le=1, description="kind 'step': the factor of each decay (0.1)"
    )

    @model_validator(mode="after")
    def _step_fields_for_step_only(self) -> LRSchedule:
        if self.kind != "step" and (self.step_size is not None or self.gamma is not None):
            raise ValueError("lr_schedule: step_size and gamma apply to kind 'step' only")
        if self.kind == "step" and self.step_size is None:
            raise ValueError("lr_schedule: kind 'step' needs step_size (epochs between decays)")
        return self


# StepLR's own default decay.
DEFAULT_GAMMA = 0.1


def check_schedule(schedule: LRSchedule, epochs: int) -> None:
    """Refuse a warm-up that leaves no epoch for the schedule itself."""
    if schedule.warmup_epochs >= epochs:
        raise ValueError(
            f"lr_schedule.warmup_epochs ({schedule.warmup_epochs}) must be fewer than epochs "
            f"({epochs})"
        )


# Bounds that keep a request's numbers sane; the image itself bounds the sizes further
# (`check_augment`, at job creation, where the model's input size is known).
MAX_SIDE = 8192
MAX_PADDING = 1024


def size_pair(size: int | list[int]) -> tuple[int, int]:
    """(height, width), as torchvision reads an int or an [h, w] size."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _check_sides(size: int | list[int], what: str) -> None:
    if isinstance(size, list) and len(size) != 2:
        raise ValueError(f"{what} is an int or [height, width]; got {len(size)} values")
    if not all(1 <= side <= MAX_SIDE for side in size_pair(size)):
        raise ValueError(f"{what} must be between 1 and {MAX_SIDE} pixels")


def _check_range(pair: list[float], what: str, low: float, high: float) -> None:
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{what} is [min, max] with {low} <= min <= max <= {high}; got {pair}")


class RandomCrop(BaseModel):
    """torchvision `RandomCrop(size, padding)`: zero padding (fill 0, constant), then a window."""

    # strict, as the API's JobCreate that nests it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    size: int | list[int] = Field(description="an int for a square, or [height, width]")
    padding: int | list[int] = Field(
        default=0,
        description="zero padding on every side first: an int, [left/right, top/bottom] or "
        "[left, top, right, bottom], as torchvision reads it",
    )

    @model_validator(mode="after")
    def _check(self) -> RandomCrop:
        _check_sides(self.size, "random_crop.size")
        sides = [self.padding] if isinstance(self.padding, int) else self.padding
        if isinstance(self.padding, list) and len(sides) not in (2, 4):
            raise ValueError("random_crop.padding is an int or a list of 2 or 4 ints")
        if not all(0 <= p <= MAX_PADDING for p in sides):
            raise ValueError(f"random_crop.padding must be between 0 and {MAX_PADDING} pixels")
        return self

    def borders(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) padding."""
        p = self.padding
        if isinstance(p, int):
            return (p, p, p, p)
        if len(p) == 2:
            return (p[0], p[1], p[0], p[1])
        return (p[0], p[1], p[2], p[3])


class RandomResizedCrop(BaseModel):
    """torchvision `RandomResizedCrop(size, scale, ratio)`, resized back bilinearly."""

    # strict, as the API's JobCreate that nests it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    size: int | list[int] = Field(description="the output: an int for a square, or [h, w]")
    scale: list[float] = Field(
        default=[0.08, 1.0], description="[min, max] fraction of the image's area to crop"
    )
    ratio: list[float] = Field(
        default=[3 / 4, 4 / 3], description="[min, max] aspect ratio (width / height) of the crop"
    )

    @model_validator(mode="after")
    def _check(self) -> RandomResizedCrop:
        _check_sides(self.size, "random_resized_crop.size")
        _check_range(self.scale, "random_resized_crop.scale", 0, 1)
        if self.scale[0] <= 0:
            raise ValueError("random_resized_crop.scale's min must be > 0")
        _check_range(self.ratio, "random_resized_crop.ratio", 0, 100)
        if self.ratio[0] <= 0:
            raise ValueError("random_resized_crop.ratio's min must be > 0")
        return self


class ColorJitter(BaseModel):
    """torchvision `ColorJitter`: each factor drawn uniformly, the four applied in random order.

    brightness, contrast and saturation `x` draw a factor in [max(0, 1 - x), 1 + x]; hue `h` a
    shift in [-h, h] of the hue circle. 0 leaves that adjustment out, as torchvision does.
    """

    # strict, as the API's JobCreate that nests it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    brightness: float = Field(default=0.0, ge=0, le=100)
    contrast: float = Field(default=0.0, ge=0, le=100)
    saturation: float = Field(default=0.0, ge=0, le=100)
    hue: float = Field(default=0.0, ge=0, le=0.5)


class Augment(BaseModel):
    """A training job's augmentation: torchvision's transforms by name, applied in this order.

    random_crop, random_resized_crop, hflip, vflip, rotation, color_jitter, random_grayscale:
    the order API.md lists them, which is also the usual order of a torchvision Compose (geometry,
    then colour). Training split only; the behaviour is in `augment.py`.
    """

    # strict, as the API's JobCreate that nests it: "0.5" is not a probability.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    random_crop: RandomCrop | None = None
    random_resized_crop: RandomResizedCrop | None = None
    hflip: float | None = Field(
        default=None, ge=0, le=1, description="RandomHorizontalFlip: probability of a flip"
    )
    vflip: float | None = Field(
        default=None, ge=0, le=1, description="RandomVerticalFlip: probability of a flip"
    )
    rotation: float | list[float] | None = Field(
        default=None,
        description="RandomRotation: degrees d for an angle in [-d, d], or [min, max]; nearest "
        "interpolation, same size, corners filled with 0",
    )
    color_jitter: ColorJitter | None = None
    random_grayscale: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="RandomGrayscale: probability of turning the image gray (channels kept)",
    )

    @model_validator(mode="after")
    def _check(self) -> Augment:
        if isinstance(self.rotation, float) and not 0 <= self.rotation <= 360:
            raise ValueError("augment.rotation is degrees between 0 and 360, or [min, max]")
        if isinstance(self.rotation, list):
            _check_range(self.rotation, "augment.rotation", -360, 360)
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("augment names no transform; leave it out to train without one")
        return self

    def degrees(self) -> tuple[float, float] | None:
        """RandomRotation's angle range, or None without rotation."""
        if self.rotation is None:
            return None
        if isinstance(self.rotation, float):
            return (-self.rotation, self.rotation)
        return (self.rotation[0], self.rotation[1])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an augmented image of this size: the crops set it, nothing else."""
        if self.random_crop is not None:
            height, width = size_pair(self.random_crop.size)
        if self.random_resized_crop is not None:
            height, width = size_pair(self.random_resized_crop.size)
        return height, width


def check_augment(augment: Augment, height: int, width: int) -> str | None:
    """Why `augment` cannot train a model on images of this size, or None.

    The batches must keep the model's input size, and RandomCrop refuses a window larger than
    the padded image (torchvision raises "Required crop size ... is larger than input image").
    """
    if augment.random_crop is not None:
        left, top, right, bottom = augment.random_crop.borders()
        crop_h, crop_w = size_pair(augment.random_crop.size)
        padded_h, padded_w = height + top + bottom, width + left + right
        if crop_h > padded_h or crop_w > padded_w:
            return (
                f"random_crop.size [{crop_h}, {crop_w}] is larger than the padded image "
                f"[{padded_h}, {padded_w}]"
            )
    out = augment.output_size(height, width)
    if out != (height, width):
        return (
            f"augment makes images of [{out[0]}, {out[1]}] but the model takes "
            f"[{height}, {width}]; crop to the model's input size"
        )
    return None
