"""Check a state_dict against an architecture and build the canonical copy that gets stored.

Every problem is collected before anything is refused, so one upload tells the client all that is
wrong with it. What passes is what `model.load_state_dict(strict=True)` will take, in the model's
own dtypes, key order and storage layout, ready for safetensors (which refuses shared storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from service.errors import InvalidCheckpoint, shorten

# `module.` from nn.DataParallel / DistributedDataParallel, `_orig_mod.` from torch.compile's
# OptimizedModule; both wrap the real model, and can be stacked in either order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
# Order decides the error's `code`: the first category present wins.
_CODES = {
    "missing": "missing_keys",
    "unexpected": "unexpected_keys",
    "shape_mismatch": "shape_mismatch",
    "dtype": "bad_dtype",
    "layout": "bad_layout",
    "non_finite": "non_finite",
    "negative_running_var": "negative_running_var",
    "negative_num_batches_tracked": "negative_num_batches_tracked",
}
_SHOWN = 3


class RenamedPrefix(BaseModel):
    prefix: str
    count: int


class DtypeCast(BaseModel):
    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    key: str
    from_: str = Field(alias="from")
    to: str


class BNLayerReport(BaseModel):
    """One BatchNorm layer's running statistics, which eval-mode predictions depend on."""

    name: str
    kind: str
    num_features: int
    num_batches_tracked: int | None
    running_mean_abs_mean: float
    running_var_mean: float
    stats_trained: bool


class CheckpointReport(BaseModel):
    """What loading a checkpoint found, returned to the client as the version's `report`."""

    renamed: list[RenamedPrefix] = []
    unwrapped_from: str | None = None
    format: str | None = None
    num_tensors: int
    num_parameters: int
    dtype_casts: list[DtypeCast] = []
    bn_layers: list[BNLayerReport] = []
    warnings: list[str] = []


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], CheckpointReport]:
    """Refuse a state_dict `model` cannot serve, else return its canonical copy and a report."""
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    tensors, renamed = _strip_prefixes(dict(state_dict), list(expected))

    errors: list[dict[str, Any]] = []
    casts: list[DtypeCast] = []
    filled: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if key in tensors:
            continue
        if key.rsplit(".", 1)[-1] == "num_batches_tracked":
            # Checkpoints from PyTorch < 0.4.1 have no such buffer; BatchNorm's own
            # _load_from_state_dict fills it with 0, and so do we.
            filled.append(key)
        else:
            errors.append({"key": key, "problem": "missing", "expected": list(ref.shape)})
    errors += [
        {"key": key, "problem": "unexpected", "found": _shape(t)}
        for key, t in tensors.items()
        if key not in expected
    ]

    for key, ref in expected.items():
        if key in filled:
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype)
            continue
        found = tensors.get(key)
        if found is None:
            continue
        if found.is_nested or found.layout != torch.strided:
            # Sparse, nested (or other non-dense) tensors: the dtype may be right, the layout is
            # not. Checked before the shape, which a nested tensor does not have (its `.shape`
            # raises: a 500 once).
            errors.append(
                {"key": key, "problem": "layout", "expected": "strided", "found": _layout(found)}
            )
            continue
        if found.shape != ref.shape:
            errors.append(
                {
                    "key": key,
                    "problem": "shape_mismatch",
                    "expected": list(ref.shape),
                    "found": list(found.shape),
                }
            )
            continue
        refused = _dtype_refusal(found, ref)
        if refused is not None:
            errors.append({"key": key, "problem": "dtype", "expected": _name(ref.dtype), **refused})
            continue
        # One copy that casts, moves to the CPU, detaches and un-shares storage at once.
        value = torch.empty(ref.shape, dtype=ref.dtype).copy_(found.detach())
        if found.dtype != ref.dtype:
            casts.append(DtypeCast(key=key, from_=_name(found.dtype), to=_name(ref.dtype)))
        errors += _value_problems(key, value)
        out[key] = value

    if errors:
        for error in errors:  # keys come from the upload: a crafted one may be megabytes long
            error["key"] = shorten(error["key"])
        raise InvalidCheckpoint(_summary(errors), code=_code(errors), errors=errors)

    bn_layers, warnings = _batchnorm_report(model, out, filled)
    if filled:
        warnings.insert(
            0,
            f"{len(filled)} num_batches_tracked buffer(s) missing ({_keys(filled)}), as in "
            "checkpoints from PyTorch < 0.4.1; filled with 0.",
        )
    report = CheckpointReport(
        renamed=renamed,
        num_tensors=len(out),
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype_casts=casts,
        bn_layers=bn_layers,
        warnings=warnings,
    )
    return out, report


