from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from service.datasets.reader import (
    Dataset,
    check_dataset_for_model,
    read_dataset,
)
from service.errors import InvalidDataset, PayloadTooLarge
from service.files import sha256_file

UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this runs `_record`: proof that a loader unpickled it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("unpickled",))


def _npz(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def _refused(path: Path, code: str, filename: str = "data.npz") -> InvalidDataset:
    with pytest.raises(InvalidDataset) as info:
        read_dataset(path, filename)
    assert info.value.code == code, info.value.detail
    return info.value


def _xy(n: int = 10) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": np.arange(n) % 2}


def test_npz_loads(tmp_path):
    arrays = _xy()
    ds = read_dataset(_npz(tmp_path, **arrays), "data.npz")
    assert ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64
    assert ds.y_kind == "class"
    assert ds.num_samples == 10
    assert ds.sample_shape == (3,)
    assert torch.equal(ds.x, torch.from_numpy(arrays["x"]))


def test_safetensors_loads_float_targets(tmp_path):
    path = tmp_path / "data.safetensors"
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    save_file({"x": x, "y": torch.randn(6, 2), "extra": torch.zeros(1)}, str(path))
    ds = read_dataset(path, "data.safetensors")
    assert ds.y_kind == "target"
    assert ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.float32
    assert ds.sample_shape == (1, 4, 4)
    assert torch.allclose(ds.x, x.float())


def test_format_is_detected_by_content_not_extension(tmp_path):
    npz = _npz(tmp_path, "really-npz.safetensors", **_xy())
    assert read_dataset(npz, npz.name).num_samples == 10
    st = tmp_path / "really-safetensors.npz"
    save_file({"x": torch.zeros(4, 2), "y": torch.tensor([0, 1, 0, 1])}, str(st))
    assert read_dataset(st, st.name).y_kind == "class"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"x,y\n1,0\n",
        b"PK\x03\x04 truncated zip",
        b"\x10" + b"\x00" * 7 + b"{",
        b"\x03" + b"\x00" * 7 + b"{x}",
    ],
)
def test_unreadable(tmp_path, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    _refused(path, "unreadable_dataset")


def test_object_array_refused_without_unpickling(tmp_path):
    UNPICKLED.clear()
    path = _npz(tmp_path, x=np.array([[_Payload()], [_Payload()]], dtype=object), y=np.arange(2))
    err = _refused(path, "bad_dtype")
    assert "object arrays are not accepted" in err.detail
    assert UNPICKLED == []


def test_object_array_outside_x_and_y_is_never_read(tmp_path):
    UNPICKLED.clear()
    path = _npz(tmp_path, meta=np.array([_Payload()], dtype=object), **_xy())
    assert read_dataset(path, "data.npz").num_samples == 10
    assert UNPICKLED == []


def test_nan_refused_with_count(tmp_path):
    arrays = _xy()
    arrays["x"][0, 0] = np.nan
    arrays["x"][3, 1] = np.inf
    err = _refused(_npz(tmp_path, **arrays), "non_finite")
    assert err.extra == {"array": "x", "count": 2}


def test_float64_beyond_float32_range_is_non_finite(tmp_path):
    arrays = _xy()
    x = arrays["x"].astype(np.float64)
    x[1, 1] = 1e39
    arrays["x"] = x
    _refused(_npz(tmp_path, **arrays), "non_finite")


def test_non_finite_targets_refused(tmp_path):
    y = np.zeros(4, dtype=np.float32)
    y[2] = np.nan
    err = _refused(_npz(tmp_path, x=np.zeros((4, 2)), y=y), "non_finite")
    assert err.extra["array"] == "y"


def test_one_sample_refused(tmp_path):
    _refused(_npz(tmp_path, x=np.zeros((1, 3)), y=np.array([0])), "too_few_samples")


def test_length_mismatch(tmp_path):
    err = _refused(_npz(tmp_path, x=np.zeros((5, 3)), y=np.arange(4)), "length_mismatch")
    assert err.extra == {"x_samples": 5, "y_samples": 4}


def test_negative_label_refused(tmp_path):
    err = _refused(_npz(tmp_path, x=np.zeros((3, 2)), y=np.array([0, -1, 1])), "bad_labels")
    assert err.extra["min_label"] == -1


def test_uint64_label_past_int64_refused(tmp_path):
    y = np.array([0, 2**63, 1], dtype=np.uint64)
    _refused(_npz(tmp_path, x=np.zeros((3, 2)), y=y), "bad_labels")


def test_integer_x_converted_to_float32(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)
    ds = read_dataset(_npz(tmp_path, x=x, y=np.arange(4)), "data.npz")
    assert ds.x.dtype == torch.float32
    assert torch.equal(ds.x, torch.arange(24, dtype=torch.float32).reshape(4, 2, 3))


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (np.zeros((3, 2), dtype=bool), np.arange(3)),
        (np.zeros((3, 2), dtype=np.complex64), np.arange(3)),
        (np.array([["a", "b"]] * 3), np.arange(3)),
        (np.zeros((3, 2)), np.array([True, False, True])),
    ],
)
def test_bad_dtypes_refused(tmp_path, x, y):
    _refused(_npz(tmp_path, x=x, y=y), "bad_dtype")


