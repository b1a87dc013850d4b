"""Image datasets through a real server: class folders in a .zip or .tar, refusals that store
nothing, the job checks of the labels, and a job that trains on the model's pipeline and serves."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models import get_architecture
from service.datasets.archives import open_archive, zip_entry_count
from service.datasets.images import ImageLimits, images_to_tensor, load_image_samples
from service.errors import InvalidDataset
from service.preprocess.decode import decode_images
from service.preprocess.pipeline import ImagePipeline
from service.settings import Settings
from tests.conftest import AUTH, ThreadServer
from tests.helpers_api import assert_error, running
from tests.helpers_images import (
    CLASSES,
    SHAPES,
    drawing,
    encoded,
    exif_rotated_jpeg,
    shapes,
    zip_of,
)
from tests.helpers_jobs import WorkerThread, post_job, start_job, upload_dataset, wait_job, weights


def _tar(files: dict[str, bytes], *extra: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buffer.getvalue()


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in shapes().items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("circle/evil.png")
        link.external_attr = 0o120777 << 16  # S_IFLNK: what `zip --symlinks` writes
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says `width` x `height` (correct CRC): a few dozen bytes."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _stored(server: ThreadServer) -> list[str]:
    root = server.settings.dataset_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _assert_nothing_stored(client: httpx.Client, server: ThreadServer) -> None:
    assert client.get("/v1/datasets").json() == []
    assert _stored(server) == []
    uploads = server.settings.upload_dir
    assert not uploads.exists() or list(uploads.iterdir()) == []


def _model(
    client: httpx.Client, name: str, pipeline: dict[str, Any] | None = SHAPES, **config: Any
) -> None:
    body: dict[str, Any] = {"name": name, "architecture": "mnist_cnn", "config": config}
    if pipeline is not None:
        body["preprocess"] = {"image": pipeline}
    r = client.post("/v1/models", json=body, headers=AUTH)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("filename", "pack"),
    [
        ("shapes.zip", lambda: zip_of(shapes())),
        ("shapes.tar", lambda: _tar(shapes())),
        # One folder holding the class folders (zip -r shapes.zip shapes/), and macOS metadata.
        (
            "nested.zip",
            lambda: zip_of({**shapes(prefix="shapes/"), "__MACOSX/shapes/._x.png": b"\0\1"}),
        ),
    ],
)
def test_an_archive_of_class_folders_is_an_image_dataset(
    client: httpx.Client, server: ThreadServer, filename: str, pack: Callable[[], bytes]
) -> None:
    data = pack()
    r = upload_dataset(client, data, filename, name="shapes")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "images"
    assert body["classes"] == CLASSES
    assert body["num_samples"] == 8
    assert body["y_shape"] == [8]
    assert body["y_kind"] == "class"
    assert body["x_shape"] is None
    assert body["image_size"] == [16, 16]
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    suffix = "tar" if filename.endswith(".tar") else "zip"
    assert _stored(server) == [f"{body['sha256']}.{suffix}"]
    assert client.get(f"/v1/datasets/{body['id']}").json() == body


def _corrupt() -> bytes:
    return zip_of(
        {
            **shapes(),
            "circle/cut.png": encoded(drawing("circle", 99))[:40],
            "square/notes.png": b"not an image at all",
            "readme.txt": b"top-level file",
        }
    )


REFUSED = [
    pytest.param(
        "x.zip",
        lambda: zip_of({**shapes(), "../evil.png": b"x"}),
        422,
        "unsafe_archive",
        id="dotdot",
    ),
    pytest.param(
        "x.zip",
        lambda: zip_of({**shapes(), "/etc/evil.png": b"x"}),
        422,
        "unsafe_archive",
        id="abs",
    ),
    pytest.param("x.zip", _zip_symlink, 422, "unsafe_archive", id="zip-symlink"),
    pytest.param(
        "x.tar",
        lambda: _tar(shapes(), _link("circle/evil.png", tarfile.SYMTYPE, "/etc/passwd")),
        422,
        "unsafe_archive",
        id="tar-symlink",
    ),
    pytest.param(
        "x.tar",
        lambda: _tar(shapes(), _link("circle/hard.png", tarfile.LNKTYPE, "square/001.png")),
        422,
        "unsafe_archive",
        id="tar-hardlink",
    ),
    pytest.param(
        "x.tar",
        lambda: _tar(shapes(), _link("circle/dev.png", tarfile.CHRTYPE)),
        422,
        "unsafe_archive",
        id="tar-device",
    ),
    pytest.param(
        "x.zip",
        lambda: zip_of({**shapes(), "square/bomb.png": _bomb_png(50_000, 50_000)}),
        422,
        "invalid_dataset",
        id="bomb",
    ),
    pytest.param("x.zip", _corrupt, 422, "invalid_dataset", id="corrupt-files-named"),
    pytest.param(
        "x.tar.gz", lambda: gzip.compress(_tar(shapes())), 422, "unreadable_dataset", id="tgz"
    ),
    pytest.param("x.zip", lambda: zip_of({}), 422, "no_images", id="empty"),
]


@pytest.mark.parametrize(("filename", "make", "status", "code"), REFUSED)
def test_refused_archives_name_the_problem_and_store_nothing(
    client: httpx.Client,
    server: ThreadServer,
    filename: str,
    make: Callable[[], bytes],
    status: int,
    code: str,
) -> None:
    body = assert_error(upload_dataset(client, make(), filename), status, code)
    if code == "invalid_dataset":
        named = {f["file"]: f["code"] for f in body["files"]}
        assert body["num_files"] == len(named)
        for name in named:
            assert name in body["detail"]
        if "square/bomb.png" in named:
            assert named == {"square/bomb.png": "image_too_large"}
        else:
            assert named == {
                "circle/cut.png": "bad_image",
                "square/notes.png": "bad_image",
                "readme.txt": "not_in_class_folder",
            }
    _assert_nothing_stored(client, server)


def _with_declared_count(data: bytes, count: int) -> bytes:
    """A zip whose end-of-central-directory record declares `count` entries."""
    at = data.rfind(b"PK\x05\x06")
    patch = struct.pack("<HH", count, count)
    return data[: at + 8] + patch + data[at + 12 :]


def _understated_member() -> bytes:
    """A zip whose member declares 10 bytes but inflates to 50 MB (zipfile's `read` would
    inflate all of it before cutting it short)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in shapes().items():
            zf.writestr(name, data)
        zf.writestr("square/big.png", bytes(50 << 20))
    data = bytearray(buffer.getvalue())
    # Patch the declared (uncompressed) size of the last member, in its local header and in the
    # central directory, to 10 bytes.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.rfind(signature)
        data[at + offset : at + offset + 4] = struct.pack("<I", 10)
    return bytes(data)


