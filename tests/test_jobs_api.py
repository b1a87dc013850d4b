"""Training and recalibration jobs through the HTTP API, run by real worker processes.

Validation and the cancel of a queued job use the in-thread server (no worker). Everything that
trains shares one `python -m service` process with one worker (`shared`), each test on its own
model; the demo and restart tests start their own servers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import (
    AUTH,
    ServerProcess,
    ThreadServer,
    create_model,
    make_settings,
    pt_bytes,
    reference_model,
    trained_state_dict,
    upload,
)
from tests.helpers_jobs import (
    FAST_WORKER_ENV,
    blobs,
    dataset_id,
    get_job,
    npz_bytes,
    post_job,
    ring_points,
    serving_version,
    start_job,
    upload_dataset,
    versions,
    wait_job,
    wait_until,
    weights,
    without_durations,
)

# A BN MLP on two blobs of 800 points: 640 training rows in batches of 8 are 80 steps an epoch,
# and 30 epochs last long enough (a second or more) to watch the job's progress.
TRAIN = {"epochs": 30, "batch_size": 8, "lr": 0.05, "seed": 0}
EPOCHS, STEPS = 30, 80
BN_STATS = ("running_mean", "running_var")


def _bn_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in state if k.rsplit(".", 1)[-1] in BN_STATS)


def _accuracy(client: httpx.Client, model: str, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    r = client.post(f"/v1/models/{model}/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    predictions = np.array(r.json()["predictions"])
    return float((predictions == y).mean()), int(r.headers["x-model-version"])


def _served_by(client: httpx.Client, model: str, version: int, timeout: float = 10) -> None:
    """Wait until predictions come from `version` (API processes follow the DB's promote)."""

    def probe() -> bool | None:
        r = client.post(f"/v1/models/{model}/predict", json={"inputs": [0.0, 0.0]})
        return (
            True if r.status_code == 200 and r.headers["x-model-version"] == str(version) else None
        )

    wait_until(probe, timeout, f"{model} v{version} to serve", interval=0.1)


# --- Validation, with no worker (in-thread server) ---------------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server with no worker, shared by the validation tests: jobs stay queued."""
    server = ThreadServer(make_settings(tmp_path_factory.mktemp("idle") / "data")).start()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    server.stop()


@pytest.fixture(scope="module")
def setup(idle: httpx.Client) -> dict[str, str]:
    """Model `m` (mlp_bn, 2 features -> 2 classes, never a version) and datasets for it."""
    create_model(idle, "m", "mlp_bn")
    x, y = blobs(40)
    return {
        "good": dataset_id(idle, x, y, "good"),
        "three": dataset_id(idle, x[:3], y[:3], "three"),
        "wide": dataset_id(idle, np.ones((10, 3), np.float32), y[:10], "wide"),
        "class2": dataset_id(idle, x[:10], np.arange(10) % 3, "class2"),
        "targets": dataset_id(idle, x[:10], x[:10, :1], "targets"),
    }


def _job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/jobs").json())


INVALID = [
    pytest.param({"model": "nope"}, 404, "model_not_found", id="unknown-model"),
    pytest.param({"dataset": "0" * 32}, 404, "dataset_not_found", id="unknown-dataset"),
    pytest.param({"dataset": "wide"}, 422, "shape_mismatch", id="sample-shape"),
    pytest.param({"dataset": "class2"}, 422, "bad_labels", id="class-id-too-large"),
    pytest.param({"dataset": "targets"}, 422, "bad_labels", id="float-targets-for-classifier"),
    pytest.param(
        {"dataset": "three", "val_fraction": 0.5}, 422, "dataset_too_small", id="no-batch-of-two"
    ),
    pytest.param({"epochs": None}, 422, "missing_field", id="missing-epochs"),
    pytest.param({"lr": None}, 422, "missing_field", id="missing-lr"),
    pytest.param({"lr": 0}, 422, "validation_error", id="lr-zero"),
    pytest.param({"lr": -0.1}, 422, "validation_error", id="lr-negative"),
    pytest.param({"batch_size": 1}, 422, "validation_error", id="batch-of-one"),
    pytest.param({"epochs": 0}, 422, "validation_error", id="zero-epochs"),
    pytest.param({"optimizer": "lbfgs"}, 422, "validation_error", id="unknown-optimizer"),
    pytest.param(
        {"optimizer": "adam", "momentum": 0.5},
        422,
        "invalid_hyperparameters",
        id="momentum-with-adam",
    ),
    pytest.param({"unknown": 1}, 422, "validation_error", id="unknown-field"),
    pytest.param({"base_version": "serving"}, 409, "no_serving_version", id="no-serving"),
    pytest.param({"base_version": 7}, 404, "version_not_found", id="unknown-base-version"),
    pytest.param(
        {"val_fraction": 0, "promote": "if_better"}, 422, "invalid_promote", id="if-better-no-val"
    ),
    pytest.param({"promote": "sometimes"}, 422, "validation_error", id="unknown-promote"),
    pytest.param({"keep": "first"}, 422, "validation_error", id="unknown-keep"),
    pytest.param({"bn": "eval"}, 422, "validation_error", id="unknown-bn-mode"),
    pytest.param({"early_stopping": {"patience": 0}}, 422, "validation_error", id="patience-zero"),
    pytest.param(
        {"early_stopping": {"patience": "3"}}, 422, "validation_error", id="patience-string"
    ),
    pytest.param(
        {"early_stopping": {"patience": 2}, "val_fraction": 0, "promote": "never"},
        422,
        "invalid_hyperparameters",
        id="early-stopping-no-val",
    ),
    pytest.param(
        {"lr_schedule": {"kind": "step"}}, 422, "validation_error", id="step-without-step-size"
    ),
    pytest.param(
        {"lr_schedule": {"kind": "cosine", "warmup_epochs": 30}},
        422,
        "invalid_hyperparameters",
        id="warmup-not-shorter-than-epochs",
    ),
    pytest.param({"precise_bn": {"batches": 0}}, 422, "validation_error", id="precise-bn-zero"),
    pytest.param({"augment": {"hflip": 2}}, 422, "validation_error", id="flip-probability-2"),
    pytest.param({"augment": {}}, 422, "validation_error", id="augment-without-transforms"),
]


@pytest.mark.parametrize(("change", "status", "code"), INVALID)
def test_job_creation_refuses_what_a_worker_would_trip_over(idle, setup, change, status, code):
    before = _job_count(idle)
    body: dict[str, Any] = {"model": "m", "dataset": setup["good"], **TRAIN}
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = setup.get(value, value) if key == "dataset" else value
    r = post_job(idle, **body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.json()
    assert r.json()["detail"]
    assert _job_count(idle) == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"keep": "first"}, "keep"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
        ({"lr_schedule": {"kind": "step", "step_size": 1, "gamma": 2}}, "lr_schedule.gamma"),
        ({"precise_bn": {"batches": -1}}, "precise_bn.batches"),
        ({"augment": {"color_jitter": {"hue": 0.7}}}, "augment.color_jitter.hue"),
    ],
)
def test_a_bad_training_option_is_named(idle, setup, change, field):
    r = post_job(idle, model="m", dataset=setup["good"], **TRAIN, **change)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]


