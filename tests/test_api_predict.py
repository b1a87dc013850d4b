"""POST /v1/models/{name}/predict end to end: served outputs are plain eval-mode PyTorch's.

Every architecture's outputs, for a batch and for one bare sample, equal a reference computed
here with the uploaded weights in an eval-mode module. test_api_batching.py checks that outputs
do not depend on batch-mates and leave BatchNorm statistics alone; test_api_predict_inputs.py has
the refused inputs.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from tests.conftest import (
    AUTH,
    create_model,
    pt_bytes,
    trained_state_dict,
    upload,
)
from tests.helpers_api import (
    arch_cases,
    close,
    input_shape,
    is_classifier,
    predict,
    predict_ok,
    reference_outputs,
    samples,
    serve,
)

# --- outputs equal plain PyTorch in eval mode, for every architecture ---------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize(("architecture", "config"), arch_cases())
def test_outputs_equal_eval_mode_reference(client, architecture, config, fmt):
    create_model(client, "m", architecture, **config)
    state_dict = trained_state_dict(architecture, seed=3, **config)
    if fmt == "pt":
        r = upload(client, "m", pt_bytes(state_dict), "weights.pt")
    else:
        r = upload(client, "m", safetensors.torch.save(state_dict), "weights.safetensors")
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["version"], created["serving"]) == (1, True)
    assert created["report"]["format"] == fmt

    x = samples(input_shape(architecture, config), 3, seed=7)
    expected = reference_outputs(architecture, state_dict, x, **config)

    r = predict(client, "m", x.tolist())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "m"
    assert body["version"] == 1
    assert r.headers["x-model-version"] == "1"
    outputs = torch.tensor(body["outputs"])
    assert close(outputs, expected), (outputs - expected).abs().max()

    if is_classifier(architecture, config):
        assert body["predictions"] == expected.argmax(dim=1).tolist()
        probabilities = torch.tensor(body["probabilities"])
        assert close(probabilities, torch.softmax(expected, dim=1))
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(3), atol=1e-5)
    else:
        assert body.get("predictions") is None
        assert body.get("probabilities") is None

    # One bare sample (no batch dimension) is answered as a batch of one.
    r = predict(client, "m", x[1].tolist())
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == str(r.json()["version"]) == "1"
    single = torch.tensor(r.json()["outputs"])
    assert close(single, expected[1:2]), (single - expected[1:2]).abs().max()
    if is_classifier(architecture, config):
        assert r.json()["predictions"] == [int(expected[1].argmax())]


def test_regression_mlp_serves_raw_values(client):
    config = {"in_features": 4, "out_features": 1, "task": "regression"}
    state_dict = serve(client, "reg", "mlp_bn", **config)
    x = samples((4,), 5)
    outputs, _ = predict_ok(client, "reg", x)
    assert close(outputs, reference_outputs("mlp_bn", state_dict, x, **config))
    assert outputs.shape == (5, 1)


def test_predictions_need_no_token_but_accept_one(client):
    serve(client, "m", "mlp_bn")
    x = samples((2,), 2)
    plain, _ = predict_ok(client, "m", x)
    r = client.post("/v1/models/m/predict", json={"inputs": x.tolist()}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert torch.equal(torch.tensor(r.json()["outputs"]), plain)