def test_a_member_that_inflates_past_its_declared_size_is_named_not_inflated(
    client: httpx.Client, server: ThreadServer
) -> None:
    body = assert_error(
        upload_dataset(client, _understated_member(), "x.zip"), 422, "invalid_dataset"
    )
    assert "square/big.png" in {f["file"] for f in body["files"]}
    _assert_nothing_stored(client, server)


def test_zip_entries_are_counted_from_the_directory_and_members_read_within_their_size(
    tmp_path: Path,
) -> None:
    crowded = {f"{k}/{i}.png": encoded(Image.new("L", (2, 2))) for k in CLASSES for i in range(7)}
    lying = tmp_path / "lying.zip"
    lying.write_bytes(_with_declared_count(zip_of(crowded), 1))
    assert zip_entry_count(lying, stop_after=100) == 14, "not the end record's 1"
    assert zip_entry_count(lying, stop_after=5) == 6, "the walk stops past the limit"

    understated = tmp_path / "understated.zip"
    understated.write_bytes(_understated_member())
    with open_archive(understated, "x.zip", "zip", max_bytes=1 << 30, max_members=100) as archive:
        member = next(m for m in archive.members if m.name == "square/big.png")
        tracemalloc.start()
        try:
            with pytest.raises(InvalidDataset):
                archive.read(member)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 << 20, f"inflated {peak} bytes for a member that declares 10"


