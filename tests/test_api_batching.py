"""Dynamic batching meets BatchNorm: served outputs never depend on batch-mates or move statistics.

In eval mode BN uses its running statistics, so a sample's outputs are the same alone or batched
with other clients' samples, and no number of predictions changes `running_mean`, `running_var` or
`num_batches_tracked` of the module that serves them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH, pt_bytes, trained_state_dict, upload
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
from tests.helpers_serving import hold_forwards, marked

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

    # Requests that arrive while a pass runs share the next one.
    with running(tmp_path / "data") as (srv, client):
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


# --- the batching rule: never wait for company, gather what queued while the model was busy ----


def _batch_histogram(client: httpx.Client) -> dict[str, float]:
    """bnserve_batch_size for model `m`: its `count`, `sum` and cumulative `le=N` buckets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "bnserve_batch_size":
            for s in family.samples:
                if s.labels.get("model") != "m":
                    continue
                key = s.name.rsplit("_", 1)[-1]
                out[f"le={s.labels['le']}" if key == "bucket" else key] = s.value
    return out


def _predict_own(url: str, x: torch.Tensor) -> torch.Tensor:
    with httpx.Client(base_url=url, timeout=60) as own:
        return predict_ok(own, "m", x)[0]


@pytest.mark.parametrize(("max_batch", "passes"), [(None, 2), (4, 3)])
def test_a_lone_request_goes_at_once_and_requests_queued_meanwhile_share_the_next_pass(
    tmp_path, max_batch, passes
):
    """Request A finds the model free and its pass starts alone, without waiting for company
    (it is then held inside its forward). Six more arrive while it runs; when it ends they go
    together, in passes of at most the model's own `serving.max_batch_size`."""
    with running(tmp_path / "data") as (srv, client), hold_forwards() as hold:
        serving = {} if max_batch is None else {"max_batch_size": max_batch}
        r = client.post(
            "/v1/models",
            json={"name": "m", "architecture": "mlp_bn", "serving": serving},
            headers=AUTH,
        )
        assert r.status_code == 201, r.text
        assert r.json()["serving"] == {"max_batch_size": max_batch}
        assert upload(client, "m", pt_bytes(trained_state_dict("mlp_bn"))).status_code == 201
        batcher = srv.app_services.manager._serving["m"].batcher
        assert batcher.max_batch == (max_batch or srv.app_services.settings.MAX_BATCH_SIZE)
        xs = [marked(torch.randn(1, 2))] + [torch.randn(1, 2) for _ in range(6)]
        with ThreadPoolExecutor(7) as pool:
            first = pool.submit(_predict_own, srv.url, xs[0])
            assert hold.entered.wait(10), "the lone request's pass started without company"
            rest = [pool.submit(_predict_own, srv.url, x) for x in xs[1:]]
            deadline = time.monotonic() + 20
            while batcher.in_flight < 7 and time.monotonic() < deadline:
                time.sleep(0.02)  # the six are queued behind the held pass
            assert batcher.in_flight == 7
            hold.release()
            outputs = [f.result(timeout=30) for f in [first, *rest]]
        histogram = _batch_histogram(client)
        alone = [predict_ok(client, "m", x)[0] for x in xs]
    assert histogram["count"] == passes + 0, histogram
    assert histogram["sum"] == 7
    assert histogram["le=1.0"] == 1  # the lone request's pass
    if max_batch is not None:
        assert histogram[f"le={float(max_batch)}"] == passes  # no pass above the model's bound
    for got, want in zip(outputs, alone, strict=True):
        assert close(got, want)
