"""The fp32 precision of CUDA matmuls and convolutions, chosen explicitly, and the tolerances
that follow from it.

PyTorch lets cuDNN run fp32 convolutions in TF32 by default (`torch.backends.cudnn.conv.
fp32_precision == "tf32"` in torch 2.13; matmuls default to IEEE). TF32 keeps 10 mantissa bits
(unit roundoff 2^-11, about 5e-4), which moves outputs by ~1e-3 relative on Ampere and later GPUs:
served outputs would no longer match eval-mode fp32, and the gate's 1e-4 batch-invariance check
and the folding check could refuse healthy models. So every bnserve process (the API and each
worker) sets the precision at start from `BNSERVE_FP32_PRECISION`: `ieee` (the default: true fp32
everywhere) or `tf32` (faster on tensor cores), and the checks' tolerances follow the precision
read back from torch, 10 times looser under TF32 (still 10 times tighter than a model left in
train mode, which moves outputs by 0.1-1). On a CPU the setting changes no result, only the
tolerances. It is set through the `fp32_precision` API of torch >= 2.9: the `allow_tf32` flags
it replaces are to be deprecated, and reading them after a mix of both APIs raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Precision = Literal["ieee", "tf32"]


@dataclass(frozen=True)
class Tolerances:
    """How far outputs may move where bnserve compares two computations of the same thing."""

    gate_rtol: float  # a sample alone vs. inside the probe batch (`gate.py`)
    gate_atol: float
    optimize_abs: float  # a folded / channels_last / compiled module vs. the plain one


TOLERANCES: dict[Precision, Tolerances] = {
    # Kernel rounding in fp32 moves outputs by ~1e-7; folding resnet18 moves its logits ~5e-7.
    "ieee": Tolerances(gate_rtol=1e-4, gate_atol=1e-5, optimize_abs=1e-4),
    # TF32's ~1e-3 relative error, with a factor of 10 to spare.
    "tf32": Tolerances(gate_rtol=1e-2, gate_atol=1e-3, optimize_abs=1e-2),
}


def _backends() -> dict[str, Any]:
    """The CUDA backends whose fp32 work may run in TF32, by name."""
    return {
        "cuda.matmul": torch.backends.cuda.matmul,
        "cudnn.conv": torch.backends.cudnn.conv,  # type: ignore[attr-defined]
        "cudnn.rnn": torch.backends.cudnn.rnn,
    }


def apply_precision(precision: Precision) -> None:
    """Set every CUDA backend's fp32 precision (process-wide; harmless without CUDA)."""
    for backend in _backends().values():
        backend.fp32_precision = precision


def backend_precisions() -> dict[str, str]:
    """Each backend's fp32 precision as torch reports it now."""
    return {name: str(backend.fp32_precision) for name, backend in _backends().items()}


def current_precision() -> Precision:
    """`tf32` if any CUDA backend may use TF32 now, else `ieee` (read back from torch)."""
    return "tf32" if "tf32" in backend_precisions().values() else "ieee"


def tolerances() -> Tolerances:
    """The tolerances for the precision in effect in this process."""
    return TOLERANCES[current_precision()]