def test_archives_past_the_limits_are_413_before_any_image_is_read(tmp_path: Path) -> None:
    files = shapes()
    with running(tmp_path / "data", MAX_DATASET_BYTES=4096, MAX_DATASET_FILES=12) as (srv, c):
        # The files declare more bytes than the limit (a tar stores them as they are).
        big = {**files, "circle/big.png": bytes(5000)}
        body = assert_error(upload_dataset(c, _tar(big), "big.tar"), 413, "dataset_too_large")
        assert "BNSERVE_MAX_DATASET_BYTES" in body["detail"]
        # Small files that each declare 40 x 40 pixels: 16 KB decoded in all, past 4096 bytes.
        many = {
            f"{k}/{i}.png": encoded(Image.new("L", (40, 40))) for k in CLASSES for i in range(5)
        }
        assert_error(upload_dataset(c, zip_of(many), "many.zip"), 413, "dataset_too_large")
        crowded = {
            f"{k}/{i}.png": encoded(Image.new("L", (2, 2))) for k in CLASSES for i in range(7)
        }
        body = assert_error(
            upload_dataset(c, zip_of(crowded), "crowded.zip"), 413, "too_many_files"
        )
        assert "BNSERVE_MAX_DATASET_FILES" in body["detail"]
        # The end record's count says 1: zipfile would parse all 14 entries regardless (by the
        # directory's byte size), so the directory's headers are what is counted.
        lying = _with_declared_count(zip_of(crowded), 1)
        with zipfile.ZipFile(io.BytesIO(lying)) as zf:
            assert len(zf.infolist()) == 14
        body = assert_error(upload_dataset(c, lying, "lying.zip"), 413, "too_many_files")
        _assert_nothing_stored(c, srv)
        assert upload_dataset(c, zip_of(files), "ok.zip").status_code == 201


def test_a_job_needs_an_image_pipeline_and_the_datasets_classes(client: httpx.Client) -> None:
    dataset = upload_dataset(client, zip_of(shapes()), "shapes.zip").json()["id"]
    job = {"dataset": dataset, "epochs": 1, "lr": 0.01, "batch_size": 4}
    client.post("/v1/models", json={"name": "vec", "architecture": "mlp_bn"}, headers=AUTH)
    body = assert_error(post_job(client, model="vec", **job), 422, "no_image_pipeline")
    assert "preprocess.image" in body["detail"]
    _model(client, "three", num_classes=3)
    body = assert_error(post_job(client, model="three", **job), 422, "class_count_mismatch")
    assert "2 classes" in body["detail"]
    assert "3 outputs" in body["detail"]
    _model(client, "swapped", num_classes=2, class_labels=["square", "circle"])
    body = assert_error(post_job(client, model="swapped", **job), 422, "labels_mismatch")
    assert "another order" in body["detail"]
    _model(client, "other", num_classes=2, class_labels=["circle", "triangle"])
    body = assert_error(post_job(client, model="other", **job), 422, "labels_mismatch")
    assert "'triangle'" in body["detail"]
    assert "'square'" in body["detail"]
    _model(client, "named", num_classes=2, class_labels=CLASSES)
    assert post_job(client, model="named", **job).status_code == 202


def test_a_job_trains_on_the_models_pipeline_names_the_labels_and_serves_images(
    settings: Settings, server: ThreadServer, client: httpx.Client
) -> None:
    files = shapes(per_class=6)
    uploaded = upload_dataset(client, zip_of(files), "shapes.zip").json()
    dataset = uploaded["id"]
    _model(client, "shapes", num_classes=2)
    assert client.get("/v1/models/shapes").json()["labels"] == ["0", "1"]
    worker = WorkerThread(settings).start()
    try:
        job_id = start_job(
            client,
            model="shapes",
            dataset=dataset,
            epochs=2,
            lr=0.01,
            batch_size=4,
            seed=0,
            promote="always",
        )
        job = wait_job(client, job_id, timeout=120)
    finally:
        worker.stop()
    assert job["status"] == "succeeded", job
    assert len(job["metrics"]) == 2
    assert client.get("/v1/models/shapes").json()["labels"] == CLASSES

    # The training tensors of a file, forwarded by the trained weights, are what predict answers
    # for that file's bytes: training and serving saw one tensor.
    pipeline = ImagePipeline.model_validate(SHAPES)
    stored = server.settings.dataset_dir / f"{uploaded['sha256']}.zip"
    samples = load_image_samples(stored, pipeline, ImageLimits(4096**2, 1 << 30, 1000), kind="zip")
    x = images_to_tensor(samples.images, pipeline)
    arch = get_architecture("mnist_cnn")
    module = arch.build(arch.parse_config({"num_classes": 2}))
    module.load_state_dict(weights(client, "shapes", job["result_version"]))
    module.eval()
    name = "square/002.png"
    index = sorted(files).index(name)
    assert samples.labels[index] == 1
    with torch.no_grad():
        want = module(x[index : index + 1])

    r = client.post(
        "/v1/models/shapes/predict", content=files[name], headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == job["result_version"]
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]), want, rtol=1e-4, atol=1e-4)
    assert r.json()["labels"][0] in CLASSES

    # Now named, the model takes another fresh-weight job on these classes, and none on others.
    others = {n.replace("square/", "triangle/"): d for n, d in files.items()}
    other = upload_dataset(client, zip_of(others), "others.zip").json()
    assert other["classes"] == ["circle", "triangle"]
    job = {"model": "shapes", "epochs": 1, "lr": 0.01, "batch_size": 4}
    assert post_job(client, dataset=dataset, **job).status_code == 202
    assert_error(post_job(client, dataset=other["id"], **job), 422, "labels_mismatch")