def test_training_options_are_stored_with_the_job(idle, setup):
    options = {
        "keep": "last",
        "early_stopping": {"patience": 3, "min_delta": 0.01},
        "lr_schedule": {"kind": "step", "warmup_epochs": 2, "step_size": 5, "gamma": 0.5},
        "bn": "frozen",
        "precise_bn": {"batches": 20},
    }
    job = start_job(idle, model="m", dataset=setup["good"], **TRAIN, **options)
    params = get_job(idle, job)["params"]
    assert {k: params[k] for k in options} == options
    defaults = get_job(idle, start_job(idle, model="m", dataset=setup["good"], **TRAIN))
    assert (defaults["params"]["keep"], defaults["params"]["bn"]) == ("best", "train")
    assert "early_stopping" not in defaults["params"]
    assert "augment" not in defaults["params"]
    assert (defaults["kept_epoch"], defaults["stop_reason"]) == (None, None)


def test_augment_is_refused_for_a_dataset_of_tensors(idle, setup):
    # Stored with the job (so in the resume identity) on image datasets: test_jobs_options.py.
    augment = {"random_crop": {"size": 32, "padding": 4}, "hflip": 0.5}
    r = post_job(idle, model="m", dataset=setup["good"], **TRAIN, augment=augment)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "augment_needs_images"
    # A recalibration measures the data as served, so it takes no augmentation at all.
    recalibrate = {"kind": "recalibrate_bn", "base_version": "serving", "augment": augment}
    r = post_job(idle, model="m", dataset=setup["good"], **recalibrate)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_augment", r.text


