"""Read an uploaded checkpoint into a state_dict without ever running code from the file.

A `.pt`/`.pth` file is a pickle, and unpickling may call any importable function: the PyTorch docs
on `torch.load` say never to load untrusted data without `weights_only=True`, and before torch 2.10
even that could be bypassed (CVE-2025-32434). So a torch file passes two gates. First its pickle
is walked opcode by opcode with `pickletools`, which executes nothing, and refused if it names
anything outside the weights-only allowlist; a whole pickled `nn.Module` is recognised there and
gets its own error. Only then does `torch.load(weights_only=True)` run, enforcing its allowlist.
"""

from __future__ import annotations

import functools
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import safetensors.torch
import torch

from service.errors import InvalidCheckpoint, PayloadTooLarge, UnsafeCheckpoint

Format = Literal["pt", "safetensors"]

ACCEPTED_FORMATS = (
    "a state_dict saved with torch.save(model.state_dict(), f) (.pt, .pth, .bin) "
    "or a .safetensors file"
)
_EXTENSION_HINTS: dict[str, Format] = {
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
    ".safetensors": "safetensors",
}
# Where training scripts put the model's state_dict inside a bigger checkpoint: Lightning
# ("state_dict") and the PyTorch saving tutorial ("model_state_dict"), or plain "model".
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Bounds on the pickle walk, which is pure Python and holds a thread: a ResNet-18 state_dict's
# data.pkl is 14.8 KB and 4,245 opcodes (torch 2.13), a training checkpoint with optimizer state a
# few times that. The walk costs about 3 us an opcode and torch's weights-only unpickler about 7 us
# more (measured on one core), so 500,000 opcodes, over 100 times ResNet-18, bound one file's
# pickle work to about 5 s; a 61 KB file that inflated to 60 MB of opcodes once took 189 s.
MAX_PICKLE_BYTES = 16 * 2**20
MAX_PICKLE_OPCODES = 500_000
# What a checkpoint may inflate to when no limit is passed: the default upload limit.
DEFAULT_MAX_BYTES = 1 << 30
# torch.save writes a view's whole storage, so a storage may exceed what its tensors reach; past
# this much it is padding to inflate (a deflated record of zeros expands about 1000 times).
_STORAGE_SLACK_FACTOR = 4
_STORAGE_SLACK_BYTES = 1 << 20
# safetensors' own parser accepts headers up to 100 MB; a real state_dict's is a few KB.
MAX_SAFETENSORS_HEADER_BYTES = 16 * 2**20
# Pre-1.6 torch files are five pickles in a row (magic number, protocol version, sys info, the
# data, the storage keys) followed by raw storage bytes; see torch.serialization._legacy_save.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5
# Attribute names every pickled nn.Module carries in its __dict__ (torch/nn/modules/module.py).
_MODULE_STATE_NAMES = frozenset({"_modules", "_parameters", "_buffers"})

_SCALARS = ("Double", "Float", "Long", "Int", "Short", "Char", "Byte", "Bool", "BFloat16", "Half")
_COMPLEX = ("ComplexDouble", "ComplexFloat")
_QUANTIZED = ("QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
_REBUILD_FUNCTIONS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
)


@dataclass(frozen=True)
class ReadInfo:
    """How the file was read, for the version's report."""

    format: Format
    unwrapped_from: str | None = None


