"""Image datasets: a `.zip` or `.tar` of images in class folders, read as torchvision's ImageFolder.

Classes are the folder names, sorted; each image's label is its folder's index, and samples come
in (class, path) order, as `ImageFolder` lists them. Files deeper in a class folder belong to it
(ImageFolder walks it). An archive whose entries all lie in one folder that holds the class
folders (what `zip -r shapes.zip shapes/` makes) is read from inside that folder. Entries whose
path has a part starting with `.` or named `__MACOSX` are operating-system metadata and skipped;
any other file outside a class folder is named as a problem, like a file that is no image.

On upload (`scan_image_archive`) every image is decoded under the serving limits (formats,
modes, `BNSERVE_MAX_IMAGE_PIXELS` from the header) and every file that fails is named in one 422.
Before any pixel is decoded, the pixels all headers declare are added up and held to the dataset
limit, so a folder of small files that each declare a large image is refused for the lot.

A job (`load_image_samples`) decodes them again and applies the MODEL's pipeline up to its
CenterCrop: uint8 (N, H, W, C) images at the model's input size, what training augmentations
work on; `images_to_tensor` then applies ToTensor and Normalize through the very function that
serving uses (`service.preprocess.image.normalize`), so training and serving see one tensor.

Blocking: call from a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from service.datasets.archives import Archive, ArchiveKind, Member, open_archive
from service.errors import BNServeError, InvalidDataset, PayloadTooLarge, shorten
from service.preprocess.decode import image_header, load_image
from service.preprocess.image import normalize, to_pixels
from service.preprocess.pipeline import ImagePipeline

# Problems listed in a refusal (each file's own), and named in its one-line detail.
_PROBLEMS_LISTED = 100
_PROBLEMS_NAMED = 5
# As models.registry.ClassLabel: a class folder's name becomes a model's label.
MAX_CLASS_NAME = 200


@dataclass(frozen=True)
class ImageLimits:
    """What one image dataset may hold: per image, in all, and how many entries."""

    max_pixels: int  # width x height of one image (BNSERVE_MAX_IMAGE_PIXELS)
    max_bytes: int  # declared file sizes, and decoded pixel bytes, in all (MAX_DATASET_BYTES)
    max_files: int  # entries of the archive, folders included (BNSERVE_MAX_DATASET_FILES)


@dataclass(frozen=True)
class ImageDatasetInfo:
    """What an upload records: the layout, and the one image size if all images share it."""

    kind: ArchiveKind
    classes: list[str]
    labels: npt.NDArray[np.int64]
    image_size: tuple[int, int] | None  # (height, width)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageSamples:
    """A job's samples: uint8 images after convert, Resize and CenterCrop, before ToTensor."""

    images: npt.NDArray[np.uint8]  # (N, H, W, C)
    labels: npt.NDArray[np.int64]  # (N,)
    classes: list[str]


@dataclass(frozen=True)
class _Layout:
    classes: list[str]
    samples: list[tuple[Member, int]]  # in ImageFolder's order
    problems: list[dict[str, Any]]


def scan_image_archive(
    path: Path, filename: str, kind: ArchiveKind, limits: ImageLimits
) -> ImageDatasetInfo:
    """Check an uploaded archive and every image in it; refuse it naming each bad file."""
    with open_archive(
        path, filename, kind, max_bytes=limits.max_bytes, max_members=limits.max_files
    ) as archive:
        layout = _layout(archive, filename)
        problems = list(layout.problems)
        sizes: set[tuple[int, int]] = set()
        declared = 0
        for member, _ in layout.samples:
            try:
                image = image_header(
                    archive.read(member), max_pixels=limits.max_pixels, what=repr(member.name)
                )
                width, height = image.size
                declared += width * height * len(image.getbands())
                if declared > limits.max_bytes:
                    raise _pixels_too_large(filename, limits.max_bytes)
                load_image(image, what=repr(member.name))
                sizes.add((height, width))
            except (InvalidDataset, PayloadTooLarge) as e:
                if e.code == "dataset_too_large":
                    raise
                problems.append(_problem(member.name, e))
            except BNServeError as e:
                problems.append(_problem(member.name, e))
    _refuse_problems(filename, problems)
    labels = np.array([label for _, label in layout.samples], dtype=np.int64)
    _check_count(labels)
    return ImageDatasetInfo(
        kind=kind,
        classes=layout.classes,
        labels=labels,
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,
    )