def test_valid_job_is_queued(idle, setup):
    r = post_job(idle, model="m", dataset=setup["good"], **TRAIN)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["model"] == "m"
    assert job["dataset"] == setup["good"]
    assert job["progress"] == {"epoch": 0, "epochs": EPOCHS, "step": 0, "steps": 0, "eta_s": None}
    assert job["metrics"] == []
    assert job["result_version"] is None
    assert job["promote"] == "if_better"
    assert get_job(idle, job["id"]) == job
    listed = {k: v for k, v in job.items() if k != "metrics"}  # listings leave metrics out
    assert idle.get("/v1/jobs").json()[0] == listed  # newest first
    assert listed in idle.get("/v1/jobs", params={"status": "queued"}).json()


def test_if_better_with_no_validation_split_is_fine_when_never_promoting(idle, setup):
    r = post_job(idle, model="m", dataset=setup["good"], **TRAIN, val_fraction=0, promote="never")
    assert r.status_code == 202, r.text


def test_job_creation_needs_the_token(idle, setup):
    before = _job_count(idle)
    r = idle.post("/v1/jobs", json={"model": "m", "dataset": setup["good"], **TRAIN})
    assert r.status_code == 401
    assert _job_count(idle) == before


def test_cancel_of_a_queued_job_ends_it_at_once(idle, setup):
    job_id = start_job(idle, model="m", dataset=setup["good"], **TRAIN)
    r = idle.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "cancelled"
    job = get_job(idle, job_id)
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None
    assert job["attempts"] == 0
    again = idle.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["code"] == "job_finished"


