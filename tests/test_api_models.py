"""/v1/architectures and /v1/models: what can be built, creating, listing, reading and deleting."""

from __future__ import annotations

import pytest

from models import get_architecture
from tests.conftest import AUTH
from tests.helpers_api import BUILTIN_NAMES, arch_cases, assert_error, builtin_architectures


def create(client, name: str, architecture: str = "mlp_bn", **config):
    body = {"name": name, "architecture": architecture, "config": config}
    return client.post("/v1/models", json=body, headers=AUTH)


def test_builtin_architectures_are_all_registered():
    assert {a.name for a in builtin_architectures()} == BUILTIN_NAMES


def test_architectures_lists_builtins_with_shapes_and_schemas(client):
    r = client.get("/v1/architectures")
    assert r.status_code == 200
    listed = {a["name"]: a for a in r.json()}
    assert set(listed) >= BUILTIN_NAMES
    for name in BUILTIN_NAMES:
        entry = listed[name]
        arch = get_architecture(name)
        assert entry["description"] == arch.description
        assert entry["input_shape"] == list(arch.default_config().input_shape())
        schema = entry["config_schema"]
        assert schema["type"] == "object"
        assert {"bn_eps", "bn_momentum", "track_running_stats"} <= set(schema["properties"])
    assert listed["mnist_cnn"]["input_shape"] == [1, 28, 28]
    assert listed["seed_cnn"]["input_shape"] == [3, 32, 32]
    assert listed["mlp_bn"]["input_shape"] == [2]
    assert listed["clip3d"]["input_shape"] == [3, 8, 32, 32]
    assert listed["resnet18"]["input_shape"] == [3, 32, 32]
    assert "stem" in listed["resnet18"]["config_schema"]["properties"]


@pytest.mark.parametrize(("architecture", "config"), arch_cases())
def test_create_model_returns_it_with_its_input_shape(client, architecture, config):
    r = create(client, "m", architecture, **config)
    assert r.status_code == 201, r.text
    model = r.json()
    arch = get_architecture(architecture)
    parsed = arch.parse_config(config)
    assert model["name"] == "m"
    assert model["architecture"] == architecture
    assert model["config"] == parsed.model_dump(mode="json")  # defaults filled in
    assert model["input_shape"] == list(parsed.input_shape())
    assert model["serving_version"] is None
    assert model["versions"] == []
    assert client.get("/v1/models/m").json() == model


def test_config_changes_the_input_shape(client):
    r = create(client, "tabular", "mlp_bn", in_features=7, out_features=3)
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [7]
    r = create(client, "tiny-clips", "clip3d", in_channels=1, frames=4, size=16)
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [1, 4, 16, 16]


def test_duplicate_name_is_409_and_keeps_the_first(client):
    assert create(client, "m", "mlp_bn", in_features=3).status_code == 201
    assert_error(create(client, "m", "mnist_cnn"), 409, "model_exists")
    model = client.get("/v1/models/m").json()
    assert model["architecture"] == "mlp_bn"
    assert model["input_shape"] == [3]


@pytest.mark.parametrize(
    "name",
    ["Upper", "../x", "a" * 65, "", "-dash-first", "_under", "has space", "dot.name", "a/b", "é"],
)
def test_invalid_names_are_422(client, name):
    body = assert_error(create(client, name), 422, "invalid_name")
    assert "a-z" in body["detail"]
    assert client.get("/v1/models").json() == []


@pytest.mark.parametrize("name", ["a", "0", "a" * 64, "my-model_2"])
def test_valid_names_at_the_edges(client, name):
    r = create(client, name)
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/models/{name}").json()["name"] == name


def test_unknown_architecture_is_422(client):
    body = assert_error(create(client, "m", "resnet1000"), 422, "unknown_architecture")
    assert "mlp_bn" in body["detail"]  # says which ones exist
    assert client.get("/v1/models").json() == []


def test_unknown_config_key_is_422_naming_it(client):
    body = assert_error(create(client, "m", "mlp_bn", hidden=128), 422, "invalid_config")
    assert [e["field"] for e in body["errors"]] == ["hidden"]
    assert "hidden" in body["detail"]


def test_config_without_running_stats_is_refused_saying_why(client):
    r = create(client, "m", "mnist_cnn", track_running_stats=False)
    body = assert_error(r, 422, "invalid_config")
    (error,) = body["errors"]
    assert error["field"] == "track_running_stats"
    assert "batch" in error["message"]
    assert "eval" in error["message"]


def test_bad_config_values_are_listed(client):
    r = create(client, "m", "resnet18", num_classes=1, stem="vgg", image_size=4)
    body = assert_error(r, 422, "invalid_config")
    assert {e["field"] for e in body["errors"]} == {"num_classes", "stem", "image_size"}
    assert client.get("/v1/models").json() == []


def test_list_get_and_delete(client):
    for name, architecture in (("zeta", "mlp_bn"), ("alpha", "mnist_cnn"), ("mid", "clip3d")):
        assert create(client, name, architecture).status_code == 201
    listed = client.get("/v1/models").json()
    assert [m["name"] for m in listed] == ["alpha", "mid", "zeta"]
    for model in listed:
        assert client.get(f"/v1/models/{model['name']}").json() == model

    assert_error(client.get("/v1/models/ghost"), 404, "model_not_found")

    r = client.delete("/v1/models/mid", headers=AUTH)
    assert r.status_code == 204
    assert r.content == b""
    assert_error(client.get("/v1/models/mid"), 404, "model_not_found")
    assert_error(client.delete("/v1/models/mid", headers=AUTH), 404, "model_not_found")
    assert [m["name"] for m in client.get("/v1/models").json()] == ["alpha", "zeta"]

    # The name is free again.
    assert create(client, "mid", "mlp_bn").status_code == 201
    assert client.get("/v1/models/mid").json()["architecture"] == "mlp_bn"
