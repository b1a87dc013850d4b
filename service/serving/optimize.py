"""Serving-time optimizations of a gated eval-mode module, each one proven before it may serve.

BatchNorms are folded into the Conv/Linear before them (`folding.py`); `channels_last` is kept
only where a short interleaved timing at load says it is faster; `torch.compile` only when
asked for, compiled and warmed here so that no request pays for it.

Every step is checked against the plain eval module on a seeded probe batch (8 samples, and a
batch of one): a step whose outputs move by more than `MAX_ABS_DIFF`, or that raises, is dropped
and the report says why. Folding moves resnet18's logits by ~5e-7, so 1e-4 leaves room for
kernel rounding but not for a wrong fold (one over the wrong axis moved a test model's outputs
by 1.9); under TF32 the bound is 1e-2 (`precision.py`). The result passes the gate again before
it may serve.

Measured in-process on the 2-core development machine (torch 2.13 CPU, resnet18 cifar stem,
32x32, medians of interleaved runs; the machine is shared, so expect +-20%): quiet, 2 threads,
batch 1 plain 19.7 ms, folded 19.5, folded+channels_last 17.8; batch 32 ~380, ~400 (noise),
~305. Under contention, 1 thread: batch 1 57.9, 59.1, 51.7; batch 32 1102, 1491, 893.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from service.errors import GateFailed
from service.serving.drift import DRIFT_LAYERS
from service.serving.folding import NotFoldable, count_batchnorm, fold_batchnorm
from service.serving.gate import run_gate
from service.serving.precision import TOLERANCES, current_precision, tolerances
from service.settings import Settings

MAX_ABS_DIFF = TOLERANCES["ieee"].optimize_abs  # at IEEE fp32; tolerances() gives the one in force
PROBE_SAMPLES = 8
PROBE_SEED = 1
# channels_last must take at most this share of the contiguous forward's time to be kept: a
# smaller gain is within this machine's run-to-run noise and not worth the layout's risk.
CHANNELS_LAST_MAX_RATIO = 0.9
TIMING_BATCH = 4
TIMING_ROUNDS = 5
# Time for the timed rounds (after one warm-up pair); at least one round always runs.
TIMING_BUDGET_S = 0.3

_CONVS_BY_RANK: dict[int, tuple[type[nn.Module], torch.memory_format]] = {
    4: (nn.Conv2d, torch.channels_last),
    5: (nn.Conv3d, torch.channels_last_3d),
}


@dataclass(frozen=True)
class OptimizeOptions:
    """What to try at load; `warm_batch` is the largest batch the batcher forms.

    `channels_last` None measures at load whether it pays; True or False decides without
    measuring (still checked against the plain module).
    """

    compile: bool = False
    warm_batch: int = 64
    channels_last: bool | None = None
    # BN layers the load keeps a drift probe of (`drift.py`), cut from the plain module before
    # it is dropped; 0: none (BNSERVE_DRIFT_SAMPLE_RATE 0).
    drift_layers: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> OptimizeOptions:
        return cls(
            compile=settings.COMPILE,
            warm_batch=settings.MAX_BATCH_SIZE,
            drift_layers=DRIFT_LAYERS if settings.DRIFT_SAMPLE_RATE > 0 else 0,
        )


@dataclass
class OptimizationReport:
    """What was applied to a served module, and the check that proved it."""

    bn_folded: int = 0
    bn_left: int = 0
    channels_last: bool = False
    compiled: bool = False
    max_abs_diff: float = 0.0
    fallback: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The CUDA fp32 precision in force where the checks ran, and the bound it gave them.
    fp32_precision: str = field(default_factory=current_precision)
    max_abs_diff_allowed: float = field(default_factory=lambda: tolerances().optimize_abs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bn_folded": self.bn_folded,
            "bn_left": self.bn_left,
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_diff_allowed": self.max_abs_diff_allowed,
            "fp32_precision": self.fp32_precision,
            "fallback": self.fallback,
            "timings_ms": dict(self.timings_ms),
        }

    def summary(self) -> str:
        text = (
            f"{self.bn_folded} BatchNorm folded ({self.bn_left} left), "
            f"channels_last={self.channels_last}, compiled={self.compiled}, "
            f"max abs diff {self.max_abs_diff:.3g}"
        )
        return text + (f"; fallback: {self.fallback}" if self.fallback else "")


class _Run:
    """The probes, the plain module's answers to them, and the report being filled."""

    def __init__(
        self, plain: nn.Module, input_shape: tuple[int, ...], device: torch.device
    ) -> None:
        generator = torch.Generator().manual_seed(PROBE_SEED)
        self.device = device
        self.probes = [
            torch.randn((n, *input_shape), generator=generator).to(device)
            for n in (PROBE_SAMPLES, 1)
        ]
        with torch.inference_mode():
            self.expected = [plain(p) for p in self.probes]
        self.report = OptimizationReport()
        self.fallbacks: list[str] = []

    def max_diff(self, module: nn.Module) -> float:
        """Largest absolute difference from the plain module over the probes (NaN if any)."""
        worst = 0.0
        with torch.inference_mode():
            for probe, expected in zip(self.probes, self.expected, strict=True):
                out = module(probe)
                if out.shape != expected.shape:
                    return float("inf")
                diff = (out.float() - expected.float()).abs().max().item()
                if not diff <= worst:  # also keeps a NaN
                    worst = diff
        return worst

    def accept(self, step: str, module: nn.Module) -> bool:
        """Whether `module` answers like the plain one; if not, record why it is dropped."""
        diff = self.max_diff(module)
        bound = self.report.max_abs_diff_allowed
        if diff <= bound:
            self.report.max_abs_diff = diff
            return True
        self.fallbacks.append(
            f"{step} moved the outputs by {diff:.3g} (more than {bound:g} from the plain "
            "eval module on the probe batch), so it is not applied"
        )
        return False

    def step(self, name: str, fn: Callable[[], nn.Module], current: nn.Module) -> nn.Module:
        """Run one step, timed; one that raises (a plugin's forward that cannot take the new
        layout, say) leaves `current` serving and says why."""
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            self.fallbacks.append(
                f"{name} failed ({type(exc).__name__}: {_first_line(exc)}), so it is not applied"
            )
            return current
        finally:
            self.report.timings_ms[name] = _ms(time.perf_counter() - start)