def test_unknown_job_is_404(idle):
    assert idle.get("/v1/jobs/nope").json()["code"] == "job_not_found"
    r = idle.post("/v1/jobs/nope/cancel", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["code"] == "job_not_found"


# --- Jobs run by a worker process --------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with one worker process for this module's training tests."""
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    server = ServerProcess(data_dir, {"BNSERVE_WORKERS": "1", **FAST_WORKER_ENV}).start()
    yield server
    server.stop()


@pytest.fixture
def sc(shared: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared.url, timeout=60) as c:
        yield c


def _serve_v1(client: httpx.Client, name: str) -> dict[str, torch.Tensor]:
    """Create `name` (mlp_bn) with an uploaded version 1 that serves; its weights are returned."""
    create_model(client, name, "mlp_bn")
    state = trained_state_dict("mlp_bn", seed=3)
    r = upload(client, name, pt_bytes(state))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    return state


@pytest.mark.slow
def test_training_job_reaches_accuracy_and_records_progress_and_lineage(sc):
    _serve_v1(sc, "clf")
    x, y = blobs(800, seed=1)
    dataset = upload_dataset(sc, npz_bytes(x=x, y=y), "blobs.npz").json()
    job_id = start_job(
        sc, model="clf", dataset=dataset["id"], base_version=1, promote="always", **TRAIN
    )

    # Poll while it runs: progress and per-epoch metrics must show up before it ends.
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = get_job(sc, job_id)
        seen.append(job)
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    job = seen[-1]
    assert job["status"] == "succeeded", job
    running = [j for j in seen if j["status"] == "running"]
    assert running, "never saw the job running"
    assert any(j["progress"]["step"] > 0 and j["progress"]["steps"] == STEPS for j in running)
    assert all(j["progress"]["epochs"] == EPOCHS for j in running)
    counts = [len(j["metrics"]) for j in running]
    assert counts == sorted(counts)
    assert len({c for c in counts if c > 0}) >= 2, f"metrics did not grow while running: {counts}"

    assert [m["epoch"] for m in job["metrics"]] == list(range(1, EPOCHS + 1))
    for m in job["metrics"]:
        assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= m.keys()
        assert m["lr"] == TRAIN["lr"]
        assert m["duration_s"] > 0  # the metrics' epoch-duration histogram reads it
    final_accuracy = job["metrics"][-1]["val_accuracy"]
    assert final_accuracy >= 0.9, job["metrics"]
    assert job["metrics"][-1]["train_loss"] < job["metrics"][0]["train_loss"]
    # The ETA counts down to 0 at the last step (timed from the first: never null by then).
    assert job["progress"] == {
        "epoch": EPOCHS,
        "epochs": EPOCHS,
        "step": STEPS,
        "steps": STEPS,
        "eta_s": 0.0,
    }
    assert job["result_version"] == 2
    assert job["promoted"] is True
    assert job["attempts"] == 1
    assert job["error"] is None
    # keep defaults to "best": the epoch if_better would pick, which the lineage reports.
    kept = job["metrics"][job["kept_epoch"] - 1]
    assert kept["val_accuracy"] == max(m["val_accuracy"] for m in job["metrics"])
    assert job["stop_reason"] == "completed"

    r = sc.get("/v1/models/clf/versions/2")
    assert r.status_code == 200, r.text
    version = r.json()
    assert version["source"] == "train"
    lineage = version["lineage"]
    assert lineage["job_id"] == job_id
    assert lineage["parent_version"] == 1
    assert lineage["dataset_sha256"] == dataset["sha256"]
    assert lineage["dataset_id"] == dataset["id"]
    for key, value in TRAIN.items():
        assert lineage["hyperparameters"][key] == value
    assert lineage["metrics"]["val_accuracy"] == kept["val_accuracy"]
    assert lineage["metrics"]["kept_epoch"] == job["kept_epoch"]
    assert [m["epoch"] for m in lineage["metrics"]["epochs"]] == list(range(1, EPOCHS + 1))

    # Served by the new version, and right on points it never saw.
    _served_by(sc, "clf", 2)
    x_new, y_new = blobs(300, seed=99)
    accuracy, served = _accuracy(sc, "clf", x_new, y_new)
    assert served == 2
    assert accuracy >= 0.9
    print(f"val accuracy {final_accuracy:.3f}, held-out accuracy {accuracy:.3f}")

    # Every training step up to the kept epoch went through BN in train mode: v1 had 3 updates,
    # then one a step.
    trained = weights(sc, "clf", 2)
    for layer in ("bn1", "bn2"):
        assert int(trained[f"{layer}.num_batches_tracked"]) == 3 + job["kept_epoch"] * STEPS

    r = sc.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 409
    assert r.json()["code"] == "job_finished"


@pytest.mark.slow
def test_bn_statistics_change_in_training_and_never_in_serving(sc):
    base = _serve_v1(sc, "stats")
    x, y = blobs(400, seed=2)
    job_id = start_job(
        sc,
        model="stats",
        dataset=dataset_id(sc, x + 3.0, y, "shifted"),  # shifted, so the stats must move
        base_version=1,
        promote="always",
        epochs=3,
        batch_size=32,
        lr=0.05,
        seed=1,
    )
    job = wait_job(sc, job_id)
    assert job["status"] == "succeeded", job
    before_training = weights(sc, "stats", 1)
    trained = weights(sc, "stats", 2)
    assert _bn_keys(trained) == _bn_keys(base) != []
    for key in _bn_keys(trained):
        assert torch.equal(before_training[key], base[key]), key
        assert not torch.allclose(trained[key], base[key]), key

    _served_by(sc, "stats", 2)
    probe = torch.tensor(blobs(16, seed=5)[0])
    expected = reference_model("mlp_bn", trained)(probe)

    def outputs() -> torch.Tensor:
        r = sc.post("/v1/models/stats/predict", json={"inputs": probe.tolist()})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == "2"
        return torch.tensor(r.json()["outputs"])

    first = outputs()
    assert torch.allclose(first, expected, rtol=1e-4, atol=1e-5)
    stored = sc.get("/v1/models/stats/versions/2/weights").content
    # Traffic far from the training data: a model left in train mode would move its stats.
    generator = torch.Generator().manual_seed(0)
    for i in range(500):
        batch = torch.randn(1 + i % 7, 2, generator=generator) * 5 + 10
        r = sc.post("/v1/models/stats/predict", json={"inputs": batch.tolist()})
        assert r.status_code == 200, r.text
    assert torch.equal(outputs(), first)
    assert sc.get("/v1/models/stats/versions/2/weights").content == stored


@pytest.mark.slow
def test_same_seed_from_fresh_weights_gives_the_same_version(sc):
    create_model(sc, "seeded", "mlp_bn")
    x, y = blobs(200, seed=12)
    dataset = dataset_id(sc, x, y, "seeded")
    body = {"model": "seeded", "dataset": dataset, "epochs": 2, "batch_size": 16, "lr": 0.05}
    runs = [wait_job(sc, start_job(sc, **body, seed=seed, promote="never")) for seed in (5, 5, 6)]
    assert [j["status"] for j in runs] == ["succeeded"] * 3, runs
    digests = [sc.get(f"/v1/models/seeded/versions/{j['result_version']}").json() for j in runs]
    assert digests[0]["sha256"] == digests[1]["sha256"]
    assert digests[0]["sha256"] != digests[2]["sha256"]
    assert without_durations(runs[0]["metrics"]) == without_durations(runs[1]["metrics"])
    # Without a seed one is drawn, and recorded so that the run can be repeated.
    drawn = wait_job(sc, start_job(sc, **body, promote="never"))
    first = sc.get(f"/v1/models/seeded/versions/{drawn['result_version']}").json()
    repeat = wait_job(sc, start_job(sc, **body, seed=first["lineage"]["seed"], promote="never"))
    second = sc.get(f"/v1/models/seeded/versions/{repeat['result_version']}").json()
    assert second["sha256"] == first["sha256"]


@pytest.mark.slow
def test_cancel_of_a_running_job_stops_it_and_leaves_no_version(sc):
    _serve_v1(sc, "long")
    x, y = blobs(800, seed=3)
    job_id = start_job(
        sc,
        model="long",
        dataset=dataset_id(sc, x, y, "long"),
        epochs=1000,
        batch_size=8,
        lr=0.01,
        promote="always",
    )
    try:
        wait_job(sc, job_id, ("running",), timeout=30)
        wait_until(lambda: get_job(sc, job_id)["progress"]["step"] or None, 10, "steps")
        before = versions(sc, "long")
        started = time.monotonic()
        r = sc.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
        assert r.status_code == 202, r.text
        job = wait_job(sc, job_id, timeout=10)
        latency = time.monotonic() - started
    finally:
        sc.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    print(f"running job cancelled in {latency:.2f} s")
    assert job["status"] == "cancelled", job
    assert latency < 5
    assert job["result_version"] is None
    assert job["progress"]["epoch"] < 1000
    time.sleep(0.5)
    assert versions(sc, "long") == before
    assert serving_version(sc, "long") == 1
    assert sc.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409


@pytest.mark.slow
def test_if_better_keeps_the_better_serving_version(sc):
    create_model(sc, "ifb", "mlp_bn")
    x, y = blobs(600, seed=4)
    noisy = dataset_id(sc, x, y, "noisy")
    common = {"model": "ifb", "batch_size": 16, "seed": 0, "promote": "if_better"}

    # No serving version yet: if_better promotes.
    good = wait_job(sc, start_job(sc, dataset=noisy, epochs=8, lr=0.05, **common))
    assert good["status"] == "succeeded", good
    assert good["promoted"] is True
    assert serving_version(sc, "ifb") == good["result_version"] == 1
    assert good["metrics"][-1]["val_accuracy"] >= 0.9

    # Fresh weights barely trained: worse on the same validation rows, kept but not served.
    worse = wait_job(sc, start_job(sc, dataset=noisy, epochs=1, lr=1e-5, **common))
    assert worse["status"] == "succeeded", worse
    assert worse["result_version"] == 2
    assert worse["promoted"] is False
    assert worse["metrics"][-1]["val_accuracy"] < good["metrics"][-1]["val_accuracy"]
    assert serving_version(sc, "ifb") == 1
    compared = sc.get("/v1/models/ifb/versions/2").json()["lineage"]["compared_with"]
    assert compared["version"] == 1
    assert compared["val_accuracy"] > worse["metrics"][-1]["val_accuracy"]

    # Fine-tuned from the serving version on cleaner data: at least as good there, promoted.
    x_clean, y_clean = blobs(600, seed=5, spread=0.3)
    clean = dataset_id(sc, x_clean, y_clean, "clean")
    better = wait_job(
        sc,
        start_job(sc, dataset=clean, base_version="serving", epochs=8, lr=0.05, **common),
    )
    assert better["status"] == "succeeded", better
    assert better["promoted"] is True
    assert serving_version(sc, "ifb") == better["result_version"] == 3
    lineage = sc.get("/v1/models/ifb/versions/3").json()["lineage"]
    assert lineage["parent_version"] == 1
    new = (lineage["metrics"]["val_accuracy"], lineage["metrics"]["val_loss"])
    old = (lineage["compared_with"]["val_accuracy"], lineage["compared_with"]["val_loss"])
    assert new[0] > old[0] or (new[0] == old[0] and new[1] <= old[1]), (new, old)
    print(
        f"if_better: v1 {good['metrics'][-1]['val_accuracy']:.3f} promoted, "
        f"v2 {worse['metrics'][-1]['val_accuracy']:.3f} kept back, "
        f"v3 {new[0]:.3f} (loss {new[1]:.4f}) vs v1 {old[0]:.3f} (loss {old[1]:.4f}) promoted"
    )


@pytest.mark.slow
def test_predictions_never_fail_while_a_job_trains_and_promotes(sc):
    _serve_v1(sc, "live")
    _served_by(sc, "live", 1)
    x, y = blobs(800, seed=6)
    dataset = dataset_id(sc, x, y, "live")
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        generator = torch.Generator().manual_seed(1)
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=sc.base_url, timeout=30) as c:
            while not stop.is_set() and time.monotonic() < deadline:
                batch = torch.randn(4, 2, generator=generator).tolist()
                r = c.post("/v1/models/live/predict", json={"inputs": batch})
                seen.append((r.status_code, r.headers.get("x-model-version", "")))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        job = wait_job(
            sc,
            start_job(
                sc,
                model="live",
                dataset=dataset,
                base_version="serving",
                promote="always",
                epochs=6,
                batch_size=8,
                lr=0.05,
            ),
        )
        assert job["status"] == "succeeded", job
        # Keep going until the new version has answered a while.
        wait_until(
            lambda: True if [v for _, v in seen[-20:]] == ["2"] * 20 else None,
            15,
            "version 2 to serve",
        )
    finally:
        stop.set()
        thread.join(timeout=35)
    statuses = {s for s, _ in seen}
    assert statuses == {200}, [s for s in seen if s[0] != 200][:5]
    order = [v for _, v in seen]
    changes = [(a, b) for a, b in itertools.pairwise(order) if a != b]
    assert changes == [("1", "2")], changes
    assert order.count("1") > 0
    print(f"{len(seen)} predictions during training, all 200; switched 1 -> 2 once")


