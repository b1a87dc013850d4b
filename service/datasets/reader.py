"""Read uploaded datasets (`.npz`, `.safetensors`) into tensors, refusing what cannot train.

Every refusal is an `InvalidDataset` whose `code` names the problem, so the HTTP layer can answer
422 with a detail the uploader can act on. Nothing here unpickles: `.npz` files are read with
`allow_pickle=False` and safetensors is pickle-free by design.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from numpy.lib import format as npy_format
from safetensors import safe_open

from service.errors import InvalidDataset, PayloadTooLarge, shorten

# Zip local-file header and the end-of-central-directory record (an empty zip has only the latter);
# numpy.load recognises `.npz` by the same two prefixes.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# safetensors: an 8-byte little-endian header length, then that many bytes of JSON starting with `{`
# (https://github.com/huggingface/safetensors#format).
_SAFETENSORS_LEN_BYTES = 8

# `.npz` members may be deflated (np.savez_compressed), so a small upload can expand a
# thousandfold: x and y together may declare at most this many bytes (the default upload limit),
# checked from the zip directory and the `.npy` headers before anything is decompressed.
DEFAULT_MAX_BYTES = 1 << 30
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

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


def read_dataset(path: Path, filename: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Dataset:
    """Load and check arrays `x` and `y` so a training job never starts on data it cannot use.

    `x` and `y` may declare at most `max_bytes` together, checked before they are read.
    """
    if _format(path, filename) == "npz":
        x, y = _load_npz(path, filename, _ARRAYS, max_bytes)
    else:
        x, y = _load_safetensors(path, filename, _ARRAYS, max_bytes)
    return _validated(x, y)


def read_labels(path: Path, filename: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Only `y` of a stored dataset, for the checks a job needs beyond the recorded shapes."""
    if _format(path, filename) == "npz":
        (y,) = _load_npz(path, filename, ("y",), max_bytes)
    else:
        (y,) = _load_safetensors(path, filename, ("y",), max_bytes)
    return y


def _format(path: Path, filename: str) -> Literal["npz", "safetensors"]:
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
    return kind


def _too_large(filename: str, declared: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{filename!r} declares {declared} bytes of arrays x and y once decompressed; the limit "
        f"is {max_bytes} (BNSERVE_MAX_DATASET_BYTES)",
        code="dataset_too_large",
        limit_bytes=max_bytes,
        declared_bytes=declared,
    )


def check_dataset_for_model(
    ds: Dataset, *, input_shape: tuple[int, ...], task: str, num_outputs: int
) -> None:
    """Refuse a dataset whose samples or labels the model cannot take, before a job is queued."""
    check_shapes_for_model(
        sample_shape=ds.sample_shape,
        y_kind=ds.y_kind,
        y_shape=tuple(ds.y.shape),
        input_shape=input_shape,
        task=task,
        num_outputs=num_outputs,
    )
    if task == "classification":
        check_labels_for_model(ds.y, num_outputs=num_outputs)


def check_shapes_for_model(
    *,
    sample_shape: tuple[int, ...],
    y_kind: str,
    y_shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    task: str,
    num_outputs: int,
) -> None:
    """What a dataset's recorded shapes tell about fitting a model, without reading its file."""
    expected = tuple(int(d) for d in input_shape)
    if sample_shape != expected:
        raise InvalidDataset(
            f"samples have shape {list(sample_shape)} but the model takes {list(expected)} "
            "per sample; x must be N x input_shape",
            code="shape_mismatch",
            expected=list(expected),
            found=list(sample_shape),
        )
    if task == "classification":
        if y_kind != "class":
            raise InvalidDataset(
                "a classifier needs integer class ids in y; found floating-point targets",
                code="bad_labels",
            )
    elif task == "regression":
        if y_kind != "target":
            raise InvalidDataset(
                "a regression model needs floating-point targets in y; found integer class ids "
                "(save y as float32 if they are numeric targets)",
                code="bad_targets",
            )
        per_sample = 1 if len(y_shape) == 1 else int(y_shape[1])
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