def _strip_prefixes(
    tensors: dict[str, torch.Tensor], model_keys: list[str]
) -> tuple[dict[str, torch.Tensor], list[RenamedPrefix]]:
    """Remove wrapper prefixes carried by every key (and not by the architecture's own keys)."""
    renamed: list[RenamedPrefix] = []
    while tensors:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors) and not all(
                k.startswith(prefix) for k in model_keys
            ):
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
                renamed.append(RenamedPrefix(prefix=prefix, count=len(tensors)))
                break
        else:
            break
    return tensors, renamed


def _layout(t: torch.Tensor) -> str:
    return "nested" if t.is_nested else str(t.layout).removeprefix("torch.")


def _shape(t: torch.Tensor) -> list[int] | str:
    """A tensor's shape for an error; a nested tensor has none, only its layout."""
    return _layout(t) if t.is_nested else list(t.shape)


def _dtype_refusal(found: torch.Tensor, ref: torch.Tensor) -> dict[str, str] | None:
    """Floats may change precision, integer buffers may widen; nothing else changes kind."""
    # Quantized tensors fail on their dtype below; meta tensors hold no values at all.
    if found.device.type == "meta":
        return {"found": _name(found.dtype), "device": "meta"}
    if ref.is_floating_point():
        accepted = found.dtype in _FLOAT_DTYPES
    elif ref.dtype in _INT_DTYPES:
        accepted = found.dtype in _INT_DTYPES
    else:
        accepted = found.dtype == ref.dtype
    return None if accepted else {"found": _name(found.dtype)}


def _value_problems(key: str, value: torch.Tensor) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    if value.is_floating_point():
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        if nan or inf:
            problems.append({"key": key, "problem": "non_finite", "nan": nan, "inf": inf})
    if key.rsplit(".", 1)[-1] == "num_batches_tracked" and int((value < 0).sum()):
        # With momentum=None BatchNorm averages with factor 1 / num_batches_tracked, so a count
        # of -1 makes the next train-mode step divide by zero (and any negative one is no count).
        problems.append(
            {"key": key, "problem": "negative_num_batches_tracked", "found": int(value.min())}
        )
    if key.rsplit(".", 1)[-1] == "running_var":
        negative = int((value < 0).sum())
        if negative:
            problems.append(
                {
                    "key": key,
                    "problem": "negative_running_var",
                    "count": negative,
                    "min": float(value.min()),
                }
            )
    return problems


def _batchnorm_report(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], filled: list[str]
) -> tuple[list[BNLayerReport], list[str]]:
    layers: list[BNLayerReport] = []
    stateless: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        prefix = f"{name}." if name else ""
        mean = tensors.get(f"{prefix}running_mean")
        var = tensors.get(f"{prefix}running_var")
        if mean is None or var is None:
            stateless.append(name or type(module).__name__)
            continue
        count_key = f"{prefix}num_batches_tracked"
        count = tensors.get(count_key)
        tracked = int(count) if count is not None and count_key not in filled else None
        untouched = bool((mean == 0).all()) and bool((var == 1).all())
        layers.append(
            BNLayerReport(
                name=name,
                kind=type(module).__name__,
                num_features=module.num_features,
                num_batches_tracked=tracked,
                running_mean_abs_mean=float(mean.double().abs().mean()) if mean.numel() else 0.0,
                running_var_mean=float(var.double().mean()) if var.numel() else 0.0,
                # Judged by the values alone: a zero counter with moved statistics is a
                # legacy checkpoint (or bnserve's own stored copy of one), not untrained.
                stats_trained=not untouched,
            )
        )

    warnings: list[str] = []
    untrained = [layer.name for layer in layers if not layer.stats_trained]
    if untrained:
        warnings.append(
            f"{len(untrained)} of {len(layers)} BatchNorm layer(s) have default running "
            f"statistics (running_mean 0 and running_var 1 everywhere): {_keys(untrained)}. "
            "Predictions will use these defaults instead of statistics of the training data; "
            "recalibrate them with train-mode forward passes over representative data (a BN "
            "recalibration job) before serving."
        )
    if stateless:
        warnings.append(
            f"BatchNorm layer(s) {_keys(stateless)} keep no running statistics "
            "(track_running_stats=False): even in eval mode a prediction depends on its batch."
        )
    return layers, warnings


