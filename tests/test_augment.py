"""Augmentation: each transform against torchvision's definition, computed here independently.

Small random uint8 images; the expected outputs come from NumPy and the formulas torchvision's
transforms document on PIL images (a window of the zero-padded image, array reversal, blends
rounded down as Pillow's ImageEnhance does, ITU-R 601-2 luma). Where a transform draws, the test
draws the same parameters with a generator of the same seed (`*_params`) and checks them too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.training.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    augment_image,
    color_jitter,
    color_jitter_params,
    random_crop_params,
    random_resized_crop_params,
)
from service.training.options import Augment, ColorJitter, RandomResizedCrop, check_augment
from service.training.params import TrainParams


def _image(h: int = 12, w: int = 12, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _run(image: np.ndarray, seed: int = 1, **options: Any) -> np.ndarray:
    out = augment_image(image, Augment.model_validate(options), np.random.default_rng(seed))
    assert out.dtype == np.uint8
    return out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """PIL's convert("L"): ITU-R 601-2, L = R*299/1000 + G*587/1000 + B*114/1000, in the
    16-bit fixed point Pillow's Convert.c computes it with (rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """Image.blend(degenerate, image, factor), as ImageEnhance uses it: float32, rounded down."""
    d, x = degenerate.astype(np.float32), image.astype(np.float32)
    return np.clip(np.floor(d + np.float32(factor) * (x - d)), 0, 255).astype(np.uint8)


# --- geometry ---------------------------------------------------------------------------------


def test_random_crop_is_a_window_of_the_zero_padded_image_at_the_drawn_offsets() -> None:
    image = _image(10, 12)
    options = Augment.model_validate({"random_crop": {"size": [10, 12], "padding": [3, 2]}})
    assert options.random_crop is not None
    top, left, h, w = random_crop_params(14, 18, options.random_crop, np.random.default_rng(5))
    padded = np.pad(image, ((2, 2), (3, 3), (0, 0)))  # [left/right, top/bottom], fill 0
    out = augment_image(image, options, np.random.default_rng(5))
    assert (h, w) == (10, 12)
    assert 0 <= top <= 4
    assert 0 <= left <= 6
    np.testing.assert_array_equal(out, padded[top : top + 10, left : left + 12])


def test_random_crop_of_the_padded_size_takes_it_whole_and_its_offsets_vary_with_the_seed() -> None:
    image = _image(8, 8)
    whole = _run(image, random_crop={"size": 10, "padding": 1})
    np.testing.assert_array_equal(whole, np.pad(image, ((1, 1), (1, 1), (0, 0))))
    crops = {_run(image, seed=s, random_crop={"size": 8, "padding": 4}).tobytes() for s in range(8)}
    assert len(crops) > 1


def test_flips_reverse_the_array_with_p_1_and_never_with_p_0() -> None:
    image = _image(5, 7)
    np.testing.assert_array_equal(_run(image, hflip=1.0), image[:, ::-1])
    np.testing.assert_array_equal(_run(image, vflip=1.0), image[::-1])
    np.testing.assert_array_equal(_run(image, hflip=0.0, vflip=0.0), image)


def test_a_flip_with_p_one_half_flips_about_half_the_samples() -> None:
    image = _image(4, 4)
    flipped = sum(
        np.array_equal(_run(image, seed=s, hflip=0.5), image[:, ::-1]) for s in range(200)
    )
    assert 70 < flipped < 130


@pytest.mark.parametrize(("angle", "turns"), [(90, 1), (180, 2), (-90, -1), (270, 3)])
def test_rotation_by_right_angles_is_exact_on_a_square_image(angle: int, turns: int) -> None:
    image = _image(9, 9)
    # [a, a]: torchvision draws the angle uniformly in [min, max]; counter-clockwise.
    np.testing.assert_array_equal(_run(image, rotation=[angle, angle]), np.rot90(image, turns))


def test_rotation_keeps_the_size_and_fills_the_corners_with_zero() -> None:
    image = np.full((11, 11, 3), 200, dtype=np.uint8)
    out = _run(image, rotation=[45.0, 45.0])
    assert out.shape == image.shape
    assert (out[0, 0] == 0).all()
    assert (out[5, 5] == 200).all()


def test_random_resized_crop_draws_a_box_inside_the_image_within_scale_and_ratio() -> None:
    height, width = 20, 30
    options = RandomResizedCrop(size=8, scale=[0.2, 0.6], ratio=[0.5, 2.0])
    for seed in range(50):
        top, left, h, w = random_resized_crop_params(
            height, width, options, np.random.default_rng(seed)
        )
        assert top >= 0
        assert top + h <= height
        assert left >= 0
        assert left + w <= width
        # w = round(sqrt(area * r)) and h = round(sqrt(area / r)): each within half a pixel.
        assert (h - 0.5) * (w - 0.5) <= 0.6 * height * width
        assert (h + 0.5) * (w + 0.5) >= 0.2 * height * width
        assert (w - 0.5) / (h + 0.5) <= 2.0
        assert (w + 0.5) / (h - 0.5) >= 0.5


