"""Read uploaded datasets (`.npz`, `.safetensors`) into tensors, refusing what cannot train.

Every refusal is an `InvalidDataset` whose `code` names the problem, so the HTTP layer can answer
422 with a detail the uploader can act on. Nothing here unpickles: `.npz` files are read with
`allow_pickle=False` and safetensors is pickle-free by design.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open

from service.errors import InvalidDataset, shorten

# Zip local-file header and the end-of-central-directory record (an empty zip has only the latter);
# numpy.load recognises `.npz` by the same two prefixes.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# safetensors: an 8-byte little-endian header length, then that many bytes of JSON starting with `{`
# (https://github.com/huggingface/safetensors#format).
_SAFETENSORS_LEN_BYTES = 8

# `.npz` members may be deflated (np.savez_compressed), so a small upload can expand a
# thousandfold; refuse before decompressing anything larger than this.
DEFAULT_MAX_ARRAY_BYTES = 4 * 2**30

_ARRAYS = ("x", "y")
# Member names echoed in an error; a crafted file may hold thousands of them.
_NAMES_SHOWN = 20


@dataclass(frozen=True)
class Dataset:
    """Samples `x` (float32, N x sample shape); `y` int64 class ids or float32 targets."""

    x: torch.Tensor
    y: torch.Tensor
    y_kind: Literal["class", "target"]

    @property
    def num_samples(self) -> int:
        """Number of samples N, the length of both `x` and `y`."""
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, what a model's `input_shape` must equal."""
        return tuple(int(d) for d in self.x.shape[1:])


def read_dataset(
    path: Path, filename: str, *, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
) -> Dataset:
    """Load and check arrays `x` and `y` so a training job never starts on data it cannot use."""
    try:
        kind = _sniff_format(path)
    except OSError as e:
        raise _unreadable(filename, e) from e
    if kind is None:
        raise InvalidDataset(
            f"{shorten(filename)!r} is neither an .npz (zip) nor a .safetensors file; save the "
            "arrays with numpy.savez(f, x=x, y=y) or safetensors' save_file({'x': x, 'y': y}, f)",
            code="unreadable_dataset",
        )
    if kind == "npz":
        x, y = _load_npz(path, filename, max_array_bytes)
    else:
        x, y = _load_safetensors(path, filename)
    return _validated(x, y)


def check_dataset_for_model(
    ds: Dataset, *, input_shape: tuple[int, ...], task: str, num_outputs: int
) -> None:
    """Refuse a dataset whose samples or labels the model cannot take, before a job is queued."""
    expected = tuple(int(d) for d in input_shape)
    if ds.sample_shape != expected:
        raise InvalidDataset(
            f"samples have shape {list(ds.sample_shape)} but the model takes {list(expected)} "
            "per sample; x must be N x input_shape",
            code="shape_mismatch",
            expected=list(expected),
            found=list(ds.sample_shape),
        )
    if task == "classification":
        if ds.y_kind != "class":
            raise InvalidDataset(
                "a classifier needs integer class ids in y; found floating-point targets",
                code="bad_labels",
            )
        max_id = int(ds.y.max())
        if max_id >= num_outputs:
            raise InvalidDataset(
                f"y has class id {max_id} but the model has {num_outputs} classes "
                f"(ids 0..{num_outputs - 1})",
                code="bad_labels",
                max_label=max_id,
                num_classes=num_outputs,
            )
    elif task == "regression":
        if ds.y_kind != "target":
            raise InvalidDataset(
                "a regression model needs floating-point targets in y; found integer class ids "
                "(save y as float32 if they are numeric targets)",
                code="bad_targets",
            )
        per_sample = 1 if ds.y.ndim == 1 else int(ds.y.shape[1])
        if per_sample != num_outputs:
            raise InvalidDataset(
                f"y has {per_sample} target(s) per sample but the model has {num_outputs} "
                f"outputs; y must have shape (N, {num_outputs})"
                + (" or (N,)" if num_outputs == 1 else ""),
                code="bad_targets",
                expected=num_outputs,
                found=per_sample,
            )
    else:
        raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")


