"""The first-start demos (`service/demo.py`): created on a registry's first start only; the
image demo's drawings (`service/demo_shapes.py`) and its training, through a real server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from service.demo import SHAPES_MODEL, SHAPES_PIPELINE, seed_shapes
from service.demo_shapes import KINDS, draw_shape, shapes, write_examples
from tests.conftest import AUTH
from tests.helpers_api import running
from tests.helpers_jobs import WorkerThread, serving_version, wait_job, wait_until


def test_deleted_demo_stays_deleted_after_a_restart(tmp_path: Path) -> None:
    """Seeded on the first start; once deleted, an empty registry does not bring it back."""
    data_dir = tmp_path / "data"
    with running(data_dir, DEMO=True) as (_, client):
        assert [m["name"] for m in client.get("/v1/models").json()] == ["demo", "shapes"]
        for name in ("demo", "shapes"):
            assert client.delete(f"/v1/models/{name}", headers=AUTH).status_code == 204
    with running(data_dir, DEMO=True) as (_, client):
        assert client.get("/v1/models").json() == []
    # A fresh data dir still gets its demos.
    with running(tmp_path / "other", DEMO=True) as (_, client):
        assert [m["name"] for m in client.get("/v1/models").json()] == ["demo", "shapes"]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def test_drawings_are_reproducible_per_seed_and_each_kind_differs(tmp_path: Path) -> None:
    images, labels = shapes(12, seed=5)
    again, labels_again = shapes(12, seed=5)
    assert [_pixels(i).tobytes() for i in images] == [_pixels(i).tobytes() for i in again]
    assert labels.tolist() == labels_again.tolist()
    other, _ = shapes(12, seed=6)
    assert _pixels(images[0]).tobytes() != _pixels(other[0]).tobytes()
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in images)
    # The same random choices (colours, size, place, turn) drawn as each kind: three pictures.
    kinds = [_pixels(draw_shape(kind, np.random.default_rng(1))) for kind in KINDS]
    assert len({k.tobytes() for k in kinds}) == 3
    # The README's example pictures: one PNG per kind, the same on every run.
    paths = write_examples(tmp_path)
    assert [p.name for p in paths] == ["circle.png", "square.png", "triangle.png"]
    assert [_pixels(Image.open(p)).tobytes() for p in paths] == [
        _pixels(Image.open(p)).tobytes() for p in write_examples(tmp_path / "again")
    ]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_shapes_demo_trains_and_names_held_out_drawings_sent_as_png(tmp_path: Path) -> None:
    """The demo's own seeding, smaller: its model learns shapes from its pipeline's tensors."""
    with running(tmp_path / "data") as (srv, client):
        s = srv.app_services
        assert seed_shapes(
            s.settings, s.registry, s.datasets, s.jobs, s.owner, samples=3000, epochs=6
        )
        model = client.get(f"/v1/models/{SHAPES_MODEL}").json()
        assert model["preprocess"] == {"image": SHAPES_PIPELINE.model_dump(mode="json")}
        assert model["labels"] == list(KINDS)
        [job] = client.get("/v1/jobs").json()
        worker = WorkerThread(srv.settings).start()
        try:
            assert wait_job(client, job["id"], timeout=150)["status"] == "succeeded"
        finally:
            worker.stop()
        wait_until(lambda: serving_version(client, SHAPES_MODEL), 10, "the trained version")
        images, labels = shapes(40, seed=1234)  # seed 0 drew the training set
        answers = []
        for image in images:
            r = client.post(
                f"/v1/models/{SHAPES_MODEL}/predict",
                content=_png(image),
                headers={"Content-Type": "image/png"},
            )
            assert r.status_code == 200, r.text
            answers.append(r.json()["labels"][0])
        right = sum(a == KINDS[y] for a, y in zip(answers, labels, strict=True))
        assert right >= 0.8 * len(images), (right, answers)
