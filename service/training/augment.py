"""Training-time augmentation: torchvision's random transforms, on a uint8 image, with Pillow.

Each transform is the torchvision transform of the same name applied to a PIL image (the path a
torchvision dataset of PIL images takes): the same parameter draws (`*_params`, torchvision's
`get_params`), the same Pillow calls (`F_pil.*`). torchvision itself is not used: its wheel for
torch 2.13 needs the CUDA build of torch (see `service/preprocess/image.py`).

Randomness comes from a `numpy.random.Generator` the caller passes in, never a global stream, so
one sample's augmentation depends only on its generator's seed (`loader.sample_rng`), not on
which thread built it or in what order. The draws follow torchvision's, one generator call where
torchvision makes one torch call: RandomCrop draws the top then the left offset; RandomResizedCrop
up to 10 (area scale, log-ratio) pairs, then the offsets; each flip and RandomGrayscale one
uniform against p; RandomRotation one angle; ColorJitter a permutation of its four adjustments,
then a factor for each one that is on. The transforms run in `Augment`'s order: random_crop,
random_resized_crop, hflip, vflip, rotation, color_jitter, random_grayscale.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from service.training.options import Augment, ColorJitter, RandomCrop, RandomResizedCrop, size_pair

# (top, left, height, width), as torchvision's crop parameters.
Box = tuple[int, int, int, int]
# ColorJitter's adjustments, numbered as torchvision's `fn_idx`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def augment_image(image: np.ndarray, options: Augment, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 H x W x C, C 1 or 3) through the options' transforms, in their order.

    The output has the input's size and channels, except that random_crop and
    random_resized_crop give their `size`. `image` is not changed.
    """
    img = to_pil(image)
    if options.random_crop is not None:
        img = pad(img, options.random_crop)
        img = crop(img, random_crop_params(img.height, img.width, options.random_crop, rng))
    if options.random_resized_crop is not None:
        box = random_resized_crop_params(img.height, img.width, options.random_resized_crop, rng)
        img = resized_crop(img, box, size_pair(options.random_resized_crop.size))
    if options.hflip is not None and rng.random() < options.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if options.vflip is not None and rng.random() < options.vflip:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    degrees = options.degrees()
    if degrees is not None:
        img = rotate(img, float(rng.uniform(degrees[0], degrees[1])))
    if options.color_jitter is not None:
        order, factors = color_jitter_params(options.color_jitter, rng)
        img = color_jitter(img, order, factors)
    if options.random_grayscale is not None and rng.random() < options.random_grayscale:
        img = grayscale(img)
    return from_pil(img)


def to_pil(image: np.ndarray) -> Image.Image:
    """An `L` (C = 1) or `RGB` (C = 3) PIL image of a uint8 H x W x C array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"augmentation takes uint8 images of H x W x 1 or 3; got {image.dtype} "
            f"{list(image.shape)}"
        )
    if image.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(image[:, :, 0]))
    return Image.fromarray(np.ascontiguousarray(image))


def from_pil(img: Image.Image) -> np.ndarray:
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def pad(img: Image.Image, options: RandomCrop) -> Image.Image:
    """RandomCrop's padding: torchvision `F.pad(fill=0, padding_mode="constant")`."""
    borders = options.borders()
    return ImageOps.expand(img, border=borders, fill=0) if any(borders) else img


def random_crop_params(
    height: int, width: int, options: RandomCrop, rng: np.random.Generator
) -> Box:
    """torchvision `RandomCrop.get_params` on the padded image."""
    crop_h, crop_w = size_pair(options.size)
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"random_crop.size [{crop_h}, {crop_w}] is larger than the padded image "
            f"[{height}, {width}]"
        )
    if (crop_h, crop_w) == (height, width):
        return 0, 0, height, width
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


def crop(img: Image.Image, box: Box) -> Image.Image:
    top, left, height, width = box
    return img.crop((left, top, left + width, top + height))


def random_resized_crop_params(
    height: int, width: int, options: RandomResizedCrop, rng: np.random.Generator
) -> Box:
    """torchvision `RandomResizedCrop.get_params`: 10 tries, then the central-crop fallback."""
    area = height * width
    ratio = options.ratio
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(options.scale[0], options.scale[1]))
        aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: a central crop of the whole image, clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """torchvision `F.resized_crop(..., BILINEAR)` on a PIL image: crop, then resize."""
    out_h, out_w = size
    return crop(img, box).resize((out_w, out_h), Image.Resampling.BILINEAR)


def rotate(img: Image.Image, angle: float) -> Image.Image:
    """torchvision `F.rotate(angle, NEAREST, expand=False, center=None, fill=0)`: degrees
    counter-clockwise about the centre."""
    fill = 0 if img.mode == "L" else (0,) * len(img.getbands())
    return img.rotate(angle, Image.Resampling.NEAREST, expand=False, fillcolor=fill)


def _factor_range(x: float) -> tuple[float, float] | None:
    # torchvision's ColorJitter._check_input for brightness/contrast/saturation: 0 is "off".
    return None if x == 0 else (max(0.0, 1 - x), 1 + x)


def color_jitter_params(
    options: ColorJitter, rng: np.random.Generator
) -> tuple[list[int], dict[int, float]]:
    """torchvision `ColorJitter.get_params`: the order of the four, and a factor per one on."""
    order = [int(i) for i in rng.permutation(4)]
    factors: dict[int, float] = {}
    for index, x in (
        (BRIGHTNESS, options.brightness),
        (CONTRAST, options.contrast),
        (SATURATION, options.saturation),
    ):
        bounds = _factor_range(x)
        if bounds is not None:
            factors[index] = float(rng.uniform(bounds[0], bounds[1]))
    if options.hue != 0:
        factors[HUE] = float(rng.uniform(-options.hue, options.hue))
    return order, factors


def color_jitter(img: Image.Image, order: list[int], factors: dict[int, float]) -> Image.Image:
    """torchvision `ColorJitter.forward`: the adjustments that are on, in the drawn order."""
    for index in order:
        if index not in factors:
            continue
        factor = factors[index]
        if index == BRIGHTNESS:
            img = ImageEnhance.Brightness(img).enhance(factor)  # blend with black
        elif index == CONTRAST:
            img = ImageEnhance.Contrast(img).enhance(factor)  # with the gray image's mean
        elif index == SATURATION:
            img = ImageEnhance.Color(img).enhance(factor)  # with the gray image
        else:
            img = adjust_hue(img, factor)
    return img


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision `F_pil.adjust_hue`: shift the H of HSV by hue_factor of a turn, mod 256.

    torchvision adds `np.uint8(hue_factor * 255)` in uint8: the shift wraps around the circle.
    For a negative factor that cast wrapped on numpy 1 and raises OverflowError on numpy 2, so
    the shift is computed as numpy 1 did: truncated toward zero, then modulo 256. Gray images
    have no hue and come back unchanged.
    """
    if img.mode == "L":
        return img
    h, s, v = img.convert("HSV").split()
    shift = int(hue_factor * 255) % 256
    np_h = (np.asarray(h, dtype=np.uint8).astype(np.int16) + shift) % 256
    hue = Image.fromarray(np_h.astype(np.uint8))
    return Image.merge("HSV", (hue, s, v)).convert(img.mode)


def grayscale(img: Image.Image) -> Image.Image:
    """torchvision `RandomGrayscale`'s `F.rgb_to_grayscale`, keeping the channel count: PIL's
    `convert("L")` (ITU-R 601-2 luma), repeated into three channels for RGB."""
    if img.mode == "L":
        return img
    gray = img.convert("L")
    return Image.merge("RGB", (gray, gray, gray))
