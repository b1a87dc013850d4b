"""The demos that need nothing from outside: small models trained on data generated here.

On first start with an empty registry (and `BNSERVE_DEMO=true`, the default) the server creates
two models, each with a generated dataset and a training job that promotes its result:

- `demo` (`mlp_bn`): a 2-D point is class `inner` or `outer` of two concentric rings;
- `shapes` (`mnist_cnn`, with an image pipeline): a picture is a `circle`, `square` or
  `triangle`, drawn by `service.demo_shapes`. Its dataset holds the tensors the model's own
  pipeline (`service.preprocess.image.to_tensor`) makes of the drawings, the code that serving
  runs on every image body, so training and serving see identical tensors.

A worker (the server starts one by default) trains `demo` in seconds and `shapes` in well under a
minute on two cores; then `POST /v1/models/<name>/predict` answers (an image body for `shapes`).

Only the first start: the file `<data dir>/demo-seeded` records that the choice was made, so a
demo the operator deleted stays deleted (an empty registry alone once brought it back on every
start). A registry from before the marker counts as started if it holds any model or dataset.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
import torch

from service.datasets.store import DatasetStore
from service.db.tables import DatasetRow
from service.demo_shapes import KINDS, shapes
from service.errors import Conflict
from service.files import Owner
from service.jobs import JobQueue
from service.preprocess.image import to_tensor
from service.preprocess.pipeline import ImagePipeline, Preprocess
from service.registry import Registry
from service.settings import Settings

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
SHAPES_MODEL = "shapes"
MARKER = "demo-seeded"
# The client sends the drawings as they are (32x32 RGB PNGs); the pipeline turns them into the
# 1x28x28 grey tensors `mnist_cnn` takes. Outlines, not colours, tell the shapes apart, and the
# drawings keep every shape's grey level away from its background's (`demo_shapes.MIN_CONTRAST`).
SHAPES_PIPELINE = ImagePipeline(mode="L", resize=28, mean=[0.5], std=[0.25])
# 4000 drawings (800 of them the validation split) and 8 epochs: 96% right on held-out drawings,
# 29-100 s of training on 2 cores that other work kept busy, 1.35 s an epoch on nearly free ones.
SHAPES_SAMPLES = 4000
SHAPES_EPOCHS = 8


def rings(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy concentric rings: not linearly separable, easy for a small BN MLP."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    angle = rng.uniform(0, 2 * math.pi, n)
    radius = np.where(y == 0, 1.0, 2.5) + rng.normal(0, 0.25, n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def seed_demo(
    settings: Settings, registry: Registry, datasets: DatasetStore, jobs: JobQueue, owner: Owner
) -> bool:
    """Create the demo on the first start of an empty registry; returns whether it did."""
    marker = settings.DATA_DIR / MARKER
    if marker.exists():
        return False
    seeded = False
    if not registry.list_models() and not datasets.all():
        seeded = _create(settings, registry, datasets, jobs, owner)
        seeded = seed_shapes(settings, registry, datasets, jobs, owner) or seeded
    # Written whether or not this start seeded: from now on the registry has had its first start.
    marker.touch()
    return seeded


def _create(
    settings: Settings, registry: Registry, datasets: DatasetStore, jobs: JobQueue, owner: Owner
) -> bool:
    try:
        model = registry.create_model(
            DEMO_MODEL,
            "mlp_bn",
            {"in_features": 2, "out_features": 2, "class_labels": ["inner", "outer"]},
        )
    except Conflict:  # another replica got there first
        return False
    x, y = rings()
    dataset = _store(settings, datasets, owner, "demo-rings", x, y)
    params = {"epochs": 20, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"}
    _queue(jobs, model.id, model.name, dataset, params)
    return True


def shapes_dataset(pipeline: ImagePipeline, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` drawings as the (N, C, H, W) float32 tensors `pipeline` makes of them, and their ids."""
    images, labels = shapes(n, seed)
    x = torch.stack([to_tensor(pipeline, image) for image in images])
    return x.numpy(), labels


def seed_shapes(
    settings: Settings,
    registry: Registry,
    datasets: DatasetStore,
    jobs: JobQueue,
    owner: Owner,
    *,
    samples: int = SHAPES_SAMPLES,
    epochs: int = SHAPES_EPOCHS,
) -> bool:
    """Create model `shapes`, its dataset of drawings and its training job; False if it exists.

    `samples` and `epochs` are there so a test can train a smaller one through this same code.
    """
    try:
        model = registry.create_model(
            SHAPES_MODEL,
            "mnist_cnn",
            {"num_classes": len(KINDS), "class_labels": list(KINDS)},
            preprocess=Preprocess(image=SHAPES_PIPELINE),
        )
    except Conflict:  # another replica got there first
        return False
    x, y = shapes_dataset(SHAPES_PIPELINE, samples)
    dataset = _store(settings, datasets, owner, "demo-shapes", x, y)
    params = {
        "epochs": epochs,
        "batch_size": 64,
        "lr": 0.003,
        "optimizer": "adam",
        "lr_schedule": {"kind": "cosine"},
    }
    _queue(jobs, model.id, model.name, dataset, params)
    return True


def _store(
    settings: Settings,
    datasets: DatasetStore,
    owner: Owner,
    name: str,
    x: np.ndarray,
    y: np.ndarray,
) -> DatasetRow:
    """Keep `x`, `y` as an `.npz` dataset, as an upload of that file would be kept."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    path = owner.temp_path(settings.upload_dir)
    path.write_bytes(buffer.getvalue())
    try:
        return datasets.add(path, f"{name}.npz", name)
    finally:
        path.unlink(missing_ok=True)


def _queue(
    jobs: JobQueue, model_id: str, model_name: str, dataset: DatasetRow, params: dict[str, Any]
) -> None:
    """A training job from fresh weights whose result serves whatever its score."""
    jobs.create(
        kind="train",
        model_id=model_id,
        model_name=model_name,
        dataset_id=dataset.id,
        base_version=None,
        promote="always",
        params={**params, "val_fraction": 0.2, "seed": 0},
    )
    log.info("created demo model %r and queued its training job", model_name)
