"""The BN-native input-drift alarm: live inputs against the first BN layers' running statistics.

Every BatchNorm layer stores what its input looked like in training (`running_mean`,
`running_var`). A client whose preprocessing differs from the training one (no Normalize,
another mean/std, 0-255 pixels) moves those inputs far away, and the outputs are wrong with no
error. So on a sample of served batches (`BNSERVE_DRIFT_SAMPLE_RATE`) the inputs of the first
`DRIFT_LAYERS` BN layers (in forward order) are measured and compared with their running
statistics.

Measured on the side, so folded and compiled forwards need nothing: a `DriftProbe` keeps the
plain eval module as it was before the optimizations, cut down to the layers that run before
those BN layers (every module the forward never reaches has its tensors dropped to the meta
device), with forward pre-hooks on those BN layers that record their input's per-channel batch
mean and variance and stop the forward after the last one (`_Stop`). The probe runs in eval mode
under `inference_mode` on a thread of its own (niced), after the batch's answers went out: the
served outputs and the running statistics cannot change, and a sampled batch costs the stem's
forward on that thread, never the request's latency.

The score (`DriftMonitor`), per BN layer and channel c, with u = (x - running_mean_c) /
sqrt(running_var_c + eps) the input standardized by the running statistics: the live mean m_c
and variance v_c of u are pooled over the newest sampled batches that hold at least
`DRIFT_WINDOW` samples (sums of u and u^2 over every value, so batches weigh by their size; a
batch of 64 is a window of its own), and compared with N(0, 1), the training inputs, by the
symmetric KL divergence of two Gaussians,
J_c = 0.5 (r + 1/r - 2) + 0.5 m_c^2 (1 + 1/r), r = (var_c + eps) / (running_var_c + eps)
with var_c the live variance of x (the live variance over the running one, eps added to both as
BN does; in u's units r = v_c + eps / (running_var_c + eps)). Pooling means a change of
inputs shows once it fills part of the window (for [0, 1] pixels, ~half of it), and is gone
once the window turned over.
A layer's score is the mean of J_c over its channels; the version's score the mean over the
layers. 0 is identical statistics. J = 1 is a mean shifted by ~0.7 running standard deviations
or a spread about doubled (r ~ 4). Measured on every built-in architecture (BN statistics settled
on N(0, 1) inputs, 40 sampled batches of 1 and of 8): inputs from the same distribution 0.000-0.17
(mlp_bn the highest: one value per channel and sample), x * 1.5 0.17-0.47, x + 0.5 0.11-0.49,
x * 0.29 + 0.5 (what [0, 1] pixels are to a model trained on normalized ones) 3.3-30,
x * 50 + 20 1,400-3,000. The drawn-shapes CNN of tests/test_drift.py scores ~0.4 while
its pool holds one to three images, 0.01-0.06 after that, and 7.5 on its images without the
Normalize (crossing 1.0 after 28 of them). Hence the default threshold 1.0.

A batch of one is measured like any other: its values per channel (one for a BatchNorm1d, H x W
for a BatchNorm2d) join the pool, so a lone sample is a valid, noisy estimate and the pool is
the population's after enough batches (pooling sums, not per-batch scores, keeps the noise from
biasing the score upward). Until `MIN_VALUES` values per channel are pooled the score is None
(a variance from one value is 0, which would read as drift).

The alarm turns on when the score passes the threshold (one warning logged) and off when it falls
below `CLEAR_RATIO` x the threshold (one info line), so a score near the threshold does not log
every batch.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

# BN layers measured: the first ones in forward order, which see the inputs least transformed.
DRIFT_LAYERS = 2
# Samples the pooled statistics cover: the newest sampled batches that hold at least this many.
DRIFT_WINDOW = 32
# Values per channel pooled before a score is given (a variance needs more than one value).
MIN_VALUES = 16.0
# The alarm clears below this share of the threshold (hysteresis: no warning per batch).
CLEAR_RATIO = 0.8
# Added niceness of the probe thread: the forward threads win the cores when both want them.
PROBE_NICENESS = 10

_META = torch.device("meta")


class _Stop(Exception):
    """Raised by the last measured BN layer's pre-hook: the rest of the forward is not needed."""


Floats = NDArray[np.float64]


@dataclass(frozen=True)
class BatchStats:
    """One BN layer's input on one batch: samples, values per channel, and per-channel mean and
    biased variance (float64 NumPy arrays)."""

    layer: str
    samples: int
    count: int
    mean: Floats
    var: Floats


@dataclass(frozen=True)
class _Layer:
    name: str
    running_mean: Floats  # float64, copied once
    running_var: Floats
    eps: float


