"""The Open Inference Protocol's tensors on the wire: its JSON form and the binary extension.

A request body is a JSON object, or (binary tensor data extension, as Triton's clients send it)
a JSON header of `Inference-Header-Content-Length` bytes followed by the raw tensors, each input
saying its byte count in `parameters.binary_data_size`, in input order. Outputs come back as
JSON `data`, or raw after the JSON header when `binary_data` is asked for per output (or for all
of them with the request's `binary_data_output`); the response then names its header's length in
the same header. Raw tensors are little-endian, row-major.

Decoding ends in `check_array`, so /v2 inputs pass exactly the checks of /v1 (same codes). Shapes
carry the batch dimension in this protocol, so the shape messages say `[-1, *sample_shape]`.
Responses are written with orjson straight from NumPy: no Python lists of floats.

A `BYTES` input of shape `[N]` or `[N, 1]` is N encoded images for a model with an image
pipeline, as Triton's and KServe's clients send them: base64 strings in JSON (JSON strings cannot
hold raw PNG bytes), or in the binary extension each element as a 4-byte little-endian length then
its bytes (tritonclient's `serialize_byte_tensor`). Only the bytes are split out here; decoding
them is the pipeline's job, in a thread. An output asked for with the `classification` parameter
(Triton's extension: tritonclient's `class_count`) comes back as BYTES `[N, k]` strings
`"<value>:<index>[:<label>]"`, the k highest values best first, the value written as Triton writes
it (fixed, 9 decimals).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.encoding import json_array
from service.errors import InvalidInput, PayloadTooLarge
from service.serving.inputs import check_array

INPUT_NAME = "input"

# The protocol's numeric datatypes as NumPy types (little-endian on the wire). BOOL and BF16 are
# refused (a BatchNorm model takes numbers, and NumPy has no bfloat16); BYTES is encoded images.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
    }.items()
}


class _Open(BaseModel):
    # Clients may send fields this server does not use (Triton's sequence ids, priority...).
    model_config = ConfigDict(extra="allow")


class InferInputTensor(_Open):
    name: str
    shape: list[int]
    datatype: str = Field(
        description="FP32 (or FP16, FP64, INT8-64, UINT8-64: converted to FP32), or BYTES for "
        "encoded images (shape [N] or [N, 1]; base64 strings in JSON) to a model created with "
        "preprocess.image"
    )
    parameters: dict[str, Any] | None = None
    data: Any = None


class InferRequestedOutput(_Open):
    name: str
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data` (bool), `classification` (K >= 1: the K best classes as "
        'BYTES strings "<value>:<index>[:<label>]", Triton\'s classification extension)',
    )


class InferRequest(_Open):
    """The request's JSON object (the header, when binary tensors follow it)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    datatype: str = Field(description="FP32, or BYTES for an output asked with classification")
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        default=None, description="`binary_data_size` when the tensor follows the JSON header"
    )
    # None for a non-finite value (JSON has no NaN or Infinity), as on /v1.
    data: list[float | str | None] | None = Field(
        default=None,
        description='row-major values; with classification "<value>:<index>[:<label>]" strings',
    )


class InferResponse(BaseModel):
    """The response's JSON object (its header, when binary outputs follow it); documentation
    only: `encode_response` writes it with orjson."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classes: int | None = None  # classification: the top-k as strings instead of the values


@dataclass(frozen=True)
class Decoded:
    """What an infer request asks: the checked batch (or the encoded images of a BYTES input,
    for the model's pipeline), and which outputs in which form."""

    id: str | None
    x: torch.Tensor | None
    images: list[bytes]
    outputs: list[RequestedOutput]


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A `Content-Encoding: gzip|deflate` body (tritonclient's request compression), bounded."""
    if encoding is None or encoding.lower() in ("", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.lower())
    if wbits is None:
        raise InvalidInput(
            f"Content-Encoding {encoding[:32]!r} is not supported; use gzip, deflate or none",
            code="unsupported_encoding",
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(
            f"body is not valid {encoding} data: {exc}", code="invalid_encoding"
        ) from None
    if len(out) > limit:
        raise PayloadTooLarge(
            f"decompressed body is larger than the limit of {limit} bytes "
            "(BNSERVE_MAX_UPLOAD_BYTES)",
            limit=limit,
        )
    if not inflater.eof:
        raise InvalidInput(f"body is truncated {encoding} data", code="invalid_encoding")
    return out


def decode_request(
    body: bytes,
    header_length: str | None,
    *,
    input_shape: tuple[int, ...],
    output_names: list[str],
    max_batch: int,
    model: str = "",
    takes_images: bool = False,
) -> Decoded:
    """The batch and requested outputs of an infer body; every problem is an `InvalidInput`."""
    header, binary = _split(body, header_length)
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"]),
                "message": err["msg"],
                "type": err["type"],
            }
            for err in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:5])
        raise InvalidInput(
            f"invalid inference request: {summary}", code="validation_error", errors=errors
        ) from None
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        found = [t.name for t in request.inputs]
        raise InvalidInput(
            f"the model takes exactly one input named {INPUT_NAME!r}, the request has {found}",
            code="invalid_input_name",
        )
    tensor = request.inputs[0]
    if tensor.datatype == "BYTES":
        if not takes_images:
            raise InvalidInput(
                f"model {model!r} takes numbers, not BYTES: send FP32 of shape "
                f"{[-1, *input_shape]}; encoded images need a model created with preprocess.image",
                code="images_not_accepted",
                expected_shape=[-1, *input_shape],
            )
        images = _image_blobs(tensor, binary, max_batch)
        return Decoded(request.id, None, images, _requested(request, output_names))
    array = _input_array(tensor, binary, input_shape)
    x, _ = check_array(array, input_shape, max_batch)
    return Decoded(request.id, x, [], _requested(request, output_names))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length[:32]!r} is not a byte count within "
            f"the body's {len(body)} bytes",
            code="invalid_header_length",
        )
    return body[:n], memoryview(body)[n:]