def test_bool_x_refused_in_safetensors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(3, 2, dtype=torch.bool), "y": torch.arange(3)}, str(path))
    err = _refused(path, "bad_dtype", "d.safetensors")
    assert err.extra == {"array": "x", "dtype": "bool"}


def test_missing_y_names_what_was_found(tmp_path):
    err = _refused(_npz(tmp_path, x=np.zeros((3, 2)), labels=np.arange(3)), "missing_arrays")
    assert err.extra == {"found": ["labels", "x"]}
    assert "labels" in err.detail


def test_missing_x_in_safetensors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.zeros(3, 2), "y": torch.arange(3)}, str(path))
    assert _refused(path, "missing_arrays", "d.safetensors").extra == {"found": ["inputs", "y"]}


@pytest.mark.parametrize("x", [np.zeros(5), np.zeros((5, 0))])
def test_x_must_have_a_sample_shape(tmp_path, x):
    _refused(_npz(tmp_path, x=x, y=np.arange(5)), "bad_shape")


def test_integer_y_must_be_one_dimensional(tmp_path):
    _refused(_npz(tmp_path, x=np.zeros((4, 2)), y=np.zeros((4, 1), dtype=np.int64)), "bad_labels")


def test_compressed_npz_over_the_limit_refused_before_decompressing(tmp_path):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((1000, 100), dtype=np.float32), y=np.arange(1000))
    assert path.stat().st_size < 10_000
    with pytest.raises(PayloadTooLarge) as info:
        read_dataset(path, "big.npz", max_bytes=100_000)
    assert info.value.code == "dataset_too_large"


def _ds(x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return Dataset(x=x, y=y, y_kind="target" if y.dtype.is_floating_point else "class")


def test_check_for_model_shape_mismatch():
    ds = _ds(torch.zeros(4, 3), torch.arange(4))
    with pytest.raises(InvalidDataset) as info:
        check_dataset_for_model(ds, input_shape=(2,), task="classification", num_outputs=4)
    assert info.value.code == "shape_mismatch"
    assert info.value.extra == {"expected": [2], "found": [3]}


def test_check_for_model_label_out_of_range():
    ds = _ds(torch.zeros(4, 2), torch.tensor([0, 1, 5, 2]))
    with pytest.raises(InvalidDataset) as info:
        check_dataset_for_model(ds, input_shape=(2,), task="classification", num_outputs=3)
    assert info.value.code == "bad_labels"
    assert info.value.extra == {"max_label": 5, "num_classes": 3}
    check_dataset_for_model(ds, input_shape=(2,), task="classification", num_outputs=6)


def test_check_for_model_classifier_needs_class_ids():
    ds = _ds(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(InvalidDataset) as info:
        check_dataset_for_model(ds, input_shape=(2,), task="classification", num_outputs=2)
    assert info.value.code == "bad_labels"


def test_check_for_model_regression_targets():
    flat = _ds(torch.zeros(4, 2), torch.zeros(4))
    check_dataset_for_model(flat, input_shape=(2,), task="regression", num_outputs=1)
    wide = _ds(torch.zeros(4, 2), torch.zeros(4, 3))
    check_dataset_for_model(wide, input_shape=(2,), task="regression", num_outputs=3)
    for ds, outputs in ((flat, 2), (wide, 2), (_ds(torch.zeros(4, 2), torch.arange(4)), 1)):
        with pytest.raises(InvalidDataset) as info:
            check_dataset_for_model(ds, input_shape=(2,), task="regression", num_outputs=outputs)
        assert info.value.code == "bad_targets"


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 10_000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
