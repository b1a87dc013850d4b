"""A training run's state at the end of an epoch, and its encoding as one safetensors file.

An interrupted job continues from here instead of from epoch 0 (`train(resume=...)`), and must
end exactly where an uninterrupted run ends: so the state holds everything the next epoch reads,
not only the weights. That is the weights and BatchNorm buffers, the optimizer's per-parameter
state (momentum, Adam moments and step counts), the epoch, the metrics so far, and every random
stream the loop draws from: the torch CPU generator (Dropout, and what the model draws itself),
the generator that orders each epoch's batches, and the CUDA generator of the device it trains
on. Format 2 adds what the run's options carry from epoch to epoch: the learning-rate scheduler,
the early-stopping counters and the best epoch with its weights (keep=best). The validation split
needs no state: it is recomputed from the seed.

The encoding needs no pickle: tensors (optimizer moments and RNG states included, the latter as
uint8) are safetensors entries, and everything else (epoch, seed, metrics, the optimizer's
non-tensor values, the caller's own metadata) is one JSON string in the safetensors header, so
the whole state is one file that a single `os.replace` publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

# A state of another format is not resumed: the job starts over (`ResumeStore.load`).
FORMAT = "bnserve-train-state/2"
_MODEL = "model."
_OPTIMIZER = "optimizer."
_RNG = "rng."
_BEST = "best."
# Random streams: the global CPU generator, the batch-order generator, the CUDA device's.
RNG_TORCH, RNG_ORDER, RNG_CUDA = "torch", "order", "cuda"


@dataclass(frozen=True)
class TrainState:
    """What `train` needs to run epoch `epoch + 1` as if it had never stopped."""

    epoch: int
    seed: int
    # One `dataclasses.asdict(EpochMetrics)` per finished epoch, in order.
    metrics: list[dict[str, Any]]
    model: dict[str, torch.Tensor]
    # The optimizer's `state_dict()["state"]`; param_groups come from the job's parameters.
    optimizer: dict[int, dict[str, Any]]
    rng: dict[str, torch.Tensor]
    # `schedule.scheduler_state(...)`, or None without an lr_schedule.
    scheduler: dict[str, Any] | None = None
    # `EpochSelector.state()`: the best epoch so far and the early-stopping counters.
    selection: dict[str, Any] = field(default_factory=dict)
    # The best epoch's weights when they are not `model` (keep=best and an earlier epoch won).
    best_model: dict[str, torch.Tensor] | None = None


def capture_rng(order: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    rng = {RNG_TORCH: torch.get_rng_state(), RNG_ORDER: order.get_state()}
    if device.type == "cuda":
        rng[RNG_CUDA] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], order: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(rng[RNG_TORCH])
    order.set_state(rng[RNG_ORDER])
    if device.type == "cuda":
        if RNG_CUDA not in rng:
            raise ValueError("the saved state was trained on CPU; it cannot resume on CUDA")
        torch.cuda.set_rng_state(rng[RNG_CUDA], device)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # A copy: the live tensors keep changing, and safetensors refuses tensors sharing storage.
    return t.detach().to("cpu", copy=True).contiguous()


def encode(state: TrainState, meta: dict[str, Any]) -> bytes:
    """The state as safetensors bytes; `meta` (JSON) travels with it, e.g. whose state it is."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for key, value in state.model.items():
        tensors[_MODEL + key] = _cpu_copy(value)
    for pid, entry in state.optimizer.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{pid}.{key}"] = _cpu_copy(value)
            else:
                plain.setdefault(str(pid), {})[key] = value
    for key, value in state.rng.items():
        tensors[_RNG + key] = _cpu_copy(value)
    for key, value in (state.best_model or {}).items():
        tensors[_BEST + key] = _cpu_copy(value)
    header = {
        "format": FORMAT,
        "epoch": state.epoch,
        "seed": state.seed,
        "metrics": state.metrics,
        "optimizer_values": plain,
        "scheduler": state.scheduler,
        "selection": state.selection,
        "has_best_model": state.best_model is not None,
        "meta": meta,
    }
    data: bytes = safetensors_save(tensors, metadata={"bnserve": json.dumps(header)})
    return data


def decode(path: str) -> tuple[TrainState, dict[str, Any]]:
    """(state, meta) from a file `encode` wrote; ValueError when it is not one."""
    with safe_open(path, framework="pt") as handle:
        header_text = (handle.metadata() or {}).get("bnserve")
        if header_text is None:
            raise ValueError(f"{path} is not a bnserve training state")
        header = json.loads(header_text)
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
        model: dict[str, torch.Tensor] = {}
        optimizer: dict[int, dict[str, Any]] = {}
        rng: dict[str, torch.Tensor] = {}
        best: dict[str, torch.Tensor] = {}
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = handle.get_tensor(name)
            if name.startswith(_MODEL):
                model[name.removeprefix(_MODEL)] = tensor
            elif name.startswith(_OPTIMIZER):
                pid, key = name.removeprefix(_OPTIMIZER).split(".", 1)
                optimizer.setdefault(int(pid), {})[key] = tensor
            elif name.startswith(_RNG):
                rng[name.removeprefix(_RNG)] = tensor
            elif name.startswith(_BEST):
                best[name.removeprefix(_BEST)] = tensor
    for pid_text, values in header["optimizer_values"].items():
        optimizer.setdefault(int(pid_text), {}).update(values)
    state = TrainState(
        epoch=int(header["epoch"]),
        seed=int(header["seed"]),
        metrics=list(header["metrics"]),
        model=model,
        optimizer=optimizer,
        rng=rng,
        scheduler=header["scheduler"],
        selection=dict(header["selection"]),
        best_model=best if header["has_best_model"] else None,
    )
    return state, dict(header["meta"])