def _sniff_format(path: Path) -> Literal["npz", "safetensors"] | None:
    """Tell the format from the bytes, since an upload's extension is only the client's claim."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_SAFETENSORS_LEN_BYTES + 1)
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    if len(head) == _SAFETENSORS_LEN_BYTES + 1 and head[-1:] == b"{":
        header_len = int.from_bytes(head[:_SAFETENSORS_LEN_BYTES], "little")
        if _SAFETENSORS_LEN_BYTES + header_len <= size:
            return "safetensors"
    return None


def _missing(filename: str, names: list[str]) -> InvalidDataset:
    found = [shorten(name) for name in names[:_NAMES_SHOWN]]
    return InvalidDataset(
        f"{shorten(filename)!r} must hold arrays named 'x' (samples) and 'y' (labels); found "
        f"{sorted(found) or 'none'}",
        code="missing_arrays",
        found=sorted(found),
    )


def _unreadable(filename: str, err: BaseException) -> InvalidDataset:
    return InvalidDataset(
        f"could not read {shorten(filename)!r}: {shorten(str(err))}", code="unreadable_dataset"
    )


def _load_npz(path: Path, filename: str, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Only x and y are read: other members are never decompressed, so whatever they hold
    # (object arrays included) costs nothing and runs nothing.
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i.filename for i in zf.infolist()]
            sizes = {
                i.filename.removesuffix(".npy"): i.file_size
                for i in zf.infolist()
                if i.filename.endswith(".npy")
            }
    except Exception as e:  # BadZipFile, OSError, unsupported compression: all unreadable
        raise _unreadable(filename, e) from e
    not_npy = sorted(name for name in _ARRAYS if name not in sizes and name in members)
    if not_npy:
        # numpy.load hands back such a member's raw bytes instead of an array.
        raise InvalidDataset(
            f"{shorten(filename)!r}: member(s) {not_npy} are not .npy arrays; save the arrays "
            "with numpy.savez(f, x=x, y=y), which stores them as x.npy and y.npy",
            code="invalid_dataset",
            members=not_npy,
        )
    if any(name not in sizes for name in _ARRAYS):
        raise _missing(filename, [m.removesuffix(".npy") for m in members])
    too_big = {name: sizes[name] for name in _ARRAYS if sizes[name] > max_bytes}
    if too_big:
        raise InvalidDataset(
            f"arrays {sorted(too_big)} would take {max(too_big.values())} bytes once "
            f"decompressed; the limit is {max_bytes}",
            code="dataset_too_large",
            limit_bytes=max_bytes,
        )
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in _ARRAYS:
                value = npz[f"{name}.npy"]
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"member {name}.npy is not a .npy array")
                arrays[name] = value
    except ValueError as e:
        # numpy.lib.format.read_array: "Object arrays cannot be loaded when allow_pickle=False";
        # loading them would unpickle arbitrary objects.
        if "allow_pickle" in str(e):
            raise InvalidDataset(
                f"{shorten(filename)!r} holds an object array; object arrays are not accepted "
                "because loading them runs pickle. Save x and y as numeric arrays",
                code="bad_dtype",
            ) from e
        raise _unreadable(filename, e) from e
    except Exception as e:  # any parse failure of an untrusted file means "unreadable"
        raise _unreadable(filename, e) from e
    return _from_numpy("x", arrays["x"]), _from_numpy("y", arrays["y"])


def _from_numpy(name: str, arr: npt.NDArray[np.generic]) -> torch.Tensor:
    # kinds: f float, i/u integer; b bool, c complex, O object, U/S strings, V structured,
    # M/m datetimes are refused here rather than by a less clear torch error.
    if arr.dtype.kind not in "fiu":
        raise _bad_dtype(name, str(arr.dtype))
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # long double: torch has no such dtype
        arr = arr.astype(np.float64)
    # A private, writable, native-endian copy: torch.from_numpy refuses big-endian arrays and
    # warns on read-only ones.
    return torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), copy=True))


def _load_safetensors(path: Path, filename: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(name not in keys for name in _ARRAYS):
                raise _missing(filename, keys)
            x = f.get_tensor("x")
            y = f.get_tensor("y")
    except InvalidDataset:
        raise
    except Exception as e:  # SafetensorError and friends: a corrupt header or truncated data
        raise _unreadable(filename, e) from e
    return x, y


def _bad_dtype(name: str, dtype: str) -> InvalidDataset:
    want = (
        "a float or integer array (integers such as uint8 pixels are converted to float32)"
        if name == "x"
        else "int64 class ids or float targets"
    )
    return InvalidDataset(
        f"array {name!r} has dtype {dtype}; it must be {want}",
        code="bad_dtype",
        array=name,
        dtype=dtype,
    )


def _is_numeric(t: torch.Tensor) -> bool:
    return not t.dtype.is_complex and t.dtype != torch.bool


def _validated(x: torch.Tensor, y: torch.Tensor) -> Dataset:
    for name, t in (("x", x), ("y", y)):
        if not _is_numeric(t):
            raise _bad_dtype(name, str(t.dtype).removeprefix("torch."))
    if x.ndim < 2 or any(d == 0 for d in x.shape[1:]):
        raise InvalidDataset(
            f"x has shape {list(x.shape)}; it must be N x sample shape (at least 2-D, e.g. "
            "(N, features) or (N, channels, height, width))",
            code="bad_shape",
            found=list(x.shape),
        )
    if y.ndim not in (1, 2):
        raise InvalidDataset(
            f"y has shape {list(y.shape)}; it must be (N,) class ids or targets, or (N, k) targets",
            code="bad_labels",
            found=list(y.shape),
        )
    if y.shape[0] != x.shape[0]:
        raise InvalidDataset(
            f"x has {x.shape[0]} samples but y has {y.shape[0]} labels; they must match",
            code="length_mismatch",
            x_samples=int(x.shape[0]),
            y_samples=int(y.shape[0]),
        )
    n = int(x.shape[0])
    if n < 2:
        raise InvalidDataset(
            f"the dataset has {n} sample(s); training needs at least 2 (BatchNorm cannot "
            "normalize a batch of one)",
            code="too_few_samples",
            num_samples=n,
        )

    # Converted first, so float64 values beyond float32's range are caught as the inf they become.
    x = x.to(torch.float32)
    _check_finite("x", x)
    if y.dtype.is_floating_point:
        y = y.to(torch.float32)
        _check_finite("y", y)
        return Dataset(x=x, y=y, y_kind="target")

    if y.ndim != 1:
        raise InvalidDataset(
            f"integer y is read as class ids and must have shape (N,); found {list(y.shape)}",
            code="bad_labels",
            found=list(y.shape),
        )
    # uint64 ids past int64's range wrap to negative here and are refused with the rest.
    y = y.to(torch.int64)
    min_id = int(y.min())
    if min_id < 0:
        raise InvalidDataset(
            f"class ids in y must be >= 0; found {min_id}",
            code="bad_labels",
            min_label=min_id,
        )
    return Dataset(x=x, y=y, y_kind="class")


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = int(torch.count_nonzero(~torch.isfinite(t)))
    if bad:
        raise InvalidDataset(
            f"array {name!r} has {bad} non-finite value(s) (NaN or infinity, including values "
            "too large for float32); remove or impute them",
            code="non_finite",
            array=name,
            count=bad,
        )
