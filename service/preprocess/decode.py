"""Untrusted image bytes to a PIL image, refused cheaply when they cannot or should not be decoded.

Everything here runs off the event loop. The header is read first and the pixels only after the
checks: a 20 KB PNG can declare 50,000 x 50,000 pixels (10 GB decoded), so the size is checked
against `BNSERVE_MAX_IMAGE_PIXELS` before any decoding. Only PNG, JPEG and WebP are opened (Pillow
is told so, so no other decoder parses the bytes); one frame only; 8-bit modes only. Palette, CMYK,
grey-with-alpha and RGBA images are converted to the model's mode by the pipeline's `convert`, as
torchvision's loaders do (alpha is dropped, not composited); 16-bit and float images are refused,
since `convert` would clip them silently.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.preprocess.image import ResizeTooLarge, to_tensor
from service.preprocess.pipeline import ImagePipeline

FORMATS = ("PNG", "JPEG", "WEBP")
MEDIA_TYPES = {"image/png", "image/jpeg", "image/webp"}
# Formats Pillow could read but bnserve does not take, by their first bytes, to name them.
_OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB"}


def open_image(data: bytes, *, max_pixels: int, what: str = "the image") -> Image.Image:
    """The decoded image; 415, 413 or 422 with a code that names the problem."""
    return load_image(image_header(data, max_pixels=max_pixels, what=what), what=what)


def image_header(data: bytes, *, max_pixels: int, what: str = "the image") -> Image.Image:
    """The image with its header checked and no pixels decoded yet (`load_image` decodes them).

    Apart so that a dataset can add up what its images declare before it decodes any of them.
    """
    for magic, name in _OTHER_FORMATS.items():
        if data.startswith(magic):
            raise UnsupportedMediaType(
                f"{what} is {name}; send PNG, JPEG or WebP", code="unsupported_image_format"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(what, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInput(
            f"{what} is not a readable PNG, JPEG or WebP image", code="bad_image"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(what, (width, height), max_pixels)
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1:
        raise InvalidInput(
            f"{what} is animated ({frames} frames); send a single frame",
            code="animated_image",
        )
    if image.mode not in _EIGHT_BIT_MODES:
        raise InvalidInput(
            f"{what} has mode {image.mode} (16-bit or floating point); convert it to 8 bits per "
            "channel",
            code="unsupported_image_mode",
        )
    return image


def load_image(image: Image.Image, *, what: str = "the image") -> Image.Image:
    """Decode the pixels of an image `image_header` checked; 422 when they are truncated."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            f"{what} is truncated or corrupt ({str(exc)[:120]})", code="bad_image"
        ) from None
    return image


def _too_large(what: str, size: tuple[int, int] | None, max_pixels: int) -> PayloadTooLarge:
    declared = f"{size[0]} x {size[1]} pixels" if size else "more pixels than Pillow allows"
    return PayloadTooLarge(
        f"{what} declares {declared}, over the limit of {max_pixels} "
        "(BNSERVE_MAX_IMAGE_PIXELS); resize it before sending",
        code="image_too_large",
    )


def image_parts(body: bytes, content_type: str, limit: int) -> list[bytes]:
    """The parts of a `multipart/form-data` body, in order: one image each (a batch)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInput(
            "multipart body without a boundary in its Content-Type", code="invalid_multipart"
        )
    parts: list[bytes] = []
    current: list[bytes] = []

    def on_part_begin() -> None:
        current.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.append(data[start:end])

    def on_part_end() -> None:
        parts.append(b"".join(current))
        if len(parts) > limit:
            raise InvalidInput(
                f"more than {limit} images in one request (BNSERVE_MAX_REQUEST_BATCH)",
                code="batch_too_large",
            )

    parser = MultipartParser(
        boundary,
        {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end},
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput(f"malformed multipart body ({exc})", code="invalid_multipart") from None
    if not parts:
        raise InvalidInput("the multipart body has no image part", code="invalid_multipart")
    return parts


def decode_images(
    blobs: list[bytes],
    pipeline: ImagePipeline,
    input_shape: tuple[int, ...],
    *,
    max_pixels: int,
) -> torch.Tensor:
    """The batch of pipeline outputs for encoded images (blocking: call from a thread)."""
    samples = []
    for i, blob in enumerate(blobs):
        what = "the image" if len(blobs) == 1 else f"image {i}"
        image = open_image(blob, max_pixels=max_pixels, what=what)
        try:
            sample = to_tensor(pipeline, image, max_pixels=max_pixels)
        except ResizeTooLarge as exc:
            raise PayloadTooLarge(f"{what}: {exc.detail}", code="image_too_large") from None
        if tuple(sample.shape) != tuple(input_shape):
            raise InvalidInput(
                f"{what} gives {list(sample.shape)} after the model's pipeline but the "
                f"architecture takes {list(input_shape)}; send images of that size (the pipeline "
                "has no resize and center_crop that fix it)",
                code="invalid_input_shape",
                expected_shape=list(input_shape),
            )
        samples.append(sample)
    return torch.stack(samples)
