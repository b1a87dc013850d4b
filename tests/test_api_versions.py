"""Versions of a model: numbering, listing, reading weights back, promote and rollback, pinning.

Each version's outputs are checked against a plain eval-mode PyTorch reference built from the
weights uploaded for it, so "serves version N" means N's numbers, not only N's header.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime

import httpx
import pytest
import safetensors.torch
import torch
from sqlalchemy import create_engine, text

from tests.conftest import AUTH, create_model, pt_bytes, reference_model, trained_state_dict, upload
from tests.helpers_api import assert_error, close, predict, predict_ok, samples, version_numbers

StateDict = dict[str, torch.Tensor]
X = samples((2,), 4, seed=11)


def expected(state_dict: StateDict) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = reference_model("mlp_bn", state_dict)(X)
    return out


def upload_ok(client: httpx.Client, name: str, state_dict: StateDict, **form: str) -> dict:
    r = upload(client, name, pt_bytes(state_dict), **form)
    assert r.status_code == 201, r.text
    return r.json()


def serves(client: httpx.Client, name: str, version: int, state_dict: StateDict) -> None:
    """`name` answers with `version` in header and body, and with that version's outputs."""
    outputs, answered = predict_ok(client, name, X)
    assert answered == version
    assert close(outputs, expected(state_dict))


@pytest.fixture
def three(client) -> list[StateDict]:
    """Model `m` with versions 1, 2, 3 (distinct weights), each promoted on upload."""
    create_model(client, "m", "mlp_bn")
    weights = [trained_state_dict("mlp_bn", seed=s) for s in (1, 2, 3)]
    for number, state_dict in enumerate(weights, start=1):
        assert upload_ok(client, "m", state_dict, note=f"seed {number}")["version"] == number
    return weights


def test_versions_count_up_from_one_and_list_oldest_first(client, three):
    r = client.get("/v1/models/m/versions")
    assert r.status_code == 200
    listed = r.json()
    assert [v["version"] for v in listed] == [1, 2, 3]
    assert [v["serving"] for v in listed] == [False, False, True]
    assert [v["note"] for v in listed] == ["seed 1", "seed 2", "seed 3"]
    times = [datetime.fromisoformat(v["created_at"]) for v in listed]
    assert times == sorted(times)
    for v, state_dict in zip(listed, three, strict=True):
        assert v["source"] == "upload"
        assert v["size_bytes"] > 0
        assert len(v["sha256"]) == 64
        assert v["report"]["num_tensors"] == len(state_dict)

    model = client.get("/v1/models/m").json()
    assert model["serving_version"] == 3
    assert [v["version"] for v in model["versions"]] == [1, 2, 3]
    serves(client, "m", 3, three[2])


def test_get_one_version(client, three):
    listed = client.get("/v1/models/m/versions").json()
    for v in listed:
        r = client.get(f"/v1/models/m/versions/{v['version']}")
        assert r.status_code == 200
        assert r.json() == v
    assert_error(client.get("/v1/models/m/versions/4"), 404, "version_not_found")
    assert_error(client.get("/v1/models/ghost/versions/1"), 404, "model_not_found")
    assert_error(client.get("/v1/models/ghost/versions"), 404, "model_not_found")
    assert_error(client.get("/v1/models/m/versions/0"), 422)
    assert_error(client.get("/v1/models/m/versions/first"), 422)


def test_weights_come_back_as_safetensors_equal_to_the_upload(client, three):
    for number, state_dict in enumerate(three, start=1):
        r = client.get(f"/v1/models/m/versions/{number}/weights")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        meta = client.get(f"/v1/models/m/versions/{number}").json()
        assert hashlib.sha256(r.content).hexdigest() == meta["sha256"]
        assert r.headers["x-checkpoint-sha256"] == meta["sha256"]
        assert len(r.content) == meta["size_bytes"]
        stored = safetensors.torch.load(r.content)
        assert stored.keys() == state_dict.keys()
        for key, value in state_dict.items():
            assert stored[key].dtype == value.dtype, key
            assert torch.equal(stored[key], value), key
    assert_error(client.get("/v1/models/m/versions/9/weights"), 404, "version_not_found")


