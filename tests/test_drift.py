"""The input-drift alarm: the probe measures exactly the plain module's BN inputs, and through a
real server a model trained on normalized images stays under the threshold when served through
its pipeline, while the same images sent as tensors without the normalization cross it."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import get_architecture
from service.serving.drift import DRIFT_LAYERS, DriftMonitor, DriftProbe
from service.serving.loaded import build_loaded
from service.serving.optimize import OptimizeOptions
from tests.conftest import AUTH, pt_bytes, reference_model, trained_state_dict, upload
from tests.helpers_api import arch_cases, bn_buffers, running

CPU = torch.device("cpu")


def _bn_inputs(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each BN layer's input on a full forward of `module`, by name (the first call of each)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0]))
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm)
    ]
    with torch.inference_mode():
        module(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(("architecture", "config"), arch_cases())
def test_the_probe_measures_the_plain_modules_first_bn_inputs(
    architecture: str, config: dict[str, Any]
) -> None:
    state_dict = trained_state_dict(architecture, **config)
    plain = reference_model(architecture, state_dict, **config)
    before = {k: v.clone() for k, v in bn_buffers(plain).items()}
    shape = tuple(get_architecture(architecture).parse_config(config).input_shape())
    probe = DriftProbe.build(plain, shape, CPU)
    assert probe is not None
    assert 1 <= len(probe.layers) <= DRIFT_LAYERS
    for n in (5, 1):  # a batch of one is measured too
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(n))
        inputs = _bn_inputs(plain, x)
        measured = probe.measure(x)
        assert [s.layer for s in measured] == [layer.name for layer in probe.layers]
        assert [s.layer for s in measured] == list(inputs)[: len(measured)]
        for stats in measured:
            bn_input = inputs[stats.layer].double()
            dims = [d for d in range(bn_input.dim()) if d != 1]
            assert stats.count == bn_input.numel() // bn_input.shape[1]
            mean, var = torch.from_numpy(stats.mean), torch.from_numpy(stats.var)
            torch.testing.assert_close(mean, bn_input.mean(dim=dims), rtol=1e-5, atol=1e-5)
            want_var = bn_input.var(dim=dims, correction=0)
            torch.testing.assert_close(var, want_var, rtol=1e-4, atol=1e-5)
    # Eval and inference mode: neither the plain module's nor the probe's statistics moved.
    for key, value in bn_buffers(plain).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    probe_buffers = bn_buffers(probe.module)
    for layer in probe.layers:
        torch.testing.assert_close(
            probe_buffers[f"{layer.name}.running_mean"], before[f"{layer.name}.running_mean"]
        )


def test_a_loaded_version_keeps_only_the_stem_and_serves_the_folded_module() -> None:
    config: dict[str, Any] = {"stem": "cifar", "image_size": 8, "num_classes": 3}
    state_dict = trained_state_dict("resnet18", **config)
    arch = get_architecture("resnet18")
    loaded = build_loaded(
        name="r",
        version=1,
        sha256="",
        architecture=arch,
        config=arch.parse_config(config),
        state_dict=state_dict,
        device=CPU,
        options=OptimizeOptions(drift_layers=2, channels_last=False),
    )
    assert loaded.optimizations.bn_folded == 20
    assert loaded.probe is not None
    assert [layer.name for layer in loaded.probe.layers] == ["bn1", "layer1.0.bn1"]
    # Everything after the measured layers was dropped to meta: the probe is a stem, not a copy.
    assert loaded.probe.nbytes < 0.01 * sum(v.numel() * 4 for v in state_dict.values())
    x = torch.randn(4, 3, 8, 8)
    want = reference_model("resnet18", state_dict, **config)(x).detach()
    torch.testing.assert_close(loaded.forward(x), want, rtol=1e-4, atol=1e-4)


def _settled_mlp() -> nn.Module:
    """mlp_bn whose BN statistics are exactly those of N(0, 1) inputs (a cumulative average)."""
    arch = get_architecture("mlp_bn")
    torch.manual_seed(0)
    model = arch.build(arch.parse_config({}))
    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.randn(256, 2))
    return model.eval()


def test_batches_of_one_are_scored_and_the_alarm_warns_once_then_clears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = DriftProbe.build(_settled_mlp(), (2,), CPU)
    assert probe is not None
    with ThreadPoolExecutor(1) as executor:
        monitor = DriftMonitor(
            probe, rate=1.0, threshold=1.0, executor=executor, model="m", version=1
        )
    g = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.INFO, logger="service.serving.drift"):
        readings = [monitor.measure(torch.randn(1, 2, generator=g)) for _ in range(64)]
        # A variance needs more than one value: no score until 16 values per channel are
        # pooled (16 samples of a BatchNorm1d); then in-distribution scores stay low.
        assert [r.score is None for r in readings[:16]] == [True] * 15 + [False]
        assert all(r.score is not None and r.score < 0.5 for r in readings[15:]), readings[-1]
        assert not any(r.alarm for r in readings)
        shifted = [monitor.measure(torch.randn(1, 2, generator=g) * 50 + 20) for _ in range(64)]
        assert shifted[-1].alarm
        assert shifted[-1].score is not None
        assert shifted[-1].score > 100
        # Fixed: once the window holds only good samples again, the alarm clears.
        back = [monitor.measure(torch.randn(1, 2, generator=g)) for _ in range(40)]
        assert back[-1].alarm is False
        assert back[-1].batches == 168
    records = [r for r in caplog.records if r.name == "service.serving.drift"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]


def test_the_sample_rate_measures_that_share_of_the_batches() -> None:
    probe = DriftProbe.build(_settled_mlp(), (2,), CPU)
    assert probe is not None
    with ThreadPoolExecutor(1) as executor:
        monitor = DriftMonitor(
            probe, rate=0.25, threshold=1.0, executor=executor, model="m", version=1
        )
        for _ in range(40):
            monitor.offer(torch.randn(4, 2))
            executor.submit(lambda: None).result()  # FIFO: the measurement, if any, is done
    assert monitor.reading.batches == 10


# --- through a real server ---------------------------------------------------------------------

SIZE = 28


def _shape_image(rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A grey circle (0) or square (1) of random size, shade and place on a random background."""
    kind = int(rng.integers(2))
    image = Image.new("L", (SIZE, SIZE), int(rng.integers(0, 100)))
    r = int(rng.integers(5, 11))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    shade = int(rng.integers(150, 256))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if kind == 0 else draw.rectangle)(box, fill=shade)
    return image, kind


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """ToTensor: 8-bit grey pixels to (N, 1, H, W) floats in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images]))[
        :, None
    ]


def _trained_on_normalized_images() -> tuple[dict[str, torch.Tensor], float, float]:
    """mnist_cnn trained a few steps on normalized drawn shapes, then its BN statistics
    recomputed at the final weights over all of them (as fvcore's PreciseBN does: a cumulative
    average, `momentum=None`, which the state_dict does not carry). Returns the weights, and the
    pixels' mean and std that the pipeline normalizes with."""
    rng = np.random.default_rng(0)
    drawn = [_shape_image(rng) for _ in range(96)]
    x = _pixels([image for image, _ in drawn])
    y = torch.tensor([kind for _, kind in drawn])
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    arch = get_architecture("mnist_cnn")
    torch.manual_seed(0)
    model: Any = arch.build(arch.parse_config({"num_classes": 2}))  # torch's stubs: untyped
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(4):
        batch = slice(step * 16, step * 16 + 16)
        optimizer.zero_grad()
        loss: Any = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        for start in range(0, len(x), 48):
            model(x[start : start + 48])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, mean, std


