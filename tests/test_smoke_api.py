from __future__ import annotations

import torch

from tests.conftest import create_model, pt_bytes, reference_model, trained_state_dict, upload


def test_upload_and_predict_round_trip(client):
    create_model(client, "m", "mlp_bn")
    sd = trained_state_dict("mlp_bn")
    r = upload(client, "m", pt_bytes(sd))
    assert r.status_code == 201, r.text
    x = torch.randn(5, 2)
    r = client.post("/v1/models/m/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    expected = reference_model("mlp_bn", sd)(x)
    assert torch.allclose(torch.tensor(r.json()["outputs"]), expected, rtol=1e-4, atol=1e-5)