def _expected(input_shape: tuple[int, ...]) -> str:
    return f"the model takes shape {[-1, *input_shape]} (a batch of N x {list(input_shape)})"


def _input_array(
    tensor: InferInputTensor, binary: memoryview, input_shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {tensor.name!r} has datatype {tensor.datatype[:32]!r}; send FP32 (or another "
            f"numeric type: {', '.join(DATATYPES)})",
            code="invalid_input_type",
            expected_shape=[-1, *input_shape],
        )
    shape = tuple(tensor.shape)
    if len(shape) != len(input_shape) + 1 or shape[1:] != input_shape or shape[0] < 0:
        raise InvalidInput(
            f"input {tensor.name!r} has shape {list(shape)}; {_expected(input_shape)}",
            code="invalid_input_shape",
            expected_shape=[-1, *input_shape],
            found_shape=list(shape),
        )
    if shape[0] == 0:
        raise InvalidInput(
            f"input {tensor.name!r} is an empty batch; {_expected(input_shape)}",
            code="empty_batch",
            expected_shape=[-1, *input_shape],
        )
    count = math.prod(shape)
    params = _input_parameters(tensor)
    size = params.get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInput(
                f"input {tensor.name!r} has both JSON data and binary_data_size",
                code="invalid_input",
            )
        if size != len(binary) or size != count * dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r} of shape {list(shape)} and datatype {tensor.datatype} "
                f"needs {count * dtype.itemsize} bytes; binary_data_size says {size!r} and the "
                f"body has {len(binary)} after the JSON header",
                code="invalid_binary_data",
            )
        return np.frombuffer(binary, dtype=dtype).reshape(shape)
    _check_json_data(tensor, binary)
    try:
        array = np.asarray(tensor.data)
    except ValueError:
        raise InvalidInput(
            f"input {tensor.name!r} data is ragged (nested lists of different lengths)",
            code="invalid_input_shape",
            expected_shape=[-1, *input_shape],
        ) from None
    if array.size != count:
        raise InvalidInput(
            f"input {tensor.name!r} has {array.size} values; its shape {list(shape)} needs {count}",
            code="invalid_input_shape",
            expected_shape=[-1, *input_shape],
            found_shape=list(shape),
        )
    return array.reshape(shape)


def _input_parameters(tensor: InferInputTensor) -> dict[str, Any]:
    """An input's parameters; the shared-memory extension is refused (not supported)."""
    params = tensor.parameters or {}
    if "shared_memory_region" in params:
        raise InvalidInput(
            "the shared-memory extension is not supported; send the tensor in the body",
            code="unsupported_parameter",
        )
    return params


def _check_json_data(tensor: InferInputTensor, binary: memoryview) -> None:
    """An input without `binary_data_size` has JSON `data`, and the body no stray bytes."""
    if len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes after the JSON header but no input declares "
            "binary_data_size",
            code="invalid_binary_data",
        )
    if tensor.data is None:
        raise InvalidInput(f"input {tensor.name!r} has no data", code="invalid_input")


def _image_blobs(tensor: InferInputTensor, binary: memoryview, max_batch: int) -> list[bytes]:
    """The encoded images of a BYTES input of shape [N] or [N, 1], in order."""
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or shape[0] < 0 or shape[1:] not in ([], [1]):
        raise InvalidInput(
            f"input {tensor.name!r} of datatype BYTES has shape {shape}; send [N] or [N, 1] "
            "for N encoded images",
            code="invalid_input_shape",
            expected_shape=[-1],
            found_shape=shape,
        )
    n = shape[0]
    if n == 0:
        raise InvalidInput(f"input {tensor.name!r} is an empty batch", code="empty_batch")
    if n > max_batch:
        raise InvalidInput(
            f"{n} images in one request, above the limit of {max_batch} "
            "(BNSERVE_MAX_REQUEST_BATCH); split it",
            code="batch_too_large",
            limit=max_batch,
        )
    params = _input_parameters(tensor)
    size = params.get("binary_data_size")
    if size is not None:
        if tensor.data is not None or size != len(binary):
            raise InvalidInput(
                f"input {tensor.name!r}: binary_data_size says {size!r}, the body has "
                f"{len(binary)} bytes after the JSON header"
                + (" and the input has JSON data too" if tensor.data is not None else ""),
                code="invalid_binary_data",
            )
        return _split_elements(tensor.name, binary, n)
    _check_json_data(tensor, binary)
    data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
    flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
    if len(flat) != n:
        raise InvalidInput(
            f"input {tensor.name!r} has {len(flat)} elements; its shape {shape} needs {n}",
            code="invalid_input_shape",
            expected_shape=[-1],
            found_shape=shape,
        )
    return [_from_base64(item, i, n) for i, item in enumerate(flat)]


