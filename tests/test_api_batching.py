"""Dynamic batching meets BatchNorm: served outputs never depend on batch-mates or move statistics.

In eval mode BN uses its running statistics, so a sample's outputs are the same alone or batched
with other clients' samples, and no number of predictions changes `running_mean`, `running_var` or
`num_batches_tracked` of the module that serves them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.helpers_api import (
    arch_cases,
    batch_size_histogram,
    bn_buffers,
    close,
    input_shape,
    predict,
    predict_ok,
    reference_outputs,
    running,
    samples,
    serve,
)

# --- batch invariance under dynamic batching ----------------------------------------------------


@pytest.mark.parametrize(("architecture", "config"), arch_cases(every_config=False))
def test_sample_output_alone_equals_output_among_concurrent_clients(tmp_path, architecture, config):
    shape = input_shape(architecture, config)
    n_requests = 48
    # Request i sends 1 or 2 samples; every third request sends one bare sample (no batch dim),
    # which BatchNorm1d models must also serve among others.
    batches = [samples(shape, 1 + i % 2, seed=100 + i) for i in range(n_requests)]
    bare = [i % 3 == 0 for i in range(n_requests)]
    payloads = [
        b[0].tolist() if single else b.tolist() for b, single in zip(batches, bare, strict=True)
    ]
    expected_rows = [b[:1] if single else b for b, single in zip(batches, bare, strict=True)]

    # A 20 ms batching window, so that concurrent requests surely share forward passes.
    with running(tmp_path / "data", MAX_BATCH_WAIT_MS=20) as (srv, client):
        state_dict = serve(client, "m", architecture, **config)
        alone = [
            torch.cat([predict_ok(client, "m", rows[j : j + 1])[0] for j in range(len(rows))])
            for rows in expected_rows
        ]
        passes_before, samples_before = batch_size_histogram(client, "m")

        barrier = threading.Barrier(n_requests)

        def send(i: int) -> tuple[torch.Tensor, int]:
            with httpx.Client(base_url=srv.url, timeout=60) as own:
                barrier.wait(timeout=30)
                r = predict(own, "m", payloads[i])
                assert r.status_code == 200, r.text
                assert r.headers["x-model-version"] == str(r.json()["version"])
                return torch.tensor(r.json()["outputs"]), r.json()["version"]

        with ThreadPoolExecutor(n_requests) as pool:
            together = list(pool.map(send, range(n_requests)))
        passes_after, samples_after = batch_size_histogram(client, "m")

    total = sum(len(rows) for rows in expected_rows)
    assert samples_after - samples_before == total
    # Dynamic batching really gathered requests: fewer forward passes than requests.
    assert passes_after - passes_before < n_requests, (passes_after - passes_before, n_requests)
    for i, ((outputs, version), single_outputs) in enumerate(zip(together, alone, strict=True)):
        assert version == 1
        assert close(outputs, single_outputs), (i, (outputs - single_outputs).abs().max())
    everything = torch.cat(expected_rows)
    assert close(
        torch.cat([o for o, _ in together]),
        reference_outputs(architecture, state_dict, everything, **config),
    )


# --- predictions never move the live BatchNorm statistics ---------------------------------------


def served_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of the served module."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize(
    ("architecture", "config"), arch_cases({"mlp_bn", "mnist_cnn", "clip3d"}, every_config=False)
)
def test_thousands_of_predictions_leave_bn_statistics_bit_for_bit(
    server, client, architecture, config
):
    state_dict = serve(client, "m", architecture, **config)
    manager = server.app_services.manager
    handle = manager._serving["m"]
    # Served folded, the BN statistics live on in the weights they were folded into, so every
    # tensor of the served module is watched (any BN left keeps its running statistics).
    assert handle.loaded.optimizations.bn_folded > 0
    before = served_state(handle.loaded.module)
    for key, value in bn_buffers(handle.loaded.module).items():
        assert torch.equal(value.cpu(), state_dict[key]), key

    # Quantized values keep the JSON short; 2000 samples over 100 requests, half of them
    # sequential and half from 8 concurrent clients.
    x = torch.round(samples(input_shape(architecture, config), 2000, seed=5) * 4) / 4
    chunks = list(x.split(20))
    outputs = [predict_ok(client, "m", chunk)[0] for chunk in chunks[:50]]

    def send(chunk: torch.Tensor) -> torch.Tensor:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            return predict_ok(own, "m", chunk)[0]

    with ThreadPoolExecutor(8) as pool:
        outputs += list(pool.map(send, chunks[50:]))

    assert manager._serving["m"] is handle, "the same loaded version served throughout"
    after = served_state(handle.loaded.module)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert not any(m.training for m in handle.loaded.module.modules())
    assert close(torch.cat(outputs), reference_outputs(architecture, state_dict, x, **config))
