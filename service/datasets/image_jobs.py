"""What a job on an image dataset needs of its model, checked at `POST /v1/jobs` from the rows.

The images become tensors through the model's own pipeline, so a model without one cannot take
them. The class folders are the labels: a classifier needs one output per class, and a model
that names its classes must name these, in this order (a model trained on `["cat", "dog"]` that
answers "dog" for output 0 would be wrong with no error). A model without names takes the
dataset's when a job trains it from fresh weights (`labels_to_record`), so its predictions say
`circle` rather than `0`.
"""

from __future__ import annotations

import math
from typing import Any

from service.errors import InvalidDataset, PayloadTooLarge
from service.preprocess.pipeline import ImagePipeline, Preprocess, pair


def check_image_job(
    *,
    model_name: str,
    job_kind: str,
    classes: list[str],
    image_size: list[int] | None,
    num_samples: int,
    preprocess: dict[str, Any] | None,
    input_shape: tuple[int, ...],
    task: str,
    num_outputs: int,
    class_labels: list[str] | None,
    max_bytes: int,
) -> None:
    """Refuse (422, or 413 for the size) a job whose model cannot train on these images."""
    if not preprocess:
        raise InvalidDataset(
            f"model {model_name!r} has no image pipeline, so it cannot take an image dataset: "
            "create the model with preprocess.image (mode, resize, center_crop, mean, std), "
            "which turns the images into its input tensors here as when it serves",
            code="no_image_pipeline",
        )
    pipeline = Preprocess.model_validate(preprocess).image
    shape = _output_shape(pipeline, image_size)
    if shape is not None and shape != tuple(input_shape):
        raise InvalidDataset(
            f"the images ({image_size[0] if image_size else '?'} x "
            f"{image_size[1] if image_size else '?'}) give {list(shape)} after the model's "
            f"pipeline but the architecture takes {list(input_shape)}; give the pipeline a "
            "center_crop, or resize the images",
            code="shape_mismatch",
            expected=list(input_shape),
            found=list(shape),
        )
    pixels = num_samples * math.prod(input_shape)
    if pixels > max_bytes:
        raise PayloadTooLarge(
            f"{num_samples} images at the model's input size {list(input_shape)} are {pixels} "
            f"bytes of pixels; the limit is {max_bytes} (BNSERVE_MAX_DATASET_BYTES)",
            code="dataset_too_large",
            limit_bytes=max_bytes,
            declared_bytes=pixels,
        )
    if job_kind != "train":
        return  # recalibration uses the images only, not their labels
    if task != "classification":
        raise InvalidDataset(
            f"an image dataset's labels are its class folders; model {model_name!r} is a "
            f"{task} model, which needs float targets (an .npz or .safetensors dataset)",
            code="bad_targets",
        )
    if len(classes) != num_outputs:
        raise InvalidDataset(
            f"the dataset has {len(classes)} classes ({_names(classes)}) but model "
            f"{model_name!r} has {num_outputs} outputs; create it with num_classes "
            f"{len(classes)}",
            code="class_count_mismatch",
            expected=num_outputs,
            found=len(classes),
        )
    if class_labels is not None and list(class_labels) != list(classes):
        raise InvalidDataset(
            f"model {model_name!r} has labels {_names(class_labels)} but the dataset's classes "
            f"are {_names(classes)}: {_difference(class_labels, classes)}",
            code="labels_mismatch",
            model_labels=list(class_labels),
            dataset_classes=list(classes),
        )


def labels_to_record(
    config: dict[str, Any], classes: list[str] | None, *, fresh: bool, job_kind: str
) -> list[str] | None:
    """The class names a finished job gives its model: fresh weights, and no names of its own."""
    if job_kind != "train" or not fresh or classes is None:
        return None
    if "class_labels" not in config or config["class_labels"] is not None:
        return None
    return list(classes)


def _output_shape(
    pipeline: ImagePipeline, image_size: list[int] | None
) -> tuple[int, int, int] | None:
    """(C, H, W) the pipeline gives these images, or None when that depends on each image."""
    fixed = pipeline.output_shape()
    if fixed is not None:
        return fixed
    if image_size is None:
        return None
    height, width = image_size
    if isinstance(pipeline.resize, int):  # as service.preprocess.image.resize computes it
        size = pipeline.resize
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            height, width = size, int(size * width / height)
    if pipeline.center_crop is not None:
        height, width = pair(pipeline.center_crop)
    return (pipeline.channels, height, width)


def _names(names: list[str], shown: int = 10) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return f"[{listed}{', ...' if len(names) > shown else ''}]"


def _difference(model: list[str], dataset: list[str]) -> str:
    only_model = [n for n in model if n not in dataset]
    only_dataset = [n for n in dataset if n not in model]
    if not only_model and not only_dataset:
        return (
            "the same names in another order (label i is the i-th class folder in sorted "
            "order); create the model with class_labels in that order"
        )
    parts = []
    if only_model:
        parts.append(f"only the model has {_names(only_model)}")
    if only_dataset:
        parts.append(f"only the dataset has {_names(only_dataset)}")
    return "; ".join(parts)