def read_state_dict(
    path: Path, filename: str, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[dict[str, torch.Tensor], ReadInfo]:
    """Load an uploaded checkpoint as str -> tensor on the CPU, refusing anything else.

    `max_bytes` bounds what the file may inflate to; declared sizes are checked before anything
    is decompressed.
    """
    fmt = _detect_format(path, filename)
    if fmt == "safetensors":
        _check_safetensors_header(path, filename)
        return _as_state_dict(_load_safetensors(path, filename), filename, "safetensors")
    _inspect_pickles(path, filename, zipped=fmt == "zip", max_bytes=max_bytes)
    return _as_state_dict(_load_torch(path, filename), filename, "pt")


def _too_large(detail: str, limit: int, **extra: Any) -> PayloadTooLarge:
    return PayloadTooLarge(detail, code="checkpoint_too_large", limit_bytes=limit, **extra)


def _check_safetensors_header(path: Path, filename: str) -> None:
    """Refuse a header too long to be a state_dict's before safetensors parses it."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise _too_large(
            f"{filename} declares a {header_len}-byte safetensors header; a state_dict's is a few "
            f"KB and at most {MAX_SAFETENSORS_HEADER_BYTES} bytes are accepted",
            MAX_SAFETENSORS_HEADER_BYTES,
        )


def _detect_format(path: Path, filename: str) -> Literal["zip", "legacy", "safetensors"]:
    """Sniff the content: the name is the client's to choose, so it only words the error."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    found: list[Literal["zip", "legacy", "safetensors"]] = []
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8:
            found.append("safetensors")
    if head.startswith(b"PK\x03\x04"):
        found.append("zip")
    if head.startswith(b"\x80"):
        found.append("legacy")
    # A safetensors header length whose low byte is 0x80 also looks like a pickle. Real torch
    # files never have "{" at offset 8 (it lies inside the legacy magic number), so safetensors
    # wins, whatever the name says: parsing it runs no code either way.
    if found:
        return found[0]
    hint = _EXTENSION_HINTS.get(Path(filename).suffix.lower())
    named = f" (its name says {hint})" if hint else ""
    raise InvalidCheckpoint(
        f"{filename} is neither a PyTorch file nor safetensors{named}; accepted: "
        f"{ACCEPTED_FORMATS}.",
        code="unreadable_checkpoint",
    )


# --- first gate: the pickle's globals, read without unpickling --------------------------------


@functools.cache
def allowed_globals() -> frozenset[str]:
    """The globals `torch.load(weights_only=True)` accepts, mirrored from torch 2.13's list.

    Mirrors `torch._weights_only_unpickler._get_allowed_globals` (tensors, storages, dtypes and
    plain containers) so the two gates agree; the test suite checks it stays a subset.
    """
    names = {
        "collections.OrderedDict",
        "collections.Counter",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        *(f"torch._utils.{name}" for name in _REBUILD_FUNCTIONS),
        *(f"torch.{kind}Storage" for kind in (*_SCALARS, *_COMPLEX, *_QUANTIZED)),
        *(f"torch.cuda.{kind}Storage" for kind in (*_SCALARS, *_COMPLEX)),
        *(f"{mod}.{kind}Tensor" for mod in ("torch", "torch.cuda") for kind in _SCALARS),
        *(
            f"{mod}.{kind}Tensor"
            for mod in ("torch.sparse", "torch.cuda.sparse")
            for kind in _SCALARS
            if kind != "Bool"
        ),
    }
    names.update(str(v) for v in vars(torch).values() if isinstance(v, torch.dtype | torch.qscheme))
    return frozenset(names)


@dataclass
class _PickleScan:
    """What a pickle would import and which strings it holds, collected without running it.

    `storages` maps each persistent storage key to the bytes its tensors reach (from the
    `_rebuild_tensor_v2` calls whose operands are constants), so records padded far beyond
    their tensors can be refused before torch inflates them.
    """

    globals: set[str] = field(default_factory=set)
    strings: set[str] = field(default_factory=set)
    storages: dict[str, int] = field(default_factory=dict)
    opcodes: int = 0


@dataclass(frozen=True)
class _Global:
    """A global on the simulated stack, so REDUCE can tell which function it calls."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """A persistent storage reference: `('storage', type, key, location, numel)` in torch files."""

    key: str
    itemsize: int


# What pickletools and zipfile raise on a malformed file: truncated, unknown opcode, bad deflate
# stream, unsupported compression or encryption.
_UNREADABLE = (
    ValueError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)
_OPAQUE = object()
_MARK = object()
_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_TUPLE_SIZES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_TENSOR_REBUILDS = frozenset({"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"})


# Element sizes of the legacy storage classes torch.save names in storage ids ("torch
# FloatStorage"); read from torch.dtype, since touching the storage classes warns.
_STORAGE_DTYPES = {
    "Double": torch.float64,
    "Float": torch.float32,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
    "ComplexDouble": torch.complex128,
    "ComplexFloat": torch.complex64,
}


def _storage_itemsize(type_name: str) -> int | None:
    """Bytes per element of a storage class such as `torch.FloatStorage`, if it is known."""
    dtype = _STORAGE_DTYPES.get(type_name.removeprefix("torch.").removesuffix("Storage"))
    return None if dtype is None else dtype.itemsize


def _tensor_extent(args: object) -> tuple[str, int] | None:
    """The storage key and bytes reached by `_rebuild_tensor_v2(storage, offset, size, stride)`."""
    if not isinstance(args, tuple) or len(args) < 4 or not isinstance(args[0], _Storage):
        return None
    storage, offset, size, stride = args[:4]
    if not (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(d, int) and d >= 0 for d in (offset, *size, *stride))
    ):
        return None
    if 0 in size:
        return storage.key, 0
    last = offset + sum((d - 1) * st for d, st in zip(size, stride, strict=True))
    return storage.key, (last + 1) * storage.itemsize


def _count(scan: _PickleScan) -> None:
    scan.opcodes += 1
    if scan.opcodes > MAX_PICKLE_OPCODES:
        raise PayloadTooLarge(
            f"the checkpoint's pickle has more than {MAX_PICKLE_OPCODES} opcodes; a state_dict "
            "needs about 35 per tensor (ResNet-18: 4,245). Upload torch.save(model.state_dict(), "
            "f) or a .safetensors file",
            code="pickle_too_large",
            limit_opcodes=MAX_PICKLE_OPCODES,
        )


def _scan_pickle(source: IO[bytes] | bytes, scan: _PickleScan) -> object:
    """Collect one pickle's globals into `scan` and return its top-level value if a constant.

    STACK_GLOBAL (protocol 4+) takes module and name from the stack, where they may come from the
    memo, so the stack and memo are simulated; operands it cannot pin down count as an unknown
    global, which is refused.
    """
    stack: list[object] = []
    memo: dict[object, object] = {}
    for op, arg, _pos in pickletools.genops(source):
        _count(scan)
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else _OPAQUE
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _OPAQUE
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _OPAQUE))
            continue
        if name in _STRING_OPS or name in _INT_OPS:
            if isinstance(arg, str):
                scan.strings.add(arg)
            stack.append(arg)
            continue
        if name == "STACK_GLOBAL":
            module, qualname = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            del stack[-2:]
            if isinstance(module, str) and isinstance(qualname, str):
                full = _global_name(module, qualname)
                scan.globals.add(full)
                stack.append(_Global(full))
            else:
                scan.globals.add("<STACK_GLOBAL with operands built at load time>")
                stack.append(_OPAQUE)
            continue
        if name == "GLOBAL":
            full = _global_name(*str(arg).partition(" ")[::2])
            scan.globals.add(full)
            stack.append(_Global(full))
            continue
        if name in _TUPLE_SIZES or name == "TUPLE":
            _build_tuple(name, stack)
            continue
        if name == "BINPERSID" and stack:
            stack.append(_persistent(stack.pop(), scan))
            continue
        if name == "REDUCE" and len(stack) >= 2:
            args, func = stack.pop(), stack.pop()
            extent = _tensor_extent(args)
            if isinstance(func, _Global) and func.name in _TENSOR_REBUILDS and extent:
                key, reached = extent
                scan.storages[key] = max(scan.storages.get(key, 0), reached)
            stack.append(_OPAQUE)
            continue
        if name == "INST":
            module, _, qualname = str(arg).partition(" ")
            scan.globals.add(_global_name(module, qualname))
        elif name in ("EXT1", "EXT2", "EXT4"):
            scan.globals.add(f"<copyreg extension {arg}>")
        elif name == "STOP":
            return stack[-1] if stack else _OPAQUE
        _simulate(op, stack)
    return _OPAQUE  # pragma: no cover - genops raises before running out without STOP


def _build_tuple(name: str, stack: list[object]) -> None:
    if name == "TUPLE":
        items: list[object] = []
        while stack and (item := stack.pop()) is not _MARK:
            items.append(item)
        stack.append(tuple(reversed(items)))
        return
    size = _TUPLE_SIZES[name]
    items = stack[len(stack) - size :] if size else []
    del stack[len(stack) - size :]
    stack.append(tuple(items))


def _persistent(pid: object, scan: _PickleScan) -> object:
    """A `_Storage` for torch's storage ids, recorded with no tensor reaching into it yet."""
    if (
        isinstance(pid, tuple)
        and len(pid) == 5
        and pid[0] == "storage"
        and isinstance(pid[1], _Global)
        and isinstance(pid[2], str)
    ):
        itemsize = _storage_itemsize(pid[1].name)
        if itemsize is not None:
            scan.storages.setdefault(pid[2], 0)
            return _Storage(pid[2], itemsize)
    return _OPAQUE


def _simulate(op: pickletools.OpcodeInfo, stack: list[object]) -> None:
    """Apply an opcode's stack effect as documented in pickletools (the same walk as `dis`)."""
    before = op.stack_before
    if pickletools.markobject in before or (op.name == "POP" and stack and stack[-1] is _MARK):
        while stack and stack.pop() is not _MARK:
            pass
        to_pop = before.index(pickletools.markobject) if pickletools.markobject in before else 0
    else:
        to_pop = len(before)
    if to_pop:
        del stack[-to_pop:]
    stack.extend(_MARK if item is pickletools.markobject else _OPAQUE for item in op.stack_after)


def _global_name(module: str, qualname: str) -> str:
    # Protocol 2 writes Python 2 names; torch maps "__builtin__" the same way before its check.
    return f"{'builtins' if module == '__builtin__' else module}.{qualname}"


def _inspect_pickles(path: Path, filename: str, *, zipped: bool, max_bytes: int) -> None:
    """Refuse a torch file whose pickle references anything but tensors and plain containers."""
    scan = _PickleScan()
    try:
        if zipped:
            _scan_zip(path, filename, scan, max_bytes)
        else:
            with path.open("rb") as f:
                if _scan_pickle(f, scan) == _LEGACY_MAGIC:
                    for _ in range(_LEGACY_PICKLES - 1):
                        _scan_pickle(f, scan)
    except _UNREADABLE as exc:
        raise InvalidCheckpoint(
            f"{filename} could not be read as a PyTorch file ({exc}); accepted: "
            f"{ACCEPTED_FORMATS}.",
            code="unreadable_checkpoint",
        ) from None

    foreign = sorted(scan.globals - allowed_globals())
    if not foreign:
        return
    if any(g.startswith("torch.nn.") for g in foreign) or scan.strings & _MODULE_STATE_NAMES:
        raise UnsafeCheckpoint(
            f"{filename} is a whole pickled nn.Module ({', '.join(foreign[:5])}), not a "
            "state_dict. bnserve never unpickles arbitrary objects: loading one runs code from "
            "the file. Save the weights with torch.save(model.state_dict(), path) and upload that.",
            code="pickled_module",
            globals=foreign,
        )
    raise UnsafeCheckpoint(
        f"{filename} references globals outside the weights-only allowlist, which loading would "
        f"import or call: {', '.join(foreign[:10])}. Upload torch.save(model.state_dict(), f) or "
        "a .safetensors file.",
        code="unsafe_pickle",
        globals=foreign,
    )


def _scan_zip(path: Path, filename: str, scan: _PickleScan, max_bytes: int) -> None:
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        # zipfile stops inflating a member at its declared file_size, and so does torch's miniz
        # reader, so declared sizes bound what the archive can expand to.
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise _too_large(
                f"{filename} would inflate to {declared} bytes; the limit is {max_bytes} "
                "(BNSERVE_MAX_UPLOAD_BYTES)",
                max_bytes,
                declared_bytes=declared,
            )
        if any(m.filename.endswith("/constants.pkl") for m in members):
            # torch.load's own test for a TorchScript archive (torch.serialization).
            raise UnsafeCheckpoint(
                f"{filename} is a TorchScript archive (torch.jit.save), a whole module with its "
                "code, not a state_dict. Save the weights with "
                "torch.save(model.state_dict(), path) and upload that.",
                code="pickled_module",
                globals=[],
            )
        pickles = [m for m in members if m.filename.endswith(".pkl")]
        if not any(m.filename.endswith("/data.pkl") for m in pickles):
            raise ValueError("a zip archive without a data.pkl")
        # Every pickle is scanned, not just the one torch would pick, so two data.pkl members
        # cannot smuggle a second object past this gate.
        for member in pickles:
            if member.file_size > MAX_PICKLE_BYTES:
                raise PayloadTooLarge(
                    f"{filename}'s {member.filename} is {member.file_size} bytes once inflated; "
                    f"a state_dict's pickle is a few hundred bytes per tensor and at most "
                    f"{MAX_PICKLE_BYTES} are accepted",
                    code="pickle_too_large",
                    limit_bytes=MAX_PICKLE_BYTES,
                )
            with archive.open(member) as f:
                _scan_pickle(f.read(MAX_PICKLE_BYTES + 1), scan)
        _check_storages(filename, members, scan)


def _check_storages(filename: str, members: list[zipfile.ZipInfo], scan: _PickleScan) -> None:
    """Refuse storage records far larger than the tensors that use them, before they inflate."""
    records = {m.filename.rpartition("/data/")[2]: m for m in members if "/data/" in m.filename}
    for key, reached in scan.storages.items():
        record = records.get(key)
        if record is None:
            continue  # torch.load reports the missing record itself
        if record.file_size > _STORAGE_SLACK_FACTOR * reached + _STORAGE_SLACK_BYTES:
            raise InvalidCheckpoint(
                f"{filename}'s storage {key} holds {record.file_size} bytes but its tensors "
                f"reach only {reached}; save the state_dict with torch.save, which writes "
                "each storage once at its size",
                code="oversized_storage",
                storage=key,
                storage_bytes=record.file_size,
                tensor_bytes=reached,
            )


# --- second gate and the shape of what came out ------------------------------------------------


def _load_torch(path: Path, filename: str) -> object:
    try:
        # weights_only is passed explicitly so that neither a torch default nor the
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD variable can turn it off (torch.load docs). Never
        # retried without it. map_location: weights saved on a GPU are read onto the CPU.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"{filename} was refused by torch.load(weights_only=True): {_weights_only_reason(exc)}",
            code="unsafe_pickle",
        ) from None
    except Exception as exc:  # a truncated archive, a bad magic number, storages out of bounds
        if isinstance(exc, RuntimeError) and "weights_only" in str(exc):
            raise UnsafeCheckpoint(
                f"{filename} was refused by torch.load(weights_only=True): {exc}",
                code="unsafe_pickle",
            ) from None
        raise InvalidCheckpoint(
            f"{filename} could not be loaded by torch.load: {exc}", code="unreadable_checkpoint"
        ) from None


