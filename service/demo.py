"""The demo that needs nothing from outside: a small model trained on generated data.

On first start with an empty registry (and `BNSERVE_DEMO=true`, the default) the server creates
model `demo` (`mlp_bn`, 2-D points -> class `inner` or `outer`), a generated dataset of two
concentric rings, and a training job that promotes its result. A worker (the server starts one
by default) trains it in seconds; then `POST /v1/models/demo/predict` answers.

Only the first start: the file `<data dir>/demo-seeded` records that the choice was made, so a
demo the operator deleted stays deleted (an empty registry alone once brought it back on every
start). A registry from before the marker counts as started if it holds any model or dataset.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np

from service.datasets.store import DatasetStore
from service.errors import Conflict
from service.files import Owner
from service.jobs import JobQueue
from service.registry import Registry
from service.settings import Settings

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
MARKER = "demo-seeded"


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
    seeded = (
        not registry.list_models()
        and not datasets.all()
        and _create(settings, registry, datasets, jobs, owner)
    )
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
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    settings.upload_dir.mkdir(parents=True, exist_ok=True)
    path = owner.temp_path(settings.upload_dir)
    path.write_bytes(buffer.getvalue())
    try:
        dataset = datasets.add(path, "demo-rings.npz", "demo-rings")
    finally:
        path.unlink(missing_ok=True)
    jobs.create(
        kind="train",
        model_id=model.id,
        model_name=model.name,
        dataset_id=dataset.id,
        base_version=None,
        promote="always",
        params={
            "epochs": 20,
            "batch_size": 32,
            "lr": 0.05,
            "optimizer": "sgd",
            "val_fraction": 0.2,
            "seed": 0,
        },
    )
    log.info("created demo model %r and queued its training job", DEMO_MODEL)
    return True
