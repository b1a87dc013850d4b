"""Prediction inputs to a float32 batch, with errors that name the expected shape.

Every way a batch arrives (JSON lists, a `.npy` body, raw little-endian float32 with `X-Shape`,
the v2 protocol's tensors) ends in `check_array`, so the checks and error codes are the same
whatever the encoding. Binary bodies are decoded with `np.frombuffer`/`np.load`: no Python lists.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from service.errors import InvalidInput


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _expected(input_shape: tuple[int, ...]) -> str:
    return (
        f"expected one sample of shape {shape_text(input_shape)} or a batch of shape "
        f"N x {shape_text(input_shape)}"
    )


def parse_inputs(
    inputs: Any, input_shape: tuple[int, ...], max_batch: int
) -> tuple[torch.Tensor, bool]:
    """A (N, *input_shape) tensor from a JSON `inputs` value, and whether it was one bare sample."""
    try:
        array = np.asarray(inputs)
    except ValueError:
        raise InvalidInput(
            f"inputs are ragged (nested lists of different lengths); {_expected(input_shape)}",
            code="invalid_input_shape",
            expected_shape=list(input_shape),
        ) from None
    return check_array(array, input_shape, max_batch, allow_bare=True)


def check_array(
    array: np.ndarray[Any, Any],
    input_shape: tuple[int, ...],
    max_batch: int,
    *,
    allow_bare: bool = False,
) -> tuple[torch.Tensor, bool]:
    """The shape, type, size and finiteness checks every input passes, whatever its encoding."""
    expected = _expected(input_shape)
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
    single = False
    if allow_bare and array.shape == input_shape:
        array, single = array[None], True
    elif array.shape[1:] != input_shape or array.ndim != len(input_shape) + 1:
        raise InvalidInput(
            f"inputs have shape {shape_text(array.shape) or 'scalar'}; {expected}",
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
    if array.dtype != np.float32:
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
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")  # torch wants its own, writable copy
    return torch.from_numpy(array), single


def decode_npy(
    body: bytes, input_shape: tuple[int, ...], max_batch: int
) -> tuple[torch.Tensor, bool]:
    """A `.npy` body (`application/x-npy`): a batch, never unpickled."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInput(
            f"body is not a readable .npy array without pickles ({exc}); "
            f"{_expected(input_shape)}",
            code="invalid_npy",
            expected_shape=list(input_shape),
        ) from None
    if not isinstance(array, np.ndarray):
        raise InvalidInput("body is a .npz archive, not one .npy array", code="invalid_npy")
    return check_array(array, input_shape, max_batch)


def parse_shape_header(value: str | None, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """`X-Shape: 8,3,32,32` (the batch shape of a raw float32 body)."""
    if value is None:
        raise InvalidInput(
            "a raw float32 body (application/octet-stream) needs its batch shape in the X-Shape "
            f"header, e.g. 'X-Shape: 1,{','.join(map(str, input_shape))}'",
            code="missing_shape",
            expected_shape=list(input_shape),
        )
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 0 or d > 1 << 31 for d in shape):
        raise InvalidInput(
            f"X-Shape {value[:64]!r} is not a comma-separated list of dimensions, "
            f"e.g. '1,{','.join(map(str, input_shape))}'",
            code="invalid_shape_header",
            expected_shape=list(input_shape),
        )
    return shape


def decode_raw_float32(
    body: bytes, shape: tuple[int, ...], input_shape: tuple[int, ...], max_batch: int
) -> tuple[torch.Tensor, bool]:
    """Raw little-endian float32 bytes with the batch shape given apart (`X-Shape`)."""
    count = 1
    for d in shape:
        count *= d
    if count * 4 != len(body):
        raise InvalidInput(
            f"X-Shape {shape_text(shape)} needs {count * 4} bytes of float32, the body has "
            f"{len(body)}",
            code="invalid_input_shape",
            expected_shape=list(input_shape),
            found_shape=list(shape),
        )
    array = np.frombuffer(body, dtype="<f4").reshape(shape)
    return check_array(array, input_shape, max_batch)
