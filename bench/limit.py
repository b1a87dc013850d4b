"""The in-process limit: forward passes of the very module bnserve serves, with no HTTP around them.

The module comes from `service.serving.loaded.build_loaded`, the function bnserve loads versions
with, so whatever it applies at serving time (BN folding, channels_last, compilation) is applied
here too, and the forward is its `LoadedModel.forward`, on a worker thread as bnserve's forward
executor runs it. `bench/contenders/limit_server.py` runs it in a process started like the
servers (its own session, the same environment and so the same torch thread defaults), while
every server is paused, at the batch sizes bnserve formed under the same load. Measured in the
benchmark's own process instead, a resnet18 forward took twice as long as a whole bnserve request
on a busy machine: Linux's scheduler autogroups give each session its own share of the CPU.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from models import get_architecture
from service.serving.loaded import LoadedModel, build_loaded


def load(
    name: str, architecture: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> LoadedModel:
    arch = get_architecture(architecture)
    return build_loaded(
        name=name,
        version=1,
        sha256="bench",
        architecture=arch,
        config=arch.parse_config(config),
        state_dict=state_dict,
        device=torch.device("cpu"),
    )


def measure(loaded: LoadedModel, batch: int, seconds: float) -> dict[str, float]:
    """Samples/s and the median time of one forward pass at `batch`, over about `seconds`."""
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as executor:
        return executor.submit(_measure, loaded, batch, seconds).result()


def _measure(loaded: LoadedModel, batch: int, seconds: float) -> dict[str, float]:
    x = torch.rand(batch, *loaded.input_shape)
    with torch.inference_mode():
        warm_until = time.perf_counter() + min(1.0, seconds / 4)
        while time.perf_counter() < warm_until:
            loaded.forward(x)
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            started = time.perf_counter()
            loaded.forward(x)
            times.append(time.perf_counter() - started)
    return {
        "batch": batch,
        "samples_per_s": batch * len(times) / sum(times),
        "forward_ms": statistics.median(times) * 1000,
        # Throughput of a typical pass: on a shared machine a few descheduled passes can weigh
        # heavily in the mean above.
        "samples_per_s_median_pass": batch / statistics.median(times),
        "passes": len(times),
    }