class DriftProbe:
    """The plain eval module cut down to its first BN layers, measuring their inputs.

    Built from the plain module before it is dropped (`build`); never shares tensors with the
    served module, so running it beside a forward pass is safe.
    """

    def __init__(self, module: nn.Module, layers: list[str], device: torch.device) -> None:
        modules = dict(module.named_modules())
        bns = [modules[name] for name in layers]
        assert all(isinstance(bn, _BatchNorm) for bn in bns)
        self.module = module
        self.device = device
        self.layers = [
            _Layer(
                name,
                _floats(_buffer(bn, "running_mean")),
                _floats(_buffer(bn, "running_var")),
                float(bn.eps),
            )
            for name, bn in zip(layers, bns, strict=True)
        ]
        self._lock = threading.Lock()  # one measurement at a time: the hooks share `_seen`
        self._seen: list[tuple[str, torch.Tensor, torch.Tensor, int, int]] = []
        # Registered for good: the probe has no caller but `measure`, and hooking per call cost
        # a dozen GIL round trips a measurement beside a busy event loop.
        for bn, layer in zip(bns, self.layers, strict=True):
            bn.register_forward_pre_hook(self._hook_for(layer.name))

    @classmethod
    def build(
        cls,
        plain: nn.Module,
        input_shape: tuple[int, ...],
        device: torch.device,
        *,
        layers: int = DRIFT_LAYERS,
    ) -> DriftProbe | None:
        """A probe of eval-mode `plain`'s first `layers` BN layers with running statistics (a
        copy: `plain` is untouched), or None if it has none. Blocking: two forward passes."""
        module = copy.deepcopy(plain).eval()
        example = torch.zeros((1, *input_shape), device=device)
        order, entered = _record(module, example, layers)
        if not order:
            return None
        names = {id(m): n for n, m in module.named_modules()}
        chosen = [names[id(bn)] for bn in order]
        _drop_unreached(module, entered)
        probe = cls(module, chosen, device)
        try:
            probe.measure(example)
        except Exception as exc:  # something reached other than through its module's call
            log.info("drift probe kept whole (%s: %s)", type(exc).__name__, exc)
            probe = cls(copy.deepcopy(plain).eval(), chosen, device)
        return probe

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the probe keeps (those dropped to meta hold none)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in tensors
            if t.device != _META
        }
        return sum(storages.values())

    def measure(self, x: torch.Tensor) -> list[BatchStats]:
        """The per-channel statistics of each measured BN layer's input on batch `x`.

        Each torch call releases and retakes the GIL, and beside a busy event loop every retake
        waits for it, so the torch side is only the stem's forward and one `var_mean` a layer;
        the rest is NumPy on arrays of a few hundred floats, which keeps the GIL.
        """
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        with self._lock, torch.inference_mode():
            self._seen = []
            with suppress(_Stop):
                self.module(x)
            seen, self._seen = self._seen, []
        return [
            BatchStats(name, samples, count, _floats(mean), _floats(var))
            for name, mean, var, samples, count in seen
        ]

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        last = len(self.layers)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args[0].dtype == torch.float32 else args[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            self._seen.append((name, mean, var, x.shape[0], x.numel() // max(1, x.shape[1])))
            if len(self._seen) >= last:
                raise _Stop

        return hook


def _record(module: nn.Module, example: torch.Tensor, layers: int) -> tuple[list[Any], set[int]]:
    """The first `layers` BN modules with running statistics in forward order, and the ids of
    every module entered up to the last of them."""
    order: list[_BatchNorm] = []
    entered: set[int] = set()

    def hook(mod: nn.Module, _args: tuple[Any, ...]) -> None:
        entered.add(id(mod))
        if isinstance(mod, _BatchNorm) and mod.running_mean is not None and mod not in order:
            order.append(mod)
            if len(order) >= layers:
                raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()]
    try:
        with suppress(_Stop), torch.inference_mode():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return order, entered


def _drop_unreached(module: nn.Module, entered: set[int]) -> None:
    """Move to meta the tensors of each subtree of `module` that the forward never entered."""
    for child in module.children():
        if not any(id(m) in entered for m in child.modules()):
            child.to(device=_META)
        else:
            _drop_unreached(child, entered)


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


def _floats(tensor: torch.Tensor) -> Floats:
    """A per-channel tensor as float64 NumPy (a copy where it was on another device or dtype)."""
    return tensor.detach().cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class DriftReading:
    """The monitor's state after its last measurement: what the API and the metrics show."""

    score: float | None
    threshold: float
    alarm: bool
    batches: int
    layers: dict[str, float | None] = field(default_factory=dict)
    # CPU seconds of the thread that made the last measurement, spent on it (the alarm's cost).
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "alarm": self.alarm,
            "batches": self.batches,
            "layers": dict(self.layers),
        }


class _Pool:
    """One layer's standardized input statistics over the last sampled batches that hold at
    least `DRIFT_WINDOW` samples (a window, not an EWMA: 0-255 inputs make u ~ 1e3, and an EWMA's
    tail of them kept the score above the threshold for hundreds of samples after a fix)."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer
        self._scale = np.sqrt(layer.running_var + layer.eps)
        self._eps_ratio = layer.eps / (layer.running_var + layer.eps)
        # Per batch: samples, values per channel, and per channel the sums of u and of u^2.
        self._batches: deque[tuple[int, int, Floats, Floats]] = deque()
        self._samples = 0

    def add(self, stats: BatchStats) -> None:
        z = (stats.mean - self.layer.running_mean) / self._scale  # mean of u over the batch
        second = stats.var / self._scale**2 + z**2  # mean of u^2 over the batch
        self._batches.append((stats.samples, stats.count, stats.count * z, stats.count * second))
        self._samples += stats.samples
        while self._samples - self._batches[0][0] >= DRIFT_WINDOW:
            self._samples -= self._batches.popleft()[0]

    def score(self) -> float | None:
        """Mean over channels of the symmetric KL divergence from the running statistics."""
        count = sum(batch[1] for batch in self._batches)
        if count < MIN_VALUES:
            return None
        m = np.sum([batch[2] for batch in self._batches], axis=0) / count
        second = np.sum([batch[3] for batch in self._batches], axis=0) / count
        v = np.maximum(second - m**2, 0.0)
        r = np.maximum(v + self._eps_ratio, 1e-12)
        kl = 0.5 * (r + 1 / r - 2) + 0.5 * m**2 * (1 + 1 / r)
        return float(kl.mean())


class DriftMonitor:
    """Samples one version's batches, measures them with its probe off the forward thread, and
    keeps the score, the alarm and the batch count.

    `offer` is called on the forward thread after each pass (the batcher runs one pass of a
    version at a time, so it has one caller at a time); `measure` runs on the probe executor.
    """

    def __init__(
        self,
        probe: DriftProbe,
        *,
        rate: float,
        threshold: float,
        executor: Executor,
        model: str,
        version: int,
        on_reading: Callable[[DriftReading], None] | None = None,
    ) -> None:
        self.probe = probe
        self.rate = rate
        self.threshold = threshold
        self.model = model
        self.version = version
        self._executor = executor
        self._on_reading = on_reading
        self._credit = 0.0
        self._busy = False
        self._broken = False
        self._pools = [_Pool(layer) for layer in probe.layers]
        self.reading = DriftReading(
            None, threshold, False, 0, {layer.name: None for layer in probe.layers}
        )

    def offer(self, x: torch.Tensor) -> None:
        """Measure `x` if it falls in the sample (every 1/rate-th batch, deterministically) and
        the previous measurement is done; a few float operations otherwise."""
        self._credit += self.rate
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        if self._busy or self._broken:
            return  # the probe lags (a busy machine): skip this batch rather than queue it
        self._busy = True
        try:
            self._executor.submit(self._measure, x)
        except RuntimeError:  # the executor shut down: the server is stopping
            self._busy = False

    def _measure(self, x: torch.Tensor) -> None:
        try:
            self.measure(x)
        except Exception:
            self._broken = True
            log.exception(
                "input drift of %s version %d cannot be measured; drift sampling stops for it",
                self.model,
                self.version,
            )
        finally:
            self._busy = False

    def measure(self, x: torch.Tensor) -> DriftReading:
        """Measure batch `x` now (blocking) and return the new reading."""
        started = time.thread_time()
        for pool, stats in zip(self._pools, self.probe.measure(x), strict=False):
            pool.add(stats)
        layers = {pool.layer.name: pool.score() for pool in self._pools}
        known = [s for s in layers.values() if s is not None]
        score = sum(known) / len(known) if len(known) == len(layers) else None
        previous = self.reading
        alarm = previous.alarm
        if score is not None and not alarm and score > self.threshold:
            alarm = True
            log.warning(
                "input drift on model %s version %d: score %.3g is above the threshold %g "
                "(BNSERVE_DRIFT_THRESHOLD) at BN layer(s) %s: live inputs no longer look like "
                "the training data (check the client's preprocessing: normalization, scale, "
                "channel order)",
                self.model,
                self.version,
                score,
                self.threshold,
                ", ".join(layers),
            )
        elif score is not None and alarm and score < CLEAR_RATIO * self.threshold:
            alarm = False
            log.info(
                "input drift on model %s version %d back to %.3g, under the threshold %g",
                self.model,
                self.version,
                score,
                self.threshold,
            )
        spent = time.thread_time() - started
        self.reading = DriftReading(
            score, self.threshold, alarm, previous.batches + 1, layers, spent
        )
        if self._on_reading is not None:
            self._on_reading(self.reading)
        return self.reading


def lower_priority() -> None:
    """Initializer of the probe thread: nice it (Linux nices threads one by one), so a forward
    pass wins the cores when both want them. Best effort."""
    with suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + PROBE_NICENESS
        os.setpriority(os.PRIO_PROCESS, thread, min(19, niceness))