def optimize(
    plain: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    options: OptimizeOptions | None = None,
) -> tuple[nn.Module, OptimizationReport]:
    """The fastest module that answers like the gated eval-mode `plain`, and what was applied.

    `plain` itself is never modified; it is returned unchanged when nothing could be applied.
    Blocking (forward passes, maybe a compile), so call it from a thread.
    """
    options = options or OptimizeOptions()
    start = time.perf_counter()
    run = _Run(plain, input_shape, device)
    served = run.step("fold", lambda: _fold(plain, run), plain)
    folded = served
    served = run.step(
        "channels_last",
        lambda: _choose_memory_format(folded, input_shape, device, options.channels_last, run),
        folded,
    )
    if options.compile:
        uncompiled = served
        served = run.step(
            "compile", lambda: _compile(uncompiled, input_shape, options, run), uncompiled
        )
    if served is not plain:
        try:
            run_gate(served, input_shape, device)
        except Exception as exc:
            why = str(exc) if isinstance(exc, GateFailed) else f"{type(exc).__name__}: {exc}"
            run.fallbacks.append(f"the optimized module failed the gate ({why}); serving it plain")
            served = plain
            run.report = OptimizationReport(timings_ms=run.report.timings_ms)
    report = run.report
    report.bn_left = count_batchnorm(served)
    report.fallback = "; ".join(run.fallbacks) or None
    report.timings_ms["total"] = _ms(time.perf_counter() - start)
    return served, report


def _fold(plain: nn.Module, run: _Run) -> nn.Module:
    """`plain` with every BatchNorm that follows a Conv/Linear folded into it, if that checks."""
    try:
        folded, count = fold_batchnorm(plain, run.probes[-1])
    except NotFoldable as exc:
        run.fallbacks.append(f"BatchNorm folding skipped: {exc}")
        return plain
    if count == 0 or not run.accept("BatchNorm folding", folded):
        return plain
    run.report.bn_folded = count
    return folded


def _choose_memory_format(
    module: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    wanted: bool | None,
    run: _Run,
) -> nn.Module:
    """Switch conv weights to channels_last when a short interleaved timing says it pays."""
    conv, memory_format = _CONVS_BY_RANK.get(len(input_shape) + 1, (None, None))
    if conv is None or memory_format is None or wanted is False:
        return module
    if not any(isinstance(m, conv) for m in module.modules()):
        return module
    # A copy, so both layouts can be timed in alternation (the machine drifts) and the loser
    # dropped; `plain` in particular must never change layout under the check.
    candidate: nn.Module = copy.deepcopy(module)
    # Module.to(memory_format=...) is documented but missing from torch's type stubs.
    candidate.to(memory_format=memory_format)  # type: ignore[call-overload]
    if wanted is None:
        x = torch.randn((TIMING_BATCH, *input_shape), generator=torch.Generator().manual_seed(2))
        contiguous_ms, channels_last_ms = _time_pair(module, candidate, x.to(device), device)
        run.report.timings_ms["contiguous_forward"] = contiguous_ms
        run.report.timings_ms["channels_last_forward"] = channels_last_ms
        if channels_last_ms > CHANNELS_LAST_MAX_RATIO * contiguous_ms:
            return module
    if not run.accept("channels_last", candidate):
        return module
    run.report.channels_last = True
    return candidate


def _compile(
    module: nn.Module, input_shape: tuple[int, ...], options: OptimizeOptions, run: _Run
) -> nn.Module:
    """`torch.compile(module)`, warmed at batch 1 and at the largest batch, if it checks."""
    try:
        compiled = cast(nn.Module, torch.compile(module))
        with torch.inference_mode():
            # Batch 1 is always specialised by dynamo; the largest batch then compiles the
            # dynamic-batch graph that every size from 2 up reuses.
            for n in sorted({1, max(2, options.warm_batch)}):
                compiled(torch.zeros((n, *input_shape), device=run.device))
    except Exception as exc:
        run.fallbacks.append(
            f"torch.compile failed ({type(exc).__name__}: {_first_line(exc)}); serving uncompiled"
        )
        return module
    if not run.accept("torch.compile", compiled):
        return module
    run.report.compiled = True
    return compiled


def _time_pair(
    a: nn.Module, b: nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """Median forward time of `a` and `b` in ms, in alternating order, within the budget."""
    times_a: list[float] = []
    times_b: list[float] = []
    with torch.inference_mode():
        a(x)  # warm-up: first-call allocations and oneDNN primitive caches
        b(x)
        deadline = time.perf_counter() + TIMING_BUDGET_S
        for i in range(TIMING_ROUNDS):
            order = ((a, times_a), (b, times_b))
            for module, times in order if i % 2 == 0 else order[::-1]:
                _sync(device)
                t0 = time.perf_counter()
                module(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
    return _ms(statistics.median(times_a)), _ms(statistics.median(times_b))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"