def test_weights_read_back_can_be_uploaded_again(client, three):
    data = client.get("/v1/models/m/versions/1/weights").content
    created = upload(client, "m", data, "m-v1.safetensors")
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 4
    assert created.json()["sha256"] == client.get("/v1/models/m/versions/1").json()["sha256"]
    serves(client, "m", 4, three[0])


def test_upload_without_promote_keeps_serving_version(client, three):
    fourth = trained_state_dict("mlp_bn", seed=4)
    created = upload_ok(client, "m", fourth, promote="false")
    assert created["version"] == 4
    assert created["serving"] is False
    assert client.get("/v1/models/m").json()["serving_version"] == 3
    serves(client, "m", 3, three[2])

    r = client.post("/v1/models/m/versions/4/promote", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "m", "serving_version": 4, "previous_version": 3}
    serves(client, "m", 4, fourth)


def test_promote_an_older_version_rolls_back(client, three):
    r = client.post("/v1/models/m/versions/1/promote", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "m", "serving_version": 1, "previous_version": 3}
    serves(client, "m", 1, three[0])
    listed = client.get("/v1/models/m/versions").json()
    assert [v["serving"] for v in listed] == [True, False, False]
    assert client.get("/v1/models/m").json()["serving_version"] == 1

    # Promoting the serving version again is harmless; forward again works too.
    assert client.post("/v1/models/m/versions/1/promote", headers=AUTH).status_code == 200
    serves(client, "m", 1, three[0])
    assert client.post("/v1/models/m/versions/2/promote", headers=AUTH).status_code == 200
    serves(client, "m", 2, three[1])


def test_promote_unknown_version_or_model_is_404_and_changes_nothing(client, three):
    assert_error(
        client.post("/v1/models/m/versions/7/promote", headers=AUTH), 404, "version_not_found"
    )
    assert_error(
        client.post("/v1/models/ghost/versions/1/promote", headers=AUTH), 404, "model_not_found"
    )
    assert client.get("/v1/models/m").json()["serving_version"] == 3
    serves(client, "m", 3, three[2])


def test_version_parameter_pins_a_non_serving_version(client, three):
    for number, state_dict in enumerate(three, start=1):
        outputs, version = predict_ok(client, "m", X, version=number)
        assert version == number
        assert close(outputs, expected(state_dict))
    # Pinning answers from the pinned version but does not change what serves.
    serves(client, "m", 3, three[2])
    assert client.get("/v1/models/m").json()["serving_version"] == 3
    assert_error(predict(client, "m", X.tolist(), version=4), 404, "version_not_found")


def test_version_numbers_are_not_reused_within_a_model(client, three):
    assert_error(upload(client, "m", b"not a checkpoint"), 422, "unreadable_checkpoint")
    assert upload_ok(client, "m", three[0], promote="false")["version"] == 4
    assert version_numbers(client, "m") == [1, 2, 3, 4]


def test_delete_model_removes_its_versions_and_files(server, client, three):
    checkpoints = server.settings.DATA_DIR / "checkpoints"
    folders_m = {p.name for p in checkpoints.iterdir() if p.is_dir()}
    other = trained_state_dict("mlp_bn", seed=9)
    create_model(client, "other", "mlp_bn")
    upload_ok(client, "other", other)
    folders = {p.name for p in checkpoints.iterdir() if p.is_dir()}
    (folder_other,) = folders - folders_m
    (folder_m,) = folders_m
    assert sorted(p.name for p in (checkpoints / folder_m).iterdir()) == [
        "v1.safetensors",
        "v2.safetensors",
        "v3.safetensors",
    ]

    r = client.delete("/v1/models/m", headers=AUTH)
    assert r.status_code == 204
    assert r.content == b""
    assert not (checkpoints / folder_m).exists()
    assert sorted(p.name for p in (checkpoints / folder_other).iterdir()) == ["v1.safetensors"]
    assert_error(client.get("/v1/models/m"), 404, "model_not_found")
    assert_error(client.get("/v1/models/m/versions"), 404, "model_not_found")
    assert_error(client.get("/v1/models/m/versions/1/weights"), 404, "model_not_found")
    assert_error(predict(client, "m", X.tolist()), 404, "model_not_found")
    assert_error(predict(client, "m", X.tolist(), version=1), 404, "model_not_found")
    outputs, version = predict_ok(client, "other", X)
    assert version == 1
    assert close(outputs, expected(other))