@pytest.mark.parametrize(
    "pipeline",
    [
        SHAPES,
        {"mode": "RGB", "resize": 20, "center_crop": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2] * 3},
    ],
)
def test_training_samples_are_the_tensors_predict_makes_of_the_same_files(
    tmp_path: Path, pipeline: dict[str, Any]
) -> None:
    # Other sizes and modes than the model's: the pipeline converts, resizes and crops each.
    files = {
        "circle/a.png": encoded(drawing("circle", 1, size=24, mode="RGB")),
        "circle/b.jpeg": encoded(drawing("circle", 2, size=18), "JPEG"),
        "square/c.png": encoded(drawing("square", 3, size=30, mode="RGBA")),
        "square/d.png": encoded(drawing("square", 4, size=20, mode="RGB").convert("P")),
        "square/e.jpg": exif_rotated_jpeg(drawing("square", 5, size=26, mode="RGB")),
    }
    path = tmp_path / "d.zip"
    path.write_bytes(zip_of(files))
    image = ImagePipeline.model_validate(pipeline)
    samples = load_image_samples(path, image, ImageLimits(4096**2, 1 << 30, 1000), kind="zip")
    assert samples.images.dtype == np.uint8
    assert samples.classes == ["circle", "square"]
    assert samples.labels.tolist() == [0, 0, 1, 1, 1]
    training = images_to_tensor(samples.images, image)
    shape = (image.channels, *samples.images.shape[1:3])
    served = decode_images([files[n] for n in sorted(files)], image, shape, max_pixels=4096**2)
    assert training.dtype == torch.float32
    assert torch.equal(training, served)


def test_a_pipeline_without_a_fixed_size_must_fit_the_images(
    client: httpx.Client, tmp_path: Path
) -> None:
    # No center_crop: 16 x 32 images resize to 28 x 56, which mnist_cnn cannot take.
    wide = {
        f"{k}/{i}.png": encoded(Image.new("L", (32, 16), 40 * i)) for k in CLASSES for i in range(3)
    }
    dataset = upload_dataset(client, zip_of(wide), "wide.zip").json()
    assert dataset["image_size"] == [16, 32]
    _model(client, "short", {"mode": "L", "resize": 28, "mean": [0.5], "std": [0.5]}, num_classes=2)
    job = {"model": "short", "dataset": dataset["id"], "epochs": 1, "lr": 0.01, "batch_size": 2}
    body = assert_error(post_job(client, **job), 422, "shape_mismatch")
    assert "[1, 28, 56]" in body["detail"]
    # Images of several sizes: only the job can tell, and it names the first that differs.
    mixed = tmp_path / "mixed.zip"
    mixed.write_bytes(zip_of({**wide, "square/9.png": encoded(Image.new("L", (16, 16)))}))
    pipeline = ImagePipeline(mode="L", resize=28, mean=[0.5], std=[0.5])
    with pytest.raises(InvalidDataset) as refused:
        load_image_samples(mixed, pipeline, ImageLimits(4096**2, 1 << 30, 1000), kind="zip")
    assert refused.value.code == "image_size_mismatch"
    assert "square/9.png" in refused.value.detail
