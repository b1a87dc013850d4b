"""Hostile files built in the tests: zips whose members inflate far beyond their size, and pickles
padded with opcodes. Real bombs, made in well under a second: deflate output after a full flush
does not depend on what came before, so one compressed block of zeros is repeated, and the CRC-32
of the whole is combined from the block's (zlib's crc32_combine, which Python does not expose).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format

_ZERO_BLOCK = 16 * 2**20
_CRC_POLY = 0xEDB88320


@dataclass(frozen=True)
class Member:
    """One zip member as it is written: its bytes, compression method, CRC-32 and true size."""

    name: str
    payload: bytes
    method: int
    crc: int
    size: int


def stored(name: str, data: bytes) -> Member:
    return Member(name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data))


def deflated(name: str, data: bytes) -> Member:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Member(
        name, c.compress(data) + c.flush(), zipfile.ZIP_DEFLATED, zlib.crc32(data), len(data)
    )


def deflated_zeros(name: str, zeros: int, head: bytes = b"") -> Member:
    """`head` then `zeros` zero bytes (a multiple of 16 MiB), deflated about 1000 times."""
    assert zeros % _ZERO_BLOCK == 0
    blocks = zeros // _ZERO_BLOCK
    parts = []
    if head:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts.append(c.compress(head) + c.flush(zlib.Z_FULL_FLUSH))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_block = c.compress(bytes(_ZERO_BLOCK)) + c.flush(zlib.Z_FULL_FLUSH)
    parts.append(zero_block * blocks)
    parts.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush())  # the final, empty block
    crc = _crc32_combine(zlib.crc32(head), _zeros_crc(zeros), zeros)
    return Member(name, b"".join(parts), zipfile.ZIP_DEFLATED, crc, len(head) + zeros)


def zip_bytes(members: list[Member]) -> bytes:
    """A plain (non-zip64) archive of `members`; sizes must stay under 4 GiB."""
    out = io.BytesIO()
    central = []
    date = (0 << 9) | (1 << 5) | 1  # 1980-01-01
    for m in members:
        offset = out.tell()
        name = m.name.encode()
        out.write(
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                20,
                0,
                m.method,
                0,
                date,
                m.crc,
                len(m.payload),
                m.size,
                len(name),
                0,
            )
        )
        out.write(name)
        out.write(m.payload)
        central.append(
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                m.method,
                0,
                date,
                m.crc,
                len(m.payload),
                m.size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    start = out.tell()
    directory = b"".join(central)
    out.write(directory)
    out.write(
        struct.pack(
            "<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), start, 0
        )
    )
    return out.getvalue()


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(
        buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def npy_member(name: str, array: np.ndarray) -> Member:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    np.save(buffer, array)
    return deflated(name, buffer.getvalue())


def torch_members(data: bytes) -> list[Member]:
    """The members of a torch.save archive, stored as torch writes them."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [stored(info.filename, archive.read(info)) for info in archive.infolist()]


def padded_pickle(data: bytes, opcodes: int) -> bytes:
    """A torch.save archive whose data.pkl also runs `opcodes` BINPUTs: valid, just long."""
    members = []
    for m in torch_members(data):
        if m.name.endswith("/data.pkl"):
            pkl = m.payload
            at = pkl.index(b"q\x00") + 2  # after the first memo store, the top stays put
            members.append(deflated(m.name, pkl[:at] + b"q\xff" * opcodes + pkl[at:]))
        else:
            members.append(m)
    return zip_bytes(members)


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B): zlib's crc32_combine, ported."""
    if len2 == 0:
        return crc1
    odd = [_CRC_POLY] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def _zeros_crc(length: int) -> int:
    """CRC-32 of `length` zero bytes (a multiple of 16 MiB), by doubling a block's."""
    crc, piece, piece_len = 0, zlib.crc32(bytes(_ZERO_BLOCK)), _ZERO_BLOCK
    count = length // _ZERO_BLOCK
    while count:
        if count & 1:
            crc = _crc32_combine(crc, piece, piece_len)
        piece = _crc32_combine(piece, piece, piece_len)
        piece_len *= 2
        count >>= 1
    return crc
