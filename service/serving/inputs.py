"""Turning a JSON `inputs` value into a float32 batch, with errors that name the expected shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.errors import InvalidInput


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def parse_inputs(
    inputs: Any, input_shape: tuple[int, ...], max_batch: int
) -> tuple[torch.Tensor, bool]:
    """A (N, *input_shape) tensor and whether the request sent one bare sample."""
    expected = (
        f"expected one sample of shape {_shape_text(input_shape)} or a batch of shape "
        f"N x {_shape_text(input_shape)}"
    )
    try:
        array = np.asarray(inputs)
    except ValueError:
        raise InvalidInput(
            f"inputs are ragged (nested lists of different lengths); {expected}",
            code="invalid_input_shape",
            expected_shape=list(input_shape),
        ) from None
    if array.dtype.kind not in "iuf":
        what = {"U": "strings", "S": "strings", "b": "booleans", "O": "nulls or mixed values"}
        raise InvalidInput(
            f"inputs must be numbers, found {what.get(array.dtype.kind, array.dtype.name)}; "
            f"{expected}",
            code="invalid_input_type",
            expected_shape=list(input_shape),
        )
    if array.ndim >= 1 and array.shape[0] == 0:
        raise InvalidInput(
            f"inputs are an empty batch; {expected}",
            code="empty_batch",
            expected_shape=list(input_shape),
        )
    if array.shape == input_shape:
        array, single = array[None], True
    elif array.shape[1:] == input_shape:
        single = False
    else:
        raise InvalidInput(
            f"inputs have shape {_shape_text(array.shape) or 'scalar'}; {expected}",
            code="invalid_input_shape",
            expected_shape=list(input_shape),
            found_shape=list(array.shape),
        )
    if array.shape[0] > max_batch:
        raise InvalidInput(
            f"batch of {array.shape[0]} samples is above the limit of {max_batch} "
            f"(BNSERVE_MAX_REQUEST_BATCH); split it ({expected})",
            code="batch_too_large",
            limit=max_batch,
            expected_shape=list(input_shape),
        )
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidInput(
            f"inputs contain {bad} non-finite value(s) (NaN, Infinity, or beyond float32 range); "
            f"{expected} of finite numbers",
            code="non_finite_input",
            expected_shape=list(input_shape),
        )
    return torch.from_numpy(np.ascontiguousarray(array)), single