def test_random_resized_crop_output_is_the_box_resized_bilinearly() -> None:
    image = _image(16, 20)
    options = Augment.model_validate({"random_resized_crop": {"size": [6, 10]}})
    assert options.random_resized_crop is not None
    top, left, h, w = random_resized_crop_params(
        16, 20, options.random_resized_crop, np.random.default_rng(3)
    )
    window = Image.fromarray(image[top : top + h, left : left + w])
    expected = np.asarray(window.resize((10, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(augment_image(image, options, np.random.default_rng(3)), expected)


def test_random_resized_crop_falls_back_to_the_central_crop_when_ten_tries_fail() -> None:
    # Every try asks for a crop wider than the image: ratio >= 10 on a square of 8.
    options = RandomResizedCrop(size=8, scale=[1.0, 1.0], ratio=[10.0, 20.0])
    box = random_resized_crop_params(8, 8, options, np.random.default_rng(0))
    # torchvision: in_ratio 1 < min(ratio) -> w = width, h = round(w / min(ratio)), centred.
    assert box == ((8 - 1) // 2, 0, 1, 8)
    whole = RandomResizedCrop(size=8, scale=[1.0, 1.0], ratio=[0.9, 1.1])
    assert random_resized_crop_params(8, 8, whole, np.random.default_rng(0)) == (0, 0, 8, 8)


# --- colour -----------------------------------------------------------------------------------


def test_color_jitter_brightness_is_the_image_scaled_by_the_factor_and_clipped() -> None:
    image = _image()
    for factor in (0.3, 1.0, 1.8):
        out = np.asarray(color_jitter(Image.fromarray(image), [0, 1, 2, 3], {BRIGHTNESS: factor}))
        np.testing.assert_array_equal(out, _blend(np.zeros_like(image), image, factor))


def test_color_jitter_contrast_blends_with_the_grayscale_mean_and_saturation_with_grayscale() -> (
    None
):
    image = _image()
    gray = _luma(image)
    mean = np.full_like(image, int(gray.mean() + 0.5))
    for factor in (0.4, 1.6):
        contrast = color_jitter(Image.fromarray(image), [1], {CONTRAST: factor})
        np.testing.assert_array_equal(np.asarray(contrast), _blend(mean, image, factor))
        saturation = color_jitter(Image.fromarray(image), [2], {SATURATION: factor})
        gray3 = np.repeat(gray[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(np.asarray(saturation), _blend(gray3, image, factor))


def test_hue_turns_the_colour_circle_and_leaves_grays_alone() -> None:
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    # A third of a turn: red -> green; minus a third: red -> blue (HSV, within rounding).
    green = np.asarray(color_jitter(Image.fromarray(red), [3], {HUE: 1 / 3})).astype(int)
    blue = np.asarray(color_jitter(Image.fromarray(red), [3], {HUE: -1 / 3})).astype(int)
    assert np.abs(green - [0, 255, 0]).max() <= 6
    assert np.abs(blue - [0, 0, 255]).max() <= 6
    gray = np.repeat(_image(c=1), 3, axis=2)
    np.testing.assert_array_equal(
        np.asarray(color_jitter(Image.fromarray(gray), [3], {HUE: 0.25})), gray
    )


def test_color_jitter_draws_factors_in_torchvisions_ranges_and_applies_them_in_drawn_order() -> (
    None
):
    jitter = ColorJitter(brightness=0.5, contrast=2.0, hue=0.2)
    for seed in range(100):
        order, factors = color_jitter_params(jitter, np.random.default_rng(seed))
        assert sorted(order) == [0, 1, 2, 3]
        # [max(0, 1 - x), 1 + x], [-h, h]; saturation 0 is off, so it draws no factor.
        assert factors.keys() == {BRIGHTNESS, CONTRAST, HUE}
        assert 0.5 <= factors[BRIGHTNESS] <= 1.5
        assert 0 <= factors[CONTRAST] <= 3
        assert -0.2 <= factors[HUE] <= 0.2
    image = _image()
    factors = {BRIGHTNESS: 1.6, CONTRAST: 0.3}
    one_way = np.asarray(color_jitter(Image.fromarray(image), [0, 1, 2, 3], factors))
    other_way = np.asarray(color_jitter(Image.fromarray(image), [1, 0, 2, 3], factors))
    assert not np.array_equal(one_way, other_way)
    # Brightness first, then contrast against the brightened image's gray mean.
    bright = _blend(np.zeros_like(image), image, 1.6)
    mean = np.full_like(image, int(_luma(bright).mean() + 0.5))
    np.testing.assert_array_equal(one_way, _blend(mean, bright, 0.3))


def test_random_grayscale_keeps_the_channel_count_with_ITU_R_601_2_luma() -> None:
    image = _image()
    out = _run(image, random_grayscale=1.0)
    assert out.shape == image.shape
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], _luma(image))
    # Within a rounding of the float formula PIL documents.
    r, g, b = (image[..., i].astype(float) for i in range(3))
    assert np.abs(out[:, :, 0] - (r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000)).max() <= 0.5
    np.testing.assert_array_equal(_run(image, random_grayscale=0.0), image)


def test_one_channel_images_go_through_every_transform_and_stay_one_channel() -> None:
    image = _image(c=1)
    every: dict[str, Any] = {
        "random_crop": {"size": 12, "padding": 2},
        "random_resized_crop": {"size": 12},
        "hflip": 0.5,
        "vflip": 0.5,
        "rotation": 20,
        "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.2},
        "random_grayscale": 0.5,
    }
    assert _run(image, **every).shape == (12, 12, 1)
    np.testing.assert_array_equal(_run(image, random_grayscale=1.0), image)


# --- determinism ------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_image_and_another_seed_another() -> None:
    image = _image(16, 16)
    options = {
        "random_crop": {"size": 16, "padding": 2},
        "hflip": 0.5,
        "rotation": 15,
        "color_jitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1},
        "random_grayscale": 0.2,
    }
    first = _run(image, seed=7, **options)
    np.testing.assert_array_equal(first, _run(image, seed=7, **options))
    assert not np.array_equal(first, _run(image, seed=8, **options))
    assert first.shape == image.shape


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("augment", "match"),
    [
        ({}, "names no transform"),
        ({"hflip": 1.5}, "hflip"),
        ({"vflip": -0.1}, "vflip"),
        ({"hflip": "0.5"}, "valid number"),
        ({"random_grayscale": True}, "valid number"),
        ({"random_crop": {"size": 0}}, "between 1 and"),
        ({"random_crop": {"size": [4, 4, 4]}}, "int or \\[height, width\\]"),
        ({"random_crop": {"size": 4, "padding": -1}}, "padding"),
        ({"random_crop": {"size": 4, "padding": [1, 2, 3]}}, "2 or 4"),
        ({"random_crop": {"padding": 4}}, "size"),
        ({"random_resized_crop": {"size": 8, "scale": [0.9, 0.1]}}, "min <= max"),
        ({"random_resized_crop": {"size": 8, "scale": [0.0, 0.5]}}, "> 0"),
        ({"random_resized_crop": {"size": 8, "ratio": [2.0, 1.0]}}, "min <= max"),
        ({"random_resized_crop": {"size": 8, "ratio": [1.0]}}, "\\[min, max\\]"),
        ({"rotation": -10}, "rotation"),
        ({"rotation": [30, 10]}, "min <= max"),
        ({"color_jitter": {"brightness": -0.1}}, "brightness"),
        ({"color_jitter": {"hue": 0.6}}, "hue"),
        ({"color_jitter": {"gamma": 1}}, "gamma"),
        ({"mixup": 0.2}, "mixup"),
    ],
)
def test_bad_augment_options_are_refused_naming_the_field(augment: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Augment.model_validate(augment)
    # As a job's parameter too: what the API turns into a 422.
    with pytest.raises(ValidationError, match=match):
        TrainParams.model_validate({"epochs": 1, "batch_size": 2, "lr": 0.1, "augment": augment})


def test_augment_round_trips_through_the_jobs_stored_json() -> None:
    params = TrainParams.model_validate(
        {
            "epochs": 1,
            "batch_size": 2,
            "lr": 0.1,
            "augment": {"random_crop": {"size": 32, "padding": 4}, "hflip": 0.5, "rotation": 10},
        }
    )
    stored = params.model_dump(mode="json", exclude_none=True)
    assert stored["augment"] == {
        "random_crop": {"size": 32, "padding": 4},
        "hflip": 0.5,
        "rotation": 10.0,
    }
    assert TrainParams.model_validate(stored) == params


def test_check_augment_refuses_what_would_change_the_models_input_size() -> None:
    assert check_augment(Augment.model_validate({"hflip": 0.5}), 32, 32) is None
    fits = Augment.model_validate({"random_crop": {"size": 32, "padding": 4}})
    assert check_augment(fits, 32, 32) is None
    too_big = Augment.model_validate({"random_crop": {"size": 48, "padding": 4}})
    assert "larger than the padded image [40, 40]" in (check_augment(too_big, 32, 32) or "")
    smaller = Augment.model_validate({"random_resized_crop": {"size": 24}})
    assert "the model takes [32, 32]" in (check_augment(smaller, 32, 32) or "")
    assert math.isclose(RandomResizedCrop(size=4).ratio[1], 4 / 3)