def test_recreated_model_is_a_new_model_with_its_own_versions(client, three):
    """A deleted name can be used again; its versions count from 1 and hold only new weights."""
    assert client.delete("/v1/models/m", headers=AUTH).status_code == 204
    create_model(client, "m", "mlp_bn")
    assert version_numbers(client, "m") == []
    # Nothing of the old model answers: not its serving version, not a pinned old one.
    assert_error(predict(client, "m", X.tolist()), 409, "no_serving_version")
    assert_error(predict(client, "m", X.tolist(), version=2), 404, "version_not_found")

    fresh = trained_state_dict("mlp_bn", seed=20)
    assert upload_ok(client, "m", fresh)["version"] == 1
    assert version_numbers(client, "m") == [1]
    serves(client, "m", 1, fresh)
    stored = safetensors.torch.load(client.get("/v1/models/m/versions/1/weights").content)
    assert torch.equal(stored["fc1.weight"], fresh["fc1.weight"])
    assert not torch.equal(stored["fc1.weight"], three[0]["fc1.weight"])


def test_promotes_under_load_never_fail_or_mix_versions(server, client, three):
    """Every answer during repeated swaps is entirely one version's, as its header says."""
    references = {n: expected(sd) for n, sd in enumerate(three, start=1)}
    stop = threading.Event()
    seen: list[tuple[int, int, bool]] = []

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set():
                r = predict(own, "m", X.tolist())
                if r.status_code != 200:
                    seen.append((r.status_code, -1, False))
                    continue
                version = int(r.headers["x-model-version"])
                outputs = torch.tensor(r.json()["outputs"])
                same = r.json()["version"] == version and close(outputs, references[version])
                seen.append((200, version, same))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for version in (1, 2, 3, 1, 3, 2, 1):
            r = client.post(f"/v1/models/m/versions/{version}/promote", headers=AUTH)
            assert r.status_code == 200, r.text
            # From the promote's answer on, new requests get the new version.
            serves(client, "m", version, three[version - 1])
            # 4 clients have at most 4 requests from before the swap in flight: 8 more answers
            # include some from this version.
            count = len(seen)
            deadline = time.monotonic() + 10
            while len(seen) < count + 8 and time.monotonic() < deadline:
                time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert seen
    assert all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert all(same for _, _, same in seen), [s for s in seen if not s[2]][:5]
    assert {version for _, version, _ in seen} == {1, 2, 3}


def test_a_failed_promote_of_the_serving_version_leaves_it_serving_not_cached(server, client):
    """If recording the promote fails, the serving handle must not also land in the LRU cache,
    where its eviction would stop the batcher that serves every request."""
    create_model(client, "m", "mlp_bn")
    assert upload(client, "m", pt_bytes(trained_state_dict("mlp_bn"))).status_code == 201
    # The version row vanishes underneath this process (as if removed by hand elsewhere), so
    # recording the promote of the loaded, serving version 1 fails.
    engine = create_engine(server.settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM versions"))
    engine.dispose()
    r = client.post("/v1/models/m/versions/1/promote", headers=AUTH)
    assert r.status_code == 404, r.text
    manager = server.app_services.manager
    assert [key for key in manager._cache if key[0] == "m"] == []
    r = client.post("/v1/models/m/predict", json={"inputs": [0.0, 1.0]})
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
