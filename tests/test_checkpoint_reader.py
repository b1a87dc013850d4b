from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch._weights_only_unpickler
from torch import nn

from service.checkpoints.reader import ReadInfo, allowed_globals, read_state_dict
from service.errors import InvalidCheckpoint, UnsafeCheckpoint


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


class Net(nn.Module):
    """A user's own architecture, as `torch.save(model, f)` would pickle it by class name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out


class Scale(nn.Module):
    """A custom module with no torch.nn children: only its __dict__ gives it away."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))


class Touch:
    """Unpickling this creates `target`: the harmless stand-in for arbitrary code execution."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.target,))


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("name", ["weights.pt", "weights.pth", "weights.bin", "weights.ckpt"])
def test_state_dict_file_loads(tmp_path: Path, name: str) -> None:
    state = mlp().state_dict()
    torch.save(state, tmp_path / name)

    loaded, info = read_state_dict(tmp_path / name, name)

    assert info == ReadInfo(format="pt", unwrapped_from=None)
    assert_same(loaded, state)


def test_legacy_format_loads(tmp_path: Path) -> None:
    state = mlp().state_dict()
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "old.pt").read_bytes()[:1] == b"\x80"

    loaded, info = read_state_dict(tmp_path / "old.pt", "old.pt")

    assert info.format == "pt"
    assert_same(loaded, state)


def test_safetensors_loads(tmp_path: Path) -> None:
    state = mlp().state_dict()
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")

    loaded, info = read_state_dict(tmp_path / "w.safetensors", "w.safetensors")

    assert info == ReadInfo(format="safetensors", unwrapped_from=None)
    assert_same(dict(sorted(loaded.items())), dict(sorted(state.items())))


def test_content_decides_over_extension(tmp_path: Path) -> None:
    state = mlp().state_dict()
    safetensors.torch.save_file(state, tmp_path / "upload")

    loaded, info = read_state_dict(tmp_path / "upload", "misnamed.pt")

    assert info.format == "safetensors"
    assert set(loaded) == set(state)


def test_safetensors_header_that_looks_like_a_pickle(tmp_path: Path) -> None:
    # A 128-byte header makes the first byte 0x80, the pickle PROTO opcode.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = struct.pack("<Q", 128) + header.ljust(128) + struct.pack("<2f", 1.0, 2.0)
    (tmp_path / "w.pt").write_bytes(data)

    loaded, info = read_state_dict(tmp_path / "w.pt", "w.pt")

    assert info.format == "safetensors"
    assert torch.equal(loaded["w"], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_is_unwrapped(tmp_path: Path, key: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    checkpoint = {key: model.state_dict(), "epoch": 3, "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pth")

    loaded, info = read_state_dict(tmp_path / "ckpt.pth", "ckpt.pth")

    assert info.unwrapped_from == key
    assert_same(loaded, model.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(mlp, id="torch.nn.Sequential"),
        pytest.param(Net, id="custom-class-with-nn-children"),
        pytest.param(Scale, id="custom-class-only-parameters"),
    ],
)
def test_whole_pickled_module_is_refused(tmp_path: Path, make: type[nn.Module]) -> None:
    model = make()
    torch.save(model, tmp_path / "model.pt")

    with pytest.raises(UnsafeCheckpoint) as caught:
        read_state_dict(tmp_path / "model.pt", "model.pt")

    assert caught.value.code == "pickled_module"
    assert caught.value.status == 400
    assert "torch.save(model.state_dict(), path)" in caught.value.detail
    cls = type(model)
    assert f"{cls.__module__}.{cls.__qualname__}" in caught.value.extra["globals"]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(mlp()), tmp_path / "scripted.pt")

    with pytest.raises(UnsafeCheckpoint) as caught:
        read_state_dict(tmp_path / "scripted.pt", "scripted.pt")

    assert caught.value.code == "pickled_module"
    assert "TorchScript" in caught.value.detail


def _save_torch_zip(obj: object, path: Path) -> None:
    torch.save(obj, path)


def _save_torch_legacy(obj: object, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_pickle_2(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _save_pickle_5(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=5))


@pytest.mark.parametrize(
    "save", [_save_torch_zip, _save_torch_legacy, _save_pickle_2, _save_pickle_5]
)
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, save: object) -> None:
    target = tmp_path / "pwned"
    payload = {"fc.weight": torch.zeros(2, 2), "fc.bias": Touch(target)}
    assert callable(save)
    save(payload, tmp_path / "evil.pt")

    with pytest.raises(UnsafeCheckpoint) as caught:
        read_state_dict(tmp_path / "evil.pt", "evil.pt")

    assert caught.value.code == "unsafe_pickle"
    assert any(g.startswith("pathlib.") for g in caught.value.extra["globals"])
    assert not target.exists()


def test_stack_global_operands_are_tracked_through_stack_and_memo(tmp_path: Path) -> None:
    # A naive "last two strings" tracker would read collections.OrderedDict here; the global
    # actually built is pathlib.Path, its module fetched back from the memo.
    ops = [
        pickle.PROTO + b"\x04",
        pickle.SHORT_BINUNICODE + b"\x07pathlib",
        pickle.MEMOIZE,
        pickle.POP,
        pickle.BINGET + b"\x00",
        pickle.SHORT_BINUNICODE + b"\x04Path",
        pickle.SHORT_BINUNICODE + b"\x0bcollections",
        pickle.SHORT_BINUNICODE + b"\x0bOrderedDict",
        pickle.POP,
        pickle.POP,
        pickle.STACK_GLOBAL,
        pickle.EMPTY_TUPLE,
        pickle.REDUCE,
        pickle.STOP,
    ]
    (tmp_path / "crafted.pt").write_bytes(b"".join(ops))

    with pytest.raises(UnsafeCheckpoint) as caught:
        read_state_dict(tmp_path / "crafted.pt", "crafted.pt")

    assert caught.value.extra["globals"] == ["pathlib.Path"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_weights_only_load_is_the_second_gate(tmp_path: Path) -> None:
    # Only allowlisted globals, so the scan passes; torch's unpickler still refuses protocol 4.
    (tmp_path / "p4.pt").write_bytes(pickle.dumps(OrderedDict(a=1), protocol=4))

    with pytest.raises(UnsafeCheckpoint) as caught:
        read_state_dict(tmp_path / "p4.pt", "p4.pt")

    assert caught.value.code == "unsafe_pickle"
    assert "weights_only" in caught.value.detail
    assert "\x1b[" not in caught.value.detail


@pytest.mark.parametrize(
    ("obj", "shown"),
    [
        pytest.param([torch.zeros(2)], "list", id="list"),
        pytest.param(torch.zeros(2), "Tensor", id="tensor"),
        pytest.param({"w": torch.zeros(2), "epoch": 3}, "'epoch': int", id="int-value"),
        pytest.param({}, "empty", id="empty"),
        pytest.param({"state_dict": {"w": 1.5}}, "'state_dict': dict", id="bad-wrapper"),
    ],
)
def test_not_a_state_dict(tmp_path: Path, obj: object, shown: str) -> None:
    torch.save(obj, tmp_path / "x.pt")

    with pytest.raises(InvalidCheckpoint) as caught:
        read_state_dict(tmp_path / "x.pt", "x.pt")

    assert caught.value.code == "not_a_state_dict"
    assert shown in caught.value.detail
    assert "model.state_dict()" in caught.value.detail


def test_empty_safetensors_is_not_a_state_dict(tmp_path: Path) -> None:
    safetensors.torch.save_file({}, tmp_path / "e.safetensors")

    with pytest.raises(InvalidCheckpoint) as caught:
        read_state_dict(tmp_path / "e.safetensors", "e.safetensors")

    assert caught.value.code == "not_a_state_dict"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, this is not a checkpoint at all", id="text"),
        pytest.param(b"\x80\x02garbage", id="broken-pickle"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 64, id="broken-zip"),
        pytest.param(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", id="broken-safetensors"),
    ],
)
def test_garbage_is_unreadable(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "w.safetensors").write_bytes(content)

    with pytest.raises(InvalidCheckpoint) as caught:
        read_state_dict(tmp_path / "w.safetensors", "w.safetensors")

    assert caught.value.code == "unreadable_checkpoint"
    assert not isinstance(caught.value, UnsafeCheckpoint)
    assert "w.safetensors" in caught.value.detail


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_zip_is_unreadable(tmp_path: Path, keep: float) -> None:
    torch.save(mlp().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(InvalidCheckpoint) as caught:
        read_state_dict(tmp_path / "cut.pt", "cut.pt")

    assert caught.value.code == "unreadable_checkpoint"


def test_zip_without_data_pkl_is_unreadable(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")

    with pytest.raises(InvalidCheckpoint) as caught:
        read_state_dict(tmp_path / "other.pt", "other.pt")

    assert caught.value.code == "unreadable_checkpoint"


def test_allowlist_stays_within_torch_weights_only_allowlist() -> None:
    # If torch narrows its list, the first gate must follow rather than pass what torch refuses.
    torch_list = set(torch._weights_only_unpickler._get_allowed_globals())
    assert allowed_globals() <= torch_list
    assert "collections.OrderedDict" in allowed_globals()
    assert "torch._utils._rebuild_tensor_v2" in allowed_globals()
    assert "torch.FloatStorage" in allowed_globals()
    assert "torch.float32" in allowed_globals()