def check_labels_for_model(y: torch.Tensor, *, num_outputs: int) -> None:
    """Refuse class ids the classifier has no output for."""
    max_id = int(y.max())
    if max_id >= num_outputs:
        raise InvalidDataset(
            f"y has class id {max_id} but the model has {num_outputs} classes "
            f"(ids 0..{num_outputs - 1})",
            code="bad_labels",
            max_label=max_id,
            num_classes=num_outputs,
        )


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


def _load_npz(
    path: Path, filename: str, names: tuple[str, ...], max_bytes: int
) -> list[torch.Tensor]:
    # Only the named arrays are read: other members are never decompressed, so whatever they
    # hold (object arrays included) costs nothing and runs nothing.
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
            if any(name not in members for name in _ARRAYS):
                raise _missing(filename, list(members))
            chosen = [members[name] for name in names]
            # The zip directory's sizes first (zipfile inflates no member past its file_size),
            # then each .npy header's shape x itemsize, both before any data is decompressed.
            declared = sum(m.file_size for m in chosen)
            if declared > max_bytes:
                raise _too_large(filename, declared, max_bytes)
            headers = [_npy_header(zf, m, filename) for m in chosen]
            declared = sum(nbytes for _, nbytes in headers)
            if declared > max_bytes:
                raise _too_large(filename, declared, max_bytes)
            arrays = []
            for name, member in zip(names, chosen, strict=True):
                with zf.open(member) as f:
                    arrays.append(_from_numpy(name, npy_format.read_array(f, allow_pickle=False)))
    except (InvalidDataset, PayloadTooLarge):
        raise
    except Exception as e:  # BadZipFile, a truncated deflate stream, EOF inside the data
        raise _unreadable(filename, e) from e
    return arrays


def _npy_header(zf: zipfile.ZipFile, member: zipfile.ZipInfo, filename: str) -> tuple[str, int]:
    """A member's dtype and data bytes from its `.npy` header, refused unless the data is there."""
    name = member.filename.removesuffix(".npy")
    with zf.open(member) as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:  # 3.0 only exists for structured dtypes with non-latin-1 field names
                raise ValueError(f"npy format version {version} is not accepted")
        except ValueError as e:
            raise InvalidDataset(
                f"member {member.filename!r} of {filename!r} is not an .npy array ({e}); save "
                "the arrays with numpy.savez(f, x=x, y=y)",
                code="unreadable_dataset",
                array=name,
            ) from None
        header_bytes = f.tell()
    if dtype.hasobject:
        # Reading them would unpickle arbitrary objects.
        raise InvalidDataset(
            f"{filename!r} holds an object array; object arrays are not accepted because "
            "loading them runs pickle. Save x and y as numeric arrays",
            code="bad_dtype",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != member.file_size - header_bytes:
        raise InvalidDataset(
            f"array {name!r} of {filename!r} declares shape {list(shape)} ({nbytes} bytes) but "
            f"its member holds {member.file_size - header_bytes} bytes of data",
            code="unreadable_dataset",
            array=name,
        )
    return str(dtype), nbytes


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


def _load_safetensors(
    path: Path, filename: str, names: tuple[str, ...], max_bytes: int
) -> list[torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(name not in keys for name in _ARRAYS):
                raise _missing(filename, keys)
            # The header's shapes and dtypes, before any tensor is read.
            declared = 0
            for name in names:
                part = f.get_slice(name)
                itemsize = _SAFETENSORS_DTYPE_BYTES.get(part.get_dtype(), 8)
                declared += math.prod(part.get_shape()) * itemsize
            if declared > max_bytes:
                raise _too_large(filename, declared, max_bytes)
            return [f.get_tensor(name) for name in names]
    except (InvalidDataset, PayloadTooLarge):
        raise
    except Exception as e:  # SafetensorError and friends: a corrupt header or truncated data
        raise _unreadable(filename, e) from e


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