def _what(i: int, n: int) -> str:
    return "the image" if n == 1 else f"image {i}"


def _from_base64(item: Any, i: int, n: int) -> bytes:
    """One JSON element: an image in base64 (line breaks and spaces allowed, as MIME writes it)."""
    if not isinstance(item, str):
        raise InvalidInput(
            f"{_what(i, n)} is a JSON {type(item).__name__}; BYTES data in JSON are base64 strings",
            code="invalid_input_type",
        )
    try:
        return base64.b64decode("".join(item.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{_what(i, n)} is not base64: BYTES data in JSON are base64-encoded images",
            code="bad_image",
        ) from None


def _split_elements(name: str, raw: memoryview, n: int) -> list[bytes]:
    """The binary extension's BYTES elements: each a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    offset = 0
    while len(elements) < n and offset + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            break
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(elements) != n or offset != len(raw):
        raise InvalidInput(
            f"input {name!r}: its {len(raw)} bytes are not {n} BYTES elements (each a 4-byte "
            "little-endian length, then that many bytes)",
            code="invalid_binary_data",
        )
    return elements


def _classes(value: Any) -> int | None:
    """The `classification` parameter: a count >= 1, or 0 / absent for the values themselves."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise InvalidInput(
        f"classification must be a whole number of classes >= 1, got {str(value)[:32]!r}",
        code="invalid_parameter",
    )


def _requested(request: InferRequest, output_names: list[str]) -> list[RequestedOutput]:
    binary_default = bool((request.parameters or {}).get("binary_data_output", False))
    if request.outputs is None:
        return [RequestedOutput(name, binary_default) for name in output_names]
    requested: list[RequestedOutput] = []
    for output in request.outputs:
        if output.name not in output_names:
            raise InvalidInput(
                f"unknown output {output.name!r}; this model has outputs {output_names}",
                code="unknown_output",
                outputs=output_names,
            )
        params = output.parameters or {}
        if "shared_memory_region" in params:
            raise InvalidInput(
                "the shared-memory extension is not supported; the outputs come in the body",
                code="unsupported_parameter",
            )
        binary = bool(params.get("binary_data", binary_default))
        classes = _classes(params.get("classification"))
        requested.append(RequestedOutput(output.name, binary, classes))
    return requested


def classifications(
    values: np.ndarray[Any, Any], k: int, labels: list[str] | None
) -> np.ndarray[Any, Any]:
    """Per row, the `k` highest values as Triton's classification strings (ties: the lower
    index first), an (N, min(k, width)) array of bytes."""
    k = min(k, values.shape[1])
    best = (-values).argsort(axis=1, kind="stable")[:, :k]
    rows = []
    for row, order in zip(values.tolist(), best.tolist(), strict=True):
        strings = []
        for i in order:
            text = f"{row[i]:.9f}:{i}" if labels is None else f"{row[i]:.9f}:{i}:{labels[i]}"
            strings.append(text.encode())
        rows.append(strings)
    out = np.empty((len(rows), k), dtype=object)
    out[:] = rows
    return out


def encode_response(
    *,
    model_name: str,
    model_version: int,
    request_id: str | None,
    tensors: list[tuple[str, np.ndarray[Any, Any], bool]],
    in_blocks: bool = False,
) -> tuple[bytes, int | None]:
    """The response body, and its JSON header's length when binary outputs follow it; JSON data
    `in_blocks` for large answers (`service.api.encoding`: the GIL is given back between them)."""
    outputs: list[dict[str, Any]] = []
    raw: list[bytes] = []
    entry: dict[str, Any]
    for name, array, binary in tensors:
        if array.dtype == object:  # BYTES: classification strings
            entry = {"name": name, "datatype": "BYTES", "shape": list(array.shape)}
            items = array.reshape(-1).tolist()
            if binary:
                data = b"".join(struct.pack("<I", len(b)) + b for b in items)
                entry["parameters"] = {"binary_data_size": len(data)}
                raw.append(data)
            else:
                entry["data"] = [b.decode() for b in items]
            outputs.append(entry)
            continue
        entry = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
            entry["data"] = json_array(flat) if in_blocks else flat
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"] = outputs
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raw:
        return header, None
    return b"".join([header, *raw]), len(header)