def _code(errors: list[dict[str, Any]]) -> str:
    present = {e["problem"] for e in errors}
    return next(code for problem, code in _CODES.items() if problem in present)


def _summary(errors: list[dict[str, Any]]) -> str:
    """One sentence: a count per category, in code order, with the first few keys of each."""
    parts: list[str] = []
    for problem in _CODES:
        group = [e for e in errors if e["problem"] == problem]
        if not group:
            continue
        n = len(group)
        if problem == "missing":
            parts.append(f"{n} key{'s' * (n != 1)} missing ({_keys(e['key'] for e in group)})")
        elif problem == "unexpected":
            parts.append(f"{n} unexpected key{'s' * (n != 1)} ({_keys(e['key'] for e in group)})")
        elif problem == "shape_mismatch":
            shown = "; ".join(
                f"{e['key']}: expected {e['expected']}, found {e['found']}" for e in group[:_SHOWN]
            )
            more = f"; {n - _SHOWN} more" if n > _SHOWN else ""
            parts.append(f"{n} shape mismatch{'es' * (n != 1)} ({shown}{more})")
        elif problem == "dtype":
            shown = "; ".join(
                f"{e['key']}: {e['found']}"
                + (" on the meta device (no data)" if e.get("device") == "meta" else "")
                + f", expected {e['expected']}"
                for e in group[:_SHOWN]
            )
            more = f"; {n - _SHOWN} more" if n > _SHOWN else ""
            parts.append(f"{n} tensor{'s' * (n != 1)} of a dtype it does not take ({shown}{more})")
        elif problem == "layout":
            shown = "; ".join(f"{e['key']}: {e['found']}" for e in group[:_SHOWN])
            more = f"; {n - _SHOWN} more" if n > _SHOWN else ""
            parts.append(
                f"{n} tensor{'s' * (n != 1)} not in the dense (strided) layout ({shown}{more}); "
                "save them with .to_dense()"
            )
        elif problem == "non_finite":
            parts.append(
                f"{n} tensor{'s' * (n != 1)} with NaN or Inf ({_keys(e['key'] for e in group)})"
            )
        elif problem == "negative_running_var":
            parts.append(
                f"{n} running_var{'s' * (n != 1)} with negative values "
                f"({_keys(e['key'] for e in group)})"
            )
        else:
            parts.append(
                f"{n} negative num_batches_tracked ({_keys(e['key'] for e in group)}); a count "
                "of batches is never below 0"
            )
    hint = _prefix_hint(errors)
    return f"The checkpoint does not fit the architecture: {', '.join(parts)}.{hint}"


def _prefix_hint(errors: list[dict[str, Any]]) -> str:
    """Spot keys nested one level deeper than the model's, e.g. a LightningModule's `self.model`."""
    missing = {e["key"] for e in errors if e["problem"] == "missing"}
    unexpected = [e["key"] for e in errors if e["problem"] == "unexpected"]
    heads = {k.split(".", 1)[0] for k in unexpected}
    if (
        missing
        and len(heads) == 1
        and all("." in k for k in unexpected)
        and any(k.split(".", 1)[1] in missing for k in unexpected)
    ):
        return (
            f" Its keys carry a '{heads.pop()}.' prefix the architecture does not have; save "
            "the inner model's state_dict instead."
        )
    return ""


def _keys(keys: Iterable[str]) -> str:
    names = list(keys)
    shown = ", ".join(names[:_SHOWN])
    return f"{shown}, and {len(names) - _SHOWN} more" if len(names) > _SHOWN else shown


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_dict_to_safetensors(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a canonical state_dict (contiguous, unshared tensors) for the store."""
    data: bytes = safetensors.torch.save(dict(state_dict))
    return data


def state_dict_from_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """Read the store's bytes back; safetensors runs no code, so no gate is needed."""
    tensors: dict[str, torch.Tensor] = safetensors.torch.load(data)
    return tensors