def _weights_only_reason(exc: Exception) -> str:
    """Keep torch's own diagnosis, without its ANSI codes or its advice to turn weights_only off."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, reason = message.partition("WeightsUnpickler error:")
    text = reason if marker else message
    return text.split("\n\nCheck the documentation of torch.load")[0].strip()


def _load_safetensors(path: Path, filename: str) -> object:
    try:
        tensors: dict[str, torch.Tensor] = safetensors.torch.load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
        raise InvalidCheckpoint(
            f"{filename} is not a valid safetensors file: {exc}", code="unreadable_checkpoint"
        ) from None
    return tensors


def _as_state_dict(
    loaded: object, filename: str, fmt: Format
) -> tuple[dict[str, torch.Tensor], ReadInfo]:
    """Accept a str -> tensor mapping, or one nested under a common wrapper key."""
    if isinstance(loaded, Mapping):
        if loaded and not _offending_entries(loaded):
            return dict(loaded), ReadInfo(format=fmt)
        for key in WRAPPER_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and not _offending_entries(inner):
                return dict(inner), ReadInfo(format=fmt, unwrapped_from=key)
        what = (
            f"it maps {', '.join(_offending_entries(loaded)[:5])}"
            if loaded
            else "it is an empty mapping"
        )
    else:
        what = f"it holds a {type(loaded).__name__}, not a mapping of names to tensors"
    raise InvalidCheckpoint(
        f"{filename} is not a state_dict: {what}. Upload model.state_dict(), saved with "
        "torch.save(model.state_dict(), f) or safetensors.",
        code="not_a_state_dict",
    )


def _offending_entries(mapping: Mapping[Any, Any]) -> list[str]:
    return [
        f"{key!r}: {type(value).__name__}"
        for key, value in mapping.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
