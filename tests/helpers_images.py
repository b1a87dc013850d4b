"""Small drawn images and archives of them, for tests of image datasets and image jobs."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# 16 x 16 drawings made 28 x 28 by the pipeline: mnist_cnn's input.
SHAPES = {"mode": "L", "resize": 28, "center_crop": 28, "mean": [0.2], "std": [0.3]}
CLASSES = ["circle", "square"]


def drawing(kind: str, seed: int, size: int = 16, mode: str = "L") -> Image.Image:
    """A white circle or square of random size and place on black."""
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (size, size))
    side = int(rng.integers(size // 3, size - 2))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    draw = ImageDraw.Draw(image)
    fill = "white" if mode != "L" else 255
    (draw.ellipse if kind == "circle" else draw.rectangle)((x, y, x + side, y + side), fill=fill)
    return image


def encoded(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """A JPEG of `image` whose EXIF says "rotate 90 degrees clockwise to display" (orientation
    6), as a phone writes it: bnserve, like torchvision's loaders, does not apply it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image.convert("RGB"), "JPEG", exif=exif.tobytes())


def shapes(per_class: int = 4, prefix: str = "") -> dict[str, bytes]:
    """circle/*.png and square/*.jpg (a JPEG per class too), `per_class` of each."""
    files = {}
    for c, kind in enumerate(CLASSES):
        for i in range(per_class):
            fmt = "JPEG" if i == 0 else "PNG"
            name = f"{prefix}{kind}/{i:03d}.{fmt.lower()}"
            files[name] = encoded(drawing(kind, seed=10 * c + i), fmt)
    return files


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()