def _parts(items: Any, size: int) -> list[Any]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _drift(client: httpx.Client, name: str) -> dict[str, Any] | None:
    drift: dict[str, Any] | None = client.get(f"/v1/models/{name}/versions/1").json()["input_drift"]
    return drift


def _serve_until(
    client: httpx.Client,
    name: str,
    requests: list[dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """Send `requests` (cycling) until the drift reading is `done`; that reading.

    The probe thread is niced and skips a batch while it still measures the previous one, so on
    a busy machine fewer batches are measured than sent: by design, so readings are awaited.
    """
    deadline = time.monotonic() + 60
    i = 0
    while True:
        r = client.post(f"/v1/models/{name}/predict", **requests[i % len(requests)])
        assert r.status_code == 200, r.text
        i += 1
        drift = _drift(client, name)
        assert drift is not None
        if done(drift):
            return drift
        assert time.monotonic() < deadline, drift
        time.sleep(0.01)


def _gauge(client: httpx.Client, name: str, metric: str = "bnserve_input_drift") -> float | None:
    labels = f'model="{name}"' + (',version="1"' if metric == "bnserve_input_drift" else "")
    text = client.get("/metrics", headers=AUTH).text
    prefix = f"{metric}{{{labels}}} "
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else None


def test_normalized_images_stay_under_the_threshold_and_unnormalized_tensors_cross_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dict, mean, std = _trained_on_normalized_images()
    pipeline = {"mode": "L", "mean": [mean], "std": [std]}
    rng = np.random.default_rng(1)  # new images from the training distribution
    images = [_shape_image(rng)[0] for _ in range(32)]
    with (
        caplog.at_level(logging.INFO, logger="service.serving.drift"),
        running(tmp_path / "data", DRIFT_SAMPLE_RATE=1.0) as (_, client),
    ):
        r = client.post(
            "/v1/models",
            json={
                "name": "shapes",
                "architecture": "mnist_cnn",
                "config": {"num_classes": 2},
                "preprocess": {"image": pipeline},
            },
            headers=AUTH,
        )
        assert r.status_code == 201, r.text
        assert upload(client, "shapes", pt_bytes(state_dict)).status_code == 201
        assert _drift(client, "shapes") == {
            "score": None,
            "threshold": 1.0,
            "alarm": False,
            "batches": 0,
            "layers": {"bn1": None, "bn2": None},
        }

        # Through the model's pipeline: multipart batches of 8 PNGs.
        as_png = [
            {"files": [(f"i{j}", (f"{j}.png", _png(image), "image/png")) for j, image in part]}
            for part in _parts(list(enumerate(images)), 8)
        ]
        normal = _serve_until(client, "shapes", as_png, lambda d: d["batches"] >= 6)
        assert normal["score"] is not None
        assert normal["score"] < 0.5 * normal["threshold"], normal
        assert normal["alarm"] is False
        gauge = _gauge(client, "shapes")
        assert gauge is not None
        assert gauge < normal["threshold"]
        # What the measurements cost is counted: the probe thread's CPU time, a few ms each.
        cpu = _gauge(client, "shapes", "bnserve_input_drift_cpu_seconds_total")
        assert cpu is not None
        assert 0 < cpu < 0.1 * normal["batches"], cpu

        # The same images as tensors, ToTensor without Normalize: the pipeline a client forgot.
        unnormalized = _pixels(images)
        as_tensors = [{"json": {"inputs": x.tolist()}} for x in _parts(unnormalized, 8)]
        # The pool follows the last ~DRIFT_WINDOW (32) samples: ~6 batches of 8 turn it over.
        drifted = _serve_until(client, "shapes", as_tensors, lambda d: d["alarm"])
        assert drifted["batches"] - normal["batches"] <= 12, drifted
        assert drifted["alarm"] is True, drifted
        assert drifted["score"] > drifted["threshold"]
        gauge = _gauge(client, "shapes")
        assert gauge is not None
        assert gauge > drifted["threshold"]
        # The answers are still the model's own, untouched by the measuring.
        r = client.post("/v1/models/shapes/predict", json={"inputs": unnormalized.tolist()})
        want = reference_model("mnist_cnn", state_dict, num_classes=2)(unnormalized).detach()
        torch.testing.assert_close(torch.tensor(r.json()["outputs"]), want, rtol=1e-4, atol=1e-4)
        listed = client.get("/v1/models/shapes/versions").json()
        assert listed[0]["input_drift"]["alarm"] is True
        # A deleted model's gauge goes with it.
        assert client.delete("/v1/models/shapes", headers=AUTH).status_code == 204
        assert _gauge(client, "shapes") is None
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "service.serving.drift" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, warnings  # once when it crossed, not once per batch
    assert "input drift on model shapes version 1" in warnings[0]
    assert "BNSERVE_DRIFT_THRESHOLD" in warnings[0]


def test_with_sampling_off_no_probe_is_built_and_no_drift_is_reported(tmp_path: Path) -> None:
    with running(tmp_path / "data") as (srv, client):
        r = client.post("/v1/models", json={"name": "m", "architecture": "mlp_bn"}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = upload(client, "m", pt_bytes(trained_state_dict("mlp_bn")))
        assert r.status_code == 201, r.text
        assert r.json()["input_drift"] is None
        r = client.post("/v1/models/m/predict", json={"inputs": [[0.1, 0.2]] * 3})
        assert r.status_code == 200, r.text
        assert _drift(client, "m") is None
        handle = srv.app_services.manager._serving["m"]
        assert handle.drift is None
        assert handle.loaded.probe is None
        assert _gauge(client, "m") is None
