"""Pictures for the image demo, drawn here: circles, squares and triangles, nothing downloaded.

Each picture is one shape of random size, position and colour on a random plain background. The
shape's colour is kept at least `MIN_CONTRAST` grey levels away from the background's (ITU-R 601
luma, what Pillow's `convert("L")` computes), so every shape stays visible whatever pipeline
mode the model converts to. Shapes are drawn at `SUPERSAMPLE` times the size and scaled down,
which smooths their edges as a photographed or rendered picture would have them; the demo learns
outlines, not pixel staircases.

`python -m service.demo_shapes --out docs/` writes circle.png, square.png and triangle.png: the
bodies of the README's `curl --data-binary @circle.png` example.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
SIZE = 32
SUPERSAMPLE = 4
MIN_CONTRAST = 60

Colour = tuple[int, int, int]


def _luma(colour: Colour) -> float:
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


def _colours(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """A background and a shape colour whose grey levels differ by at least MIN_CONTRAST."""
    while True:
        background, shape = (
            (int(c[0]), int(c[1]), int(c[2])) for c in rng.integers(0, 256, (2, 3))
        )
        if abs(_luma(background) - _luma(shape)) >= MIN_CONTRAST:
            return background, shape


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a square or triangle inscribed in the circle (cx, cy, r), turned by angle."""
    corners = 4 if kind == "square" else 3
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / corners),
         cy + r * math.sin(angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]  # fmt: skip


def draw_shape(kind: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One `size` x `size` RGB picture of `kind`, every choice drawn from `rng`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    background, colour = _colours(rng)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    # Radius of the circle the shape fills or is inscribed in: a quarter to nearly half the side.
    r = rng.uniform(0.25, 0.45) * big
    cx, cy = rng.uniform(r, big - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_outline(kind, cx, cy, r, angle), fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def shapes(n: int, seed: int = 0, size: int = SIZE) -> tuple[list[Image.Image], np.ndarray]:
    """`n` pictures and their class ids (indices into KINDS), the same for the same seed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(KINDS), n)
    return [draw_shape(KINDS[label], rng, size) for label in labels], labels.astype(np.int64)


def write_examples(out: Path, seed: int = 2026, size: int = SIZE) -> list[Path]:
    """One picture of each kind as `<kind>.png` under `out`: bodies for the README's curl."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for kind in KINDS:
        path = out / f"{kind}.png"
        draw_shape(kind, rng, size).save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the pictures")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--size", type=int, default=SIZE, help="side in pixels")
    args = parser.parse_args(argv)
    for path in write_examples(args.out, args.seed, args.size):
        print(path)


if __name__ == "__main__":
    main()
