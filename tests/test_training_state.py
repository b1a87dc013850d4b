"""A training run stopped after an epoch and resumed from its saved state ends bit for bit equal.

The state goes through its real file encoding (safetensors, no pickle) between the two runs, and
the resumed run starts from a model with other weights and a scrambled global RNG, so nothing
but the file can carry what it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from service.training.state import RNG_ORDER, RNG_TORCH, TrainState, decode, encode
from service.training.trainer import TrainParams, TrainResult, train


def _never() -> bool:
    return False


def _model(seed: int) -> nn.Module:
    # Dropout draws from the global RNG every step: a resume that lost that stream would differ.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
    )


def _blobs(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    return torch.where(y[:, None] == 1, 1.0, -1.0) + torch.randn(n, 2, generator=g), y


def _run(
    params: TrainParams,
    *,
    states: list[Path] | None = None,
    folder: Path | None = None,
    stop_after: int | None = None,
    resume: TrainState | None = None,
    init_seed: int = 0,
) -> TrainResult:
    """Train; each epoch's state is written to `folder` through the real encoding."""
    x, y = _blobs()

    def keep(state: TrainState) -> None:
        assert states is not None
        assert folder is not None
        path = folder / f"epoch-{state.epoch}.safetensors"
        path.write_bytes(encode(state, {"job": "test"}))
        states.append(path)

    return train(
        _model(init_seed),
        x,
        y,
        task="classification",
        params=params,
        should_stop=(lambda: len(states or []) >= stop_after) if stop_after else _never,
        on_state=keep if states is not None else None,
        resume=resume,
    )


def _assert_same(a: TrainResult, b: TrainResult) -> None:
    assert a.metrics == b.metrics
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
        assert a.state_dict[key].dtype == b.state_dict[key].dtype, key


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, optimizer):
    params = TrainParams(
        epochs=5, batch_size=16, lr=0.05, optimizer=optimizer, weight_decay=0.01, seed=11
    )
    whole = _run(params)

    saved: list[Path] = []
    stopped = _run(params, states=saved, folder=tmp_path, stop_after=2)
    assert stopped.stopped
    assert len(saved) == 2
    state, meta = decode(str(saved[-1]))
    assert meta == {"job": "test"}
    assert state.epoch == 2
    assert state.seed == 11
    assert state.optimizer  # momentum buffers / Adam moments travel with it

    torch.manual_seed(12345)  # the resumed process's global RNG is somewhere else entirely
    resumed = _run(params, resume=state, init_seed=99)
    assert not resumed.stopped
    assert [m.epoch for m in resumed.metrics] == [1, 2, 3, 4, 5]
    _assert_same(whole, resumed)


def test_state_of_the_last_epoch_resumes_to_the_same_result(tmp_path):
    # A worker that dies after its last epoch but before publishing: nothing is trained again.
    params = TrainParams(epochs=3, batch_size=16, lr=0.05, optimizer="adam", seed=5)
    saved: list[Path] = []
    whole = _run(params, states=saved, folder=tmp_path)
    state, _ = decode(str(saved[-1]))
    steps: list[int] = []
    x, y = _blobs()
    resumed = train(
        _model(1),
        x,
        y,
        task="classification",
        params=params,
        should_stop=_never,
        on_step=lambda *a: steps.append(a[1]),
        resume=state,
    )
    assert steps == []
    _assert_same(whole, resumed)


def test_state_file_is_safetensors_with_json_and_every_rng_stream(tmp_path):
    params = TrainParams(epochs=1, batch_size=16, lr=0.05, optimizer="sgd", seed=2)
    saved: list[Path] = []
    _run(params, states=saved, folder=tmp_path)
    with safe_open(str(saved[0]), framework="pt") as handle:
        header = json.loads(handle.metadata()["bnserve"])
        names = set(handle.keys())
    assert header["epoch"] == 1
    assert [m["epoch"] for m in header["metrics"]] == [1]
    assert {f"rng.{RNG_TORCH}", f"rng.{RNG_ORDER}"} <= names
    assert "model.1.running_var" in names
    assert "model.1.num_batches_tracked" in names
    assert any(name.startswith("optimizer.") and "momentum_buffer" in name for name in names)


def test_a_state_from_another_seed_is_refused(tmp_path):
    params = TrainParams(epochs=2, batch_size=16, lr=0.05, seed=1)
    saved: list[Path] = []
    _run(params, states=saved, folder=tmp_path, stop_after=1)
    state, _ = decode(str(saved[0]))
    with pytest.raises(ValueError, match="does not belong"):
        _run(params.model_copy(update={"seed": 2}), resume=state)


def test_a_file_that_is_not_a_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a bnserve training state"):
        decode(str(path))
