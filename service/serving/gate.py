"""The gate a loaded version passes before it may serve.

It proves the BatchNorm promise on the real object: every module is in eval mode, a probe batch
gives finite outputs, each probe sample gives the same output alone as inside the batch (a model
left in train mode differs by ~0.1-1, kernel rounding by ~1e-7; allclose at rtol 1e-4, atol
1e-5, or 1e-2 and 1e-3 under TF32, `precision.py`), and the forward passes leave the BN running
statistics untouched. A BN layer without running statistics is refused first (it would make
every output batch-dependent), and anything the probe raises is the gate's own refusal, not a
500: a forward that cannot run on the architecture's own input shape cannot serve.
"""

from __future__ import annotations

import torch
from torch import nn

from service.architectures import require_running_stats
from service.errors import GateFailed
from service.serving.precision import tolerances

PROBE_SAMPLES = 4


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm running statistic, to compare before and after."""
    out: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            for buf_name, buf in sub.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{name}.{buf_name}"] = buf.detach().clone()
    return out


def run_gate(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> None:
    """Raise GateFailed, saying why, unless the module may serve."""
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise GateFailed(f"modules still in train mode: {', '.join(training[:5])}")
    require_running_stats(module, None, GateFailed)
    try:
        _probe(module, input_shape, device)
    except GateFailed:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise GateFailed(
            f"the probe batch of {PROBE_SAMPLES} random inputs of shape {list(input_shape)} "
            f"raised {type(exc).__name__}: {text[0][:300] if text else 'no message'}",
            error_type=type(exc).__name__,
        ) from None


def _probe(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> None:
    tol = tolerances()  # looser under TF32 (precision.py)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((PROBE_SAMPLES, *input_shape), generator=generator).to(device)
    before = bn_buffers(module)
    with torch.inference_mode():
        batch_out = module(probe)
        if not torch.isfinite(batch_out).all():
            raise GateFailed("the probe batch gave non-finite outputs (NaN or Inf)")
        for i in range(PROBE_SAMPLES):
            alone = module(probe[i : i + 1])
            if not torch.allclose(
                alone, batch_out[i : i + 1], rtol=tol.gate_rtol, atol=tol.gate_atol
            ):
                diff = (alone - batch_out[i : i + 1]).abs().max().item()
                raise GateFailed(
                    f"probe sample {i} gives a different output alone than inside a batch "
                    f"(max difference {diff:.3g}); a served model's outputs must not depend on "
                    "the other samples in its batch",
                    max_difference=diff,
                )
    after = bn_buffers(module)
    moved = [key for key, value in before.items() if not torch.equal(value, after[key])]
    if moved:
        raise GateFailed(f"inference changed BatchNorm statistics: {', '.join(moved[:5])}")