def load_image_samples(
    path: Path, pipeline: ImagePipeline, limits: ImageLimits, *, kind: ArchiveKind
) -> ImageSamples:
    """The stored archive through the model's pipeline up to CenterCrop, as training takes it."""
    filename = path.name
    with open_archive(
        path, filename, kind, max_bytes=limits.max_bytes, max_members=limits.max_files
    ) as archive:
        layout = _layout(archive, filename)
        _refuse_problems(filename, layout.problems)
        images: list[npt.NDArray[np.uint8]] = []
        for member, _ in layout.samples:
            try:
                image = _decode(archive.read(member), limits, repr(member.name))
                pixels = to_pixels(pipeline, image, max_pixels=limits.max_pixels)
            except BNServeError as e:
                raise InvalidDataset(
                    f"{shorten(member.name)!r} of the dataset could not be read: {e.detail}",
                    code="invalid_dataset",
                    file=shorten(member.name),
                ) from None
            if images and pixels.shape != images[0].shape:
                raise InvalidDataset(
                    f"{shorten(member.name)!r} gives {list(pixels.shape)} (H, W, C) after the "
                    f"model's pipeline but {shorten(layout.samples[0][0].name)!r} gives "
                    f"{list(images[0].shape)}: give the pipeline a center_crop, or resize the "
                    "images to one size",
                    code="image_size_mismatch",
                )
            images.append(pixels)
    labels = np.array([label for _, label in layout.samples], dtype=np.int64)
    _check_count(labels)
    return ImageSamples(images=np.stack(images), labels=labels, classes=layout.classes)


def images_to_tensor(images: npt.NDArray[np.uint8], pipeline: ImagePipeline) -> torch.Tensor:
    """uint8 (N, H, W, C) images to the float32 (N, C, H, W) tensors serving would give them."""
    return normalize(images, pipeline.mean, pipeline.std)


def _decode(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    return load_image(image_header(data, max_pixels=limits.max_pixels, what=what), what=what)


def _layout(archive: Archive, filename: str) -> _Layout:
    members = [m for m in archive.members if not _is_metadata(m.parts)]
    if not members:
        raise InvalidDataset(
            f"{shorten(filename)!r} holds no image files; put the images in one folder per "
            "class (circle/001.png, square/002.png)",
            code="no_images",
        )
    # One folder that holds the class folders: read from inside it.
    tops = {m.parts[0] for m in members}
    nested = any(len(m.parts) >= 3 for m in members)
    if len(tops) == 1 and nested and all(len(m.parts) >= 2 for m in members):
        members = [Member(m.name, m.parts[1:], m.size) for m in members]
    problems = [
        {
            "file": shorten(m.name),
            "code": "not_in_class_folder",
            "detail": f"{shorten(m.name)!r} is not in a class folder",
        }
        for m in members
        if len(m.parts) == 1
    ]
    classes = sorted({m.parts[0] for m in members if len(m.parts) >= 2})
    long = [c for c in classes if len(c) > MAX_CLASS_NAME]
    if long:
        raise InvalidDataset(
            f"class folder {shorten(long[0])!r} has a name of {len(long[0])} characters; class "
            f"names become model labels, at most {MAX_CLASS_NAME} characters",
            code="bad_class_name",
        )
    index = {name: i for i, name in enumerate(classes)}
    in_folders = [m for m in members if len(m.parts) >= 2]
    # ImageFolder's order: `sorted(os.walk(...))` by folder path, then each folder's file names
    # sorted, so a folder's own files come before those of its subfolders.
    in_folders.sort(key=lambda m: (index[m.parts[0]], "/".join(m.parts[:-1]), m.parts[-1]))
    return _Layout(classes, [(m, index[m.parts[0]]) for m in in_folders], problems)


def _is_metadata(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _problem(name: str, error: BNServeError) -> dict[str, Any]:
    return {"file": shorten(name), "code": error.code, "detail": error.detail}


def _refuse_problems(filename: str, problems: list[dict[str, Any]]) -> None:
    if not problems:
        return
    named = "; ".join(p["detail"] for p in problems[:_PROBLEMS_NAMED])
    more = len(problems) - _PROBLEMS_NAMED
    raise InvalidDataset(
        f"{len(problems)} file(s) of {shorten(filename)!r} cannot be used: {named}"
        + (f"; and {more} more (see 'files')" if more > 0 else ""),
        code="invalid_dataset",
        files=problems[:_PROBLEMS_LISTED],
        num_files=len(problems),
    )


def _pixels_too_large(filename: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the images of {shorten(filename)!r} declare more than {max_bytes} bytes of pixels "
        "once decoded; the limit is BNSERVE_MAX_DATASET_BYTES",
        code="dataset_too_large",
        limit_bytes=max_bytes,
    )


def _check_count(labels: npt.NDArray[np.int64]) -> None:
    if labels.shape[0] < 2:
        raise InvalidDataset(
            f"the dataset has {labels.shape[0]} image(s); training needs at least 2 (BatchNorm "
            "cannot normalize a batch of one)",
            code="too_few_samples",
            num_samples=int(labels.shape[0]),
        )
