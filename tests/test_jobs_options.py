"""The training options of issue 16 end to end: HTTP job in, real worker process, version out.

One `python -m service` with one worker serves the module, each test on its own model; one
PyTorch thread in the worker, so two jobs of the same run do the same arithmetic. Every test
would fail without its option: the kept epoch's weights are another job's last epoch, early
stopping ends the run before its epochs, frozen BN stats stay bit-identical while trained ones
move, precise_bn stats equal PyTorch's own average over the same batches, and dropout in a served
model leaves repeated predictions identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from models import get_architecture
from service.datasets.images import ImageLimits, images_to_tensor, load_image_samples
from service.preprocess.pipeline import ImagePipeline
from service.training.loader import TrainingImages
from service.training.trainer import TrainParams, precise_bn_rows, split_dataset, train
from tests.conftest import AUTH, ServerProcess, create_model
from tests.helpers_api import assert_error
from tests.helpers_images import SHAPES, shapes, zip_of
from tests.helpers_jobs import (
    FAST_WORKER_ENV,
    blobs,
    dataset_id,
    post_job,
    start_job,
    upload_dataset,
    versions,
    wait_job,
    weights,
)
from tests.test_training_options import bn_stats, direct_bn_stats, recalibration_batches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("options") / "data"
    env = {"BNSERVE_WORKERS": "1", "BNSERVE_WORKER_THREADS": "1", **FAST_WORKER_ENV}
    proc = ServerProcess(data_dir, env).start()
    yield proc
    proc.stop()


@pytest.fixture
def c(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _run(c: httpx.Client, **body: Any) -> dict[str, Any]:
    job = wait_job(c, start_job(c, **body), timeout=120)
    assert job["status"] == "succeeded", job
    return job


def _version(c: httpx.Client, model: str, number: int) -> dict[str, Any]:
    row = next(v for v in versions(c, model) if v["version"] == number)
    return row


def _accuracy(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray) -> float:
    arch = get_architecture("mlp_bn")
    model = arch.build(arch.parse_config({}))
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((predictions == y).mean())


def test_keep_best_publishes_the_best_epoch_and_if_better_judges_it(c):
    create_model(c, "kept", "mlp_bn")
    x, y = blobs(300, seed=5, spread=1.2)
    data = dataset_id(c, x, y, "kept")
    # These noisy blobs peak in validation accuracy before the last of 6 epochs.
    run = {"model": "kept", "dataset": data, "batch_size": 8, "lr": 0.05, "seed": 1}
    best = _run(c, **run, epochs=6, promote="always")
    metrics = best["metrics"]
    ranked = max(metrics, key=lambda m: (m["val_accuracy"], -m["val_loss"], -m["epoch"]))
    assert best["kept_epoch"] == ranked["epoch"] < 6, metrics
    assert best["stop_reason"] == "completed"
    lineage = _version(c, "kept", best["result_version"])["lineage"]
    assert lineage["metrics"]["kept_epoch"] == ranked["epoch"]
    assert lineage["metrics"]["val_accuracy"] == ranked["val_accuracy"]
    assert lineage["metrics"]["val_loss"] == ranked["val_loss"]

    # The same run stopped at the kept epoch, keeping its last: the very same bytes.
    short = _run(c, **run, epochs=ranked["epoch"], keep="last", promote="never")
    assert short["kept_epoch"] == ranked["epoch"]
    ours = _version(c, "kept", best["result_version"])["sha256"]
    assert _version(c, "kept", short["result_version"])["sha256"] == ours
    # keep=last publishes the 6th epoch: other weights.
    last = _run(c, **run, epochs=6, keep="last", promote="never")
    assert last["kept_epoch"] == 6
    assert _version(c, "kept", last["result_version"])["sha256"] != ours

    # if_better compares the kept epoch with the serving one (the best job's own weights):
    # equal metrics on the same split, so a rerun of it promotes (ties promote).
    again = _run(c, **run, epochs=6, promote="if_better")
    compared = _version(c, "kept", again["result_version"])["lineage"]["compared_with"]
    assert compared["val_accuracy"] == ranked["val_accuracy"]
    assert again["promoted"] is True


def test_early_stopping_and_a_schedule_through_a_worker(c):
    create_model(c, "early", "mlp_bn")
    x, y = blobs(200, seed=6)
    data = dataset_id(c, x, y, "early")
    schedule = {"kind": "step", "warmup_epochs": 1, "step_size": 1, "gamma": 0.5}
    # min_delta far above any improvement: no epoch after the first counts as one.
    job = _run(
        c,
        model="early",
        dataset=data,
        epochs=20,
        batch_size=16,
        lr=0.08,
        seed=2,
        promote="never",
        lr_schedule=schedule,
        early_stopping={"patience": 2, "min_delta": 5.0},
    )
    assert job["stop_reason"] == "early_stopping"
    assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3]
    assert [m["lr"] for m in job["metrics"]] == pytest.approx([0.04, 0.08, 0.04])
    assert job["params"]["lr_schedule"] == {"kind": "step", **{k: schedule[k] for k in schedule}}
    assert job["params"]["early_stopping"] == {"patience": 2, "min_delta": 5.0}
    lineage = _version(c, "early", job["result_version"])["lineage"]
    assert lineage["metrics"]["stop_reason"] == "early_stopping"


def test_frozen_bn_fine_tunes_with_batches_of_two_and_keeps_its_statistics(c):
    create_model(c, "tune", "mlp_bn")
    x, y = blobs(800, seed=0)
    base = _run(
        c,
        model="tune",
        dataset=dataset_id(c, x, y, "tune-base"),
        epochs=3,
        batch_size=32,
        lr=0.05,
        seed=0,
        promote="always",
    )["result_version"]
    x_small, y_small = blobs(60, seed=10)
    small = dataset_id(c, x_small, y_small, "tune-small")
    tune = {"model": "tune", "dataset": small, "base_version": base, "promote": "never"}
    tune |= {"epochs": 3, "batch_size": 2, "lr": 0.05, "seed": 1, "keep": "last"}
    frozen = weights(c, "tune", _run(c, **tune, bn="frozen")["result_version"])
    trained = weights(c, "tune", _run(c, **tune, bn="train")["result_version"])
    before = weights(c, "tune", base)

    for key, value in bn_stats(before).items():
        assert torch.equal(frozen[key], value), key
        assert not torch.equal(trained[key], value), key
    for key in ("bn1.weight", "bn2.bias", "fc1.weight"):
        assert not torch.equal(frozen[key], before[key]), key

    # Two samples per batch make train-mode BN statistics noise; frozen BN never sees them.
    x_held, y_held = blobs(1000, seed=99)
    held_frozen, held_train = _accuracy(frozen, x_held, y_held), _accuracy(trained, x_held, y_held)
    print(f"held-out accuracy: frozen {held_frozen:.3f}, train {held_train:.3f}")
    assert held_frozen >= 0.95
    assert held_frozen > held_train + 0.05


def test_precise_bn_recomputes_the_statistics_over_the_training_batches(c):
    create_model(c, "precise", "mlp_bn")
    x, y = blobs(200, seed=7)
    data = dataset_id(c, x, y, "precise")
    run = {"model": "precise", "dataset": data, "epochs": 3, "batch_size": 16, "lr": 0.05}
    run |= {"seed": 4, "promote": "never"}
    batches = 10  # 160 training rows: the whole training split in batches of 16
    precise = weights(
        c, "precise", _run(c, **run, precise_bn={"batches": batches})["result_version"]
    )
    plain = weights(c, "precise", _run(c, **run)["result_version"])

    xt = torch.from_numpy(x)
    train_idx, _ = split_dataset(200, 0.2, 4)
    rows = precise_bn_rows(train_idx, batches, 16, 4)
    direct = direct_bn_stats(precise, xt, recalibration_batches(rows, 16, 4))
    ours = bn_stats(precise)
    for key in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert torch.allclose(ours[key], direct[key], rtol=1e-4, atol=1e-6), key
        assert not torch.allclose(bn_stats(plain)[key], direct[key], rtol=1e-2), key
    for key in ("fc1.weight", "bn1.weight", "fc3.bias"):
        assert torch.equal(precise[key], plain[key]), key


def test_dropout_trains_and_is_absent_from_served_predictions(c):
    create_model(c, "drop", "mlp_bn", dropout=0.5)
    x, y = blobs(200, seed=8)
    job = _run(
        c,
        model="drop",
        dataset=dataset_id(c, x, y, "drop"),
        epochs=2,
        batch_size=16,
        lr=0.05,
        seed=5,
        promote="always",
    )
    # The version passed the serving gate (batch invariance) to be stored at all.
    assert _version(c, "drop", job["result_version"])["serving"] is True
    batch = {"inputs": x[:16].tolist()}
    first = c.post("/v1/models/drop/predict", json=batch)
    assert first.status_code == 200, first.text
    for _ in range(3):
        again = c.post("/v1/models/drop/predict", json=batch)
        assert again.json()["outputs"] == first.json()["outputs"]
    alone = c.post("/v1/models/drop/predict", json={"inputs": x[3].tolist()})
    assert alone.json()["outputs"][0] == pytest.approx(first.json()["outputs"][3], abs=1e-5)


AUGMENT = {"random_crop": {"size": 28, "padding": 3}, "hflip": 0.5, "rotation": 20.0}


def test_augment_trains_the_batches_the_loader_makes_and_only_on_images(c, tmp_path):
    archive = tmp_path / "augment.zip"
    archive.write_bytes(zip_of(shapes(per_class=6)))
    r = upload_dataset(c, archive.read_bytes(), "augment.zip")
    assert r.status_code == 201, r.text
    images = r.json()["id"]
    body = {"name": "aug", "architecture": "mnist_cnn", "config": {"num_classes": 2}}
    r = c.post("/v1/models", json={**body, "preprocess": {"image": SHAPES}}, headers=AUTH)
    assert r.status_code == 201, r.text
    run = {"model": "aug", "dataset": images, "epochs": 2, "batch_size": 4, "lr": 0.05}
    run |= {"seed": 3, "promote": "never"}
    augmented = _run(c, **run, augment=AUGMENT)
    again = _run(c, **run, augment=AUGMENT)
    plain = _run(c, **run)
    got = weights(c, "aug", augmented["result_version"])
    assert (
        _version(c, "aug", again["result_version"])["sha256"]
        == (_version(c, "aug", augmented["result_version"])["sha256"])
    )  # the same job trains the same weights, whichever loader thread built a batch
    unaugmented = weights(c, "aug", plain["result_version"])
    assert not any(torch.equal(got[k], unaugmented[k]) for k in got if k.endswith("weight"))

    # The worker's weights are those of training on the loader's augmented batches, rebuilt
    # here from the same pixels (single-threaded loader, one PyTorch thread as in the worker).
    pipeline = ImagePipeline.model_validate(SHAPES)
    samples = load_image_samples(archive, pipeline, ImageLimits(4096**2, 1 << 30, 1000), kind="zip")
    arch = get_architecture("mnist_cnn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(3)
        module = arch.build(arch.parse_config({"num_classes": 2}))
        pixels = TrainingImages(samples.images, tuple(SHAPES["mean"]), tuple(SHAPES["std"]), 0)
        result = train(
            module,
            images_to_tensor(samples.images, pipeline),
            torch.from_numpy(samples.labels),
            task="classification",
            params=TrainParams.model_validate(augmented["params"]),
            should_stop=lambda: False,
            images=pixels,
        )
    finally:
        torch.set_num_threads(threads)
    for key, value in result.state_dict.items():
        assert torch.equal(got[key], value), key

    # Tensors have no pixels to augment, and batches must keep the model's input size.
    x, y = blobs(40)
    create_model(c, "aug-tensors", "mlp_bn")
    tensors = {**run, "model": "aug-tensors", "dataset": dataset_id(c, x, y, "aug-tensors")}
    assert_error(post_job(c, **tensors, augment=AUGMENT), 422, "augment_needs_images")
    too_big = {"random_crop": {"size": 40, "padding": 2}}
    body = assert_error(post_job(c, **run, augment=too_big), 422, "invalid_augment")
    assert "larger than the padded image" in body["detail"]