def _fresh_bn_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained-looking weights whose BN layers have PyTorch's initial statistics."""
    state = dict(state)
    for key in list(state):
        if key.endswith("running_mean"):
            state[key] = torch.zeros_like(state[key])
        elif key.endswith("running_var"):
            state[key] = torch.ones_like(state[key])
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(state[key])
    return state


def _expected_stats(state: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Running stats from one train-mode pass over all of x: mean and unbiased var per layer."""
    eps = 1e-5
    with torch.no_grad():
        h1 = x @ state["fc1.weight"].T + state["fc1.bias"]
        biased = h1.var(dim=0, unbiased=False)
        z = (h1 - h1.mean(0)) / torch.sqrt(biased + eps) * state["bn1.weight"] + state["bn1.bias"]
        h2 = torch.relu(z) @ state["fc2.weight"].T + state["fc2.bias"]
    return {
        "bn1.running_mean": h1.mean(0),
        "bn1.running_var": h1.var(0, unbiased=True),
        "bn2.running_mean": h2.mean(0),
        "bn2.running_var": h2.var(0, unbiased=True),
    }


@pytest.mark.slow
def test_recalibrate_bn_sets_running_stats_from_the_data_and_keeps_the_weights(sc):
    create_model(sc, "recal", "mlp_bn")
    fresh = _fresh_bn_stats(trained_state_dict("mlp_bn", seed=7))
    r = upload(sc, "recal", pt_bytes(fresh))
    assert r.status_code == 201, r.text
    assert [layer["stats_trained"] for layer in r.json()["report"]["bn_layers"]] == [False, False]
    x, y = blobs(500, seed=8)
    x = x * 2 + 1
    dataset = dataset_id(sc, x, y, "recal")

    # One batch over every sample: the running stats are exactly the dataset's.
    job = wait_job(
        sc,
        start_job(sc, model="recal", dataset=dataset, kind="recalibrate_bn", batch_size=512),
    )
    assert job["status"] == "succeeded", job
    assert job["result_version"] == 2
    assert job["promoted"] is True
    version = sc.get("/v1/models/recal/versions/2").json()
    assert version["source"] == "recalibrate"
    assert version["lineage"]["parent_version"] == 1
    assert version["lineage"]["job_id"] == job["id"]
    assert [layer["stats_trained"] for layer in version["report"]["bn_layers"]] == [True, True]
    new = weights(sc, "recal", 2)
    parameter_keys = [k for k in fresh if not k.rsplit(".", 1)[-1].startswith(("running", "num"))]
    assert parameter_keys
    for key in parameter_keys:
        assert torch.equal(new[key], fresh[key]), key
    for key, value in _expected_stats(fresh, torch.tensor(x)).items():
        assert torch.allclose(new[key], value, rtol=1e-4, atol=1e-4), key

    # Batches of 64 (the last one short): a sample-weighted average, so bn1's mean is still the
    # dataset's mean exactly; the variance is the size-weighted mean of the batch variances.
    job = wait_job(
        sc,
        start_job(
            sc, model="recal", dataset=dataset, kind="recalibrate_bn", batch_size=64, base_version=1
        ),
    )
    assert job["status"] == "succeeded", job
    batched = weights(sc, "recal", job["result_version"])
    h1 = torch.tensor(x) @ fresh["fc1.weight"].T + fresh["fc1.bias"]
    assert torch.allclose(batched["bn1.running_mean"], h1.mean(0), rtol=1e-4, atol=1e-4)
    assert torch.allclose(batched["bn1.running_var"], h1.var(0), rtol=0.05)
    for key in parameter_keys:
        assert torch.equal(batched[key], fresh[key]), key


# --- Whole servers: the demo, and a restart ----------------------------------------------------


@pytest.mark.slow
def test_demo_trains_itself_and_is_created_once(spawn, tmp_path: Path):
    started = time.monotonic()
    server = spawn(BNSERVE_DEMO="true", BNSERVE_WORKERS="1", **FAST_WORKER_ENV)
    inner, outer = ring_points(1.0), ring_points(2.5)
    with httpx.Client(base_url=server.url, timeout=30) as c:

        def answer() -> dict[str, Any] | None:
            r = c.post("/v1/models/demo/predict", json={"inputs": inner + outer})
            return r.json() if r.status_code == 200 else None

        body = wait_until(answer, 60, "the demo model to serve", interval=0.2)
        ready_after = time.monotonic() - started
        assert body["labels"] == ["inner"] * 8 + ["outer"] * 8
        # The image demo's job (tests/test_demo.py trains it) may still be running.
        jobs = {job["model"]: job for job in c.get("/v1/jobs").json()}
        assert sorted(jobs) == ["demo", "shapes"]
        assert jobs["demo"]["status"] == "succeeded"
        print(f"demo served {ready_after:.1f} s after start")
    server.stop()

    again = spawn(BNSERVE_DEMO="true", BNSERVE_WORKERS="0")
    with httpx.Client(base_url=again.url, timeout=30) as c:
        assert [m["name"] for m in c.get("/v1/models").json()] == ["demo", "shapes"]
        assert len(c.get("/v1/jobs").json()) == 2
        assert len(c.get("/v1/datasets").json()) == 2
        assert len(versions(c, "demo")) == 1
        r = c.post("/v1/models/demo/predict", json={"inputs": inner + outer})
        assert r.json()["labels"] == ["inner"] * 8 + ["outer"] * 8


# What a restart must bring back as it was (plus the job itself).
_STATE_PATHS = [
    "/v1/models",
    "/v1/models/kept",
    "/v1/models/kept/versions",
    "/v1/models/kept/versions/2",
    "/v1/datasets",
    "/v1/jobs",
]


@pytest.mark.slow
def test_restart_brings_back_models_versions_datasets_and_jobs(spawn):
    server = spawn(BNSERVE_WORKERS="1", **FAST_WORKER_ENV)
    probe = blobs(8, seed=11)[0].tolist()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _serve_v1(c, "kept")
        x, y = blobs(400, seed=10)
        job = wait_job(
            c,
            start_job(
                c,
                model="kept",
                dataset=dataset_id(c, x, y, "kept"),
                base_version=1,
                promote="always",
                epochs=3,
                batch_size=32,
                lr=0.05,
            ),
        )
        assert job["status"] == "succeeded", job
        # Roll back to v1: a restart must serve what the database says, not the newest.
        assert c.post("/v1/models/kept/versions/1/promote", headers=AUTH).status_code == 200
        _served_by(c, "kept", 1)
        before = {
            path: _durable(c.get(path).json()) for path in [*_STATE_PATHS, f"/v1/jobs/{job['id']}"]
        }
        answer = c.post("/v1/models/kept/predict", json={"inputs": probe})
        # A job still training when the server stops: its worker hands it back to the queue.
        unfinished = start_job(
            c,
            model="kept",
            dataset=job["dataset"],
            epochs=1000,
            batch_size=8,
            lr=0.01,
            promote="always",
        )
        wait_job(c, unfinished, ("running",), timeout=30)
    server.stop()

    again = spawn(BNSERVE_WORKERS="0")
    with httpx.Client(base_url=again.url, timeout=30) as c:
        after = {path: _durable(c.get(path).json()) for path in before}
        handed_back = after["/v1/jobs"].pop(0)
        assert handed_back["id"] == unfinished
        assert handed_back["status"] == "queued"
        assert handed_back["attempts"] == 0
        assert after == before
        r = c.post("/v1/models/kept/predict", json={"inputs": probe})
        assert r.headers["x-model-version"] == "1"
        assert r.json()["outputs"] == answer.json()["outputs"]


def _durable(value: Any) -> Any:
    """An answer without `optimizations`: what *this process* applied when it loaded a version
    (with load-time timings), null where it has not loaded it; not stored, so not restored."""
    if isinstance(value, list):
        return [_durable(v) for v in value]
    if isinstance(value, dict):
        return {k: _durable(v) for k, v in value.items() if k != "optimizations"}
    return value
