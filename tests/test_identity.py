"""A model is its identity, not its name (issue 17, point 1).

A model deleted and created again under the same name is another model: nothing started for the
old one (an upload streaming, a version load, a replica's cached weights) may finish on, or
answer for, the new one. Real server processes throughout; where a load must be held at an exact
point, the `tests.blocking_plugin` architecture holds its forward passes on a file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.checkpoints.store import CheckpointStore
from service.checkpoints.validation import state_dict_to_safetensors
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.errors import ModelReplaced, NotFound
from service.files import Owner
from service.registry import Registry
from tests import blocking_plugin
from tests.conftest import (
    AUTH,
    ServerProcess,
    create_model,
    make_settings,
    pt_bytes,
    trained_state_dict,
)
from tests.helpers_serving import Book, Served, close, predict, wait_for

SYNC_INTERVAL_S = 0.5
PROPAGATION_BOUND_S = 3 * SYNC_INTERVAL_S
PLUGIN = {"BNSERVE_ARCHITECTURE_PLUGINS": "tests.blocking_plugin"}


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def _stored_files(data_dir: Path) -> list[Path]:
    """Every file in the checkpoint and upload folders (temp files included)."""
    return [
        p
        for folder in ("checkpoints", "uploads")
        for p in (data_dir / folder).rglob("*")
        if p.is_file()
    ]


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("code")


def test_upload_streaming_while_its_model_is_replaced_stores_nothing(spawn, tmp_path: Path):
    server = spawn()
    boundary = "identity-test-boundary"
    data = pt_bytes(trained_state_dict("mlp_bn", seed=1))
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w.pt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    half = len(data) // 2
    head_sent, go_on = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield head + data[:half]
        head_sent.set()
        go_on.wait(timeout=30)
        yield data[half:] + tail

    with _client(server) as c, ThreadPoolExecutor(1) as pool:
        create_model(c, "m", "mlp_bn")
        pending = pool.submit(
            c.post,
            "/v1/models/m/versions",
            content=body(),
            headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert head_sent.wait(timeout=30)
        time.sleep(0.3)  # the server has read the head and looked the model up by now
        assert c.delete("/v1/models/m", headers=AUTH).status_code == 204
        create_model(c, "m", "mlp_bn", in_features=3)  # another config: another input shape
        go_on.set()
        r = pending.result(timeout=60)

        assert _error(r) == (409, "model_replaced"), r.text
        assert "'m'" in r.json()["detail"]
        model = c.get("/v1/models/m").json()
        assert model["versions"] == []
        assert model["serving_version"] is None
        assert model["input_shape"] == [3]
        assert predict(c, "m", torch.zeros(1, 3)).status_code == 409
    assert _stored_files(server.data_dir) == []


@pytest.mark.slow
def test_a_replica_drops_a_deleted_models_weights_when_its_name_is_created_again(spawn):
    env = {"BNSERVE_SYNC_INTERVAL_S": str(SYNC_INTERVAL_S)}
    a, b = spawn(**env), spawn(**env)
    old, new = Book(), Book(out_features=3)
    x = torch.randn(4, 2)
    with _client(a) as ca, _client(b) as cb:
        create_model(ca, "m", "mlp_bn")
        old.upload(ca, "m", seed=1)
        assert close(Served(predict(cb, "m", x)).outputs, old.expected(1, x))

        assert ca.delete("/v1/models/m", headers=AUTH).status_code == 204
        create_model(ca, "m", "mlp_bn", out_features=3)
        # b must stop answering with the deleted weights although the name exists again.
        wait_for(
            "b to drop the deleted model's version",
            lambda: predict(cb, "m", x).status_code == 409,
            PROPAGATION_BOUND_S,
        )

        new.upload(ca, "m", seed=2)  # version 1 again, of the new model
        ready = cb.get("/readyz")
        if ready.status_code == 200:  # ready only once it serves the new model's version 1
            assert close(Served(predict(cb, "m", x)).outputs, new.expected(2, x))
        wait_for(
            "b to serve the new model's version 1",
            lambda: close(Served(predict(cb, "m", x)).outputs, new.expected(2, x)),
            PROPAGATION_BOUND_S,
        )
        assert cb.get("/readyz").status_code == 200


def _blocking_weights(seed: int, **config: Any) -> bytes:
    return pt_bytes(trained_state_dict(blocking_plugin.NAME, seed=seed, **config))


def _expected(seed: int, x: torch.Tensor, **config: Any) -> torch.Tensor:
    book = Book(blocking_plugin.NAME, **config)
    book.weights(seed)
    return book.expected(seed, x)


def _upload(c: httpx.Client, seed: int, promote: bool, **config: Any) -> None:
    r = c.post(
        "/v1/models/m/versions",
        files={"file": ("w.pt", _blocking_weights(seed, **config))},
        data={"promote": str(promote).lower()},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text


def _hold_next_load(gate: Path) -> None:
    gate.with_name(gate.name + ".entered").unlink(missing_ok=True)
    gate.touch()


def _load_is_held(gate: Path) -> bool:
    return gate.with_name(gate.name + ".entered").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["same process", "other process"])
def test_a_delete_during_a_pinned_load_leaves_no_handle_for_the_new_model(
    spawn, tmp_path: Path, where: str
):
    """A `?version=2` load is held in its gate while the model is deleted and created again,
    through the same process (the delete waits for the load's lock) or through another one
    (the load re-checks the model's identity before it caches its handle). The held process
    syncs once a minute, so neither can lean on its sync loop."""
    gate = tmp_path / "hold-loads"
    held = spawn(**PLUGIN, BLOCKING_PLUGIN_FILE=str(gate), BNSERVE_SYNC_INTERVAL_S="60")
    other = held if where == "same process" else spawn(**PLUGIN)
    x = torch.randn(3, 4)
    with _client(held) as ch, _client(other) as co, ThreadPoolExecutor(2) as pool:
        create_model(co, "m", blocking_plugin.NAME)
        _upload(co, seed=1, promote=True)
        _upload(co, seed=2, promote=False)  # stored, not loaded anywhere

        _hold_next_load(gate)
        pinned = pool.submit(predict, ch, "m", x, 2)
        wait_for("the pinned load to be held", lambda: _load_is_held(gate), 30)
        deleted = pool.submit(co.delete, "/v1/models/m", headers=AUTH)
        time.sleep(0.5)  # a delete that does not wait for the load is done by now
        if where == "other process":
            assert deleted.result(timeout=30).status_code == 204
            create_model(co, "m", blocking_plugin.NAME, num_classes=3)
        gate.unlink()
        answer = pinned.result(timeout=60)
        assert deleted.result(timeout=60).status_code == 204
        if where == "same process":
            assert answer.status_code == 200, answer.text  # it came before the delete
            create_model(co, "m", blocking_plugin.NAME, num_classes=3)
        else:
            assert _error(answer) in {(404, "model_not_found"), (409, "model_replaced")}
        _upload(co, seed=3, promote=True, num_classes=3)
        _upload(co, seed=4, promote=False, num_classes=3)

        served = Served(predict(ch, "m", x, 2))
        assert served.version == 2
        assert close(served.outputs, _expected(4, x, num_classes=3))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    settings = make_settings(tmp_path / "data")
    engine = make_engine(settings.database_url)
    migrate(engine, settings.DATA_DIR)
    owner = Owner(settings.DATA_DIR)
    yield Registry(make_sessionmaker(engine), CheckpointStore(settings.checkpoint_dir, owner))
    owner.close()
    engine.dispose()


def test_a_version_checked_for_a_deleted_model_is_never_stored(registry: Registry):
    """What another process's delete meets: the version is stored by model id, or not at all."""
    data = state_dict_to_safetensors(trained_state_dict("mlp_bn", seed=1))
    old_id = registry.create_model("m", "mlp_bn", {}).id
    registry.delete_model("m")
    with pytest.raises(NotFound):
        registry.add_version("m", data, source="upload", model_id=old_id)
    registry.create_model("m", "mlp_bn", {"in_features": 3})
    with pytest.raises(ModelReplaced):
        registry.add_version("m", data, source="upload", model_id=old_id)
    with pytest.raises(ModelReplaced):
        registry.set_serving("m", 1, model_id=old_id)
    assert registry.list_versions("m") == []
    assert [p for p in registry.store.root.rglob("*") if p.is_file()] == []
