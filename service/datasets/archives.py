"""The members of an uploaded `.zip` or `.tar`, checked before a byte of them is extracted.

Nothing is ever written to disk under a member's name: members are read into memory one at a
time by the image reader. The names are still checked as if they were extracted (no absolute
paths, no `..`), since a dataset that means to climb out of its folder is hostile, not data.
Tar links, devices and FIFOs are refused (a regular file or a folder is all an image dataset
holds), and so are zip members whose Unix mode says symlink. The sizes the archive declares are
added up and held to the dataset limit before anything is read; no zip member is inflated
past its declared size (reads are bounded by it), and tar stores its members
uncompressed (compressed tars are refused).
"""

from __future__ import annotations

import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from service.errors import InvalidDataset, PayloadTooLarge, shorten

ArchiveKind = Literal["zip", "tar"]

# A POSIX ustar or GNU tar header carries "ustar" at offset 257; old v7 tars have no magic and
# are not taken. gzip, bzip2 and xz magics, to name a compressed tar instead of "not an archive".
_TAR_MAGIC_OFFSET = 257
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# The end-of-central-directory record is 22 bytes plus a comment of at most 65,535.
_EOCD_SEARCH = 22 + 0xFFFF
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Member:
    """A regular file of the archive: its normalized path parts and the size it declares."""

    name: str
    parts: tuple[str, ...]
    size: int


def sniff_archive(path: Path) -> ArchiveKind | None:
    """`zip` or `tar` from the file's bytes (an extension is only the client's claim)."""
    with path.open("rb") as f:
        head = f.read(_TAR_MAGIC_OFFSET + 8)
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return None


def image_archive_kind(path: Path, filename: str, *, max_members: int) -> ArchiveKind | None:
    """Whether an upload is an image archive (`zip`, `tar`) or not (None: `.npz`/safetensors).

    Both `.npz` and image datasets are zips: a zip is an `.npz` when the client named it so or
    when any member is an `.npy` array, and an image archive otherwise. Compressed tars are
    refused by name (their declared sizes cannot be read without inflating them).
    """
    kind = sniff_archive(path)
    if kind == "zip":
        if filename.lower().endswith(".npz"):
            return None
        # Before zipfile parses the directory: a 1 GB zip of empty entries is 20 million objects.
        try:
            declared = zip_entry_count(path, stop_after=max_members)
        except (ValueError, OSError, struct.error):
            return "zip" if filename.lower().endswith(".zip") else None
        if declared is not None and declared > max_members:
            raise _too_many(filename, max_members)
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip" if filename.lower().endswith(".zip") else None
        return None if any(n.endswith(".npy") for n in names) else "zip"
    if kind is None:
        with path.open("rb") as f:
            head = f.read(6)
        compressed = next((n for magic, n in _COMPRESSED.items() if head.startswith(magic)), None)
        if compressed is not None:
            raise InvalidDataset(
                f"{shorten(filename)!r} is {compressed}-compressed; send an uncompressed .tar "
                "or a .zip of the class folders",
                code="unreadable_dataset",
            )
    return kind


def zip_entry_count(path: Path, *, stop_after: int) -> int | None:
    """The entries of a zip's central directory, counted header by header without building
    them (up to `stop_after + 1`), or None where the end record cannot be found.

    The end record's own count can lie (zipfile reads the directory by its byte size and
    ignores it), so the headers are walked: each is 46 bytes plus its name, extra field and
    comment. A directory that is not where the end record says is refused, since zipfile
    would then parse it from elsewhere, past this count.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        start = max(0, size - _EOCD_SEARCH)
        f.seek(start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        count, cd_size, cd_offset = struct.unpack("<HII", tail[at + 10 : at + 20])
        if count == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
            # zip64: a locator 20 bytes before the record points at the zip64 record.
            locator = tail[at - 20 : at] if at >= 20 else b""
            if not locator.startswith(b"PK\x06\x07"):
                return None
            (offset,) = struct.unpack("<Q", locator[8:16])
            f.seek(offset)
            record = f.read(56)
            if not record.startswith(b"PK\x06\x06") or len(record) < 56:
                return None
            count, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
        return _walk_directory(f, cd_offset, cd_size, stop_after)


def _walk_directory(f: BinaryIO, offset: int, size: int, stop_after: int) -> int:
    """Count central-directory headers from `offset` over `size` bytes, reading in blocks."""
    f.seek(offset)
    count, left, buffer = 0, size, b""
    while left > 0 or buffer:
        if len(buffer) < 46 and left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            left -= len(block)
            buffer += block
            continue
        if len(buffer) < 46 or not buffer.startswith(b"PK\x01\x02"):
            raise ValueError("the zip's central directory is not where its end record says")
        name, extra, comment = struct.unpack("<HHH", buffer[28:34])
        length = 46 + name + extra + comment
        count += 1
        if count > stop_after:
            return count
        while len(buffer) < length and left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            left -= len(block)
            buffer += block
        buffer = buffer[length:]
    return count


def _unsafe(filename: str, name: str, why: str) -> InvalidDataset:
    return InvalidDataset(
        f"{shorten(filename)!r} holds {shorten(name)!r}, {why}; an image dataset holds only "
        "image files in class folders, and nothing is extracted from an archive that does this",
        code="unsafe_archive",
        member=shorten(name),
    )


def _parts(filename: str, name: str) -> tuple[str, ...]:
    """The member's path parts, refused when it is absolute or climbs out with `..`."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise _unsafe(filename, name, "an absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(filename, name, "a path that climbs out of the archive with '..'")
    if any("\x00" in p for p in parts):
        raise _unsafe(filename, name, "a name with a NUL byte")
    return parts


def _too_many(filename: str, max_members: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{shorten(filename)!r} holds more than {max_members} entries; the limit is "
        f"{max_members} (BNSERVE_MAX_DATASET_FILES)",
        code="too_many_files",
        limit=max_members,
    )


def _too_large(filename: str, declared: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{shorten(filename)!r} declares {declared} bytes of files once extracted; the limit is "
        f"{max_bytes} (BNSERVE_MAX_DATASET_BYTES)",
        code="dataset_too_large",
        limit_bytes=max_bytes,
        declared_bytes=declared,
    )


class Archive:
    """An open archive: its checked regular files (`members`) and a way to read each one."""

    def __init__(self, kind: ArchiveKind, handle: zipfile.ZipFile | tarfile.TarFile) -> None:
        self.kind = kind
        self._handle = handle
        self.members: list[Member] = []
        self._infos: dict[str, zipfile.ZipInfo | tarfile.TarInfo] = {}

    def read(self, member: Member) -> bytes:
        """One member's bytes, at most its declared size; 422 `unreadable_file` naming it."""
        try:
            return self._read(member)
        except (
            zipfile.BadZipFile,
            tarfile.TarError,
            zlib.error,
            OSError,
            EOFError,
            RuntimeError,  # an encrypted zip member
            NotImplementedError,  # a compression method zipfile does not have
        ) as e:
            raise InvalidDataset(
                f"{shorten(member.name)!r} cannot be extracted: {shorten(str(e))}",
                code="unreadable_file",
            ) from None

    def _read(self, member: Member) -> bytes:
        info = self._infos[member.name]
        if isinstance(info, zipfile.ZipInfo):
            assert isinstance(self._handle, zipfile.ZipFile)
            # Bounded: `ZipFile.read` inflates the whole stream (up to 1 GiB) before cutting it
            # to the declared size; a bounded read stops the inflater there, CRC still checked.
            with self._handle.open(info) as member_file:
                return member_file.read(info.file_size)
        assert isinstance(self._handle, tarfile.TarFile)
        extracted = self._handle.extractfile(info)
        if extracted is None:  # not a regular file: refused when listed, so never here
            raise ValueError(f"{member.name!r} is not a regular file")
        with extracted:
            return extracted.read(info.size)

    def _add(
        self,
        filename: str,
        parts: tuple[str, ...],
        size: int,
        info: zipfile.ZipInfo | tarfile.TarInfo,
    ) -> None:
        name = "/".join(parts)
        if name in self._infos:  # a second member by that path: which one is the data?
            raise _unsafe(filename, name, "a path that appears twice")
        self.members.append(Member(name, parts, size))
        self._infos[name] = info


@contextmanager
def open_archive(
    path: Path, filename: str, kind: ArchiveKind, *, max_bytes: int, max_members: int
) -> Iterator[Archive]:
    """The archive with every entry checked and the declared sizes within `max_bytes`.

    Refusals: 422 `unsafe_archive` (traversal, absolute names, links, devices), 413
    `too_many_files` and `dataset_too_large`, 422 `unreadable_dataset` (a broken archive).
    """
    try:
        if kind == "zip":
            declared = zip_entry_count(path, stop_after=max_members)
            if declared is not None and declared > max_members:
                raise _too_many(filename, max_members)
            with zipfile.ZipFile(path) as zf:
                archive = Archive("zip", zf)
                infos = zf.infolist()
                if len(infos) > max_members:
                    raise _too_many(filename, max_members)
                for info in infos:
                    _add_zip_member(archive, filename, info)
                _check_size(archive, filename, max_bytes)
                yield archive
        else:
            with tarfile.open(path, mode="r:") as tf:
                archive = Archive("tar", tf)
                count = 0
                # One header at a time, so a tar of a million empty entries stops at the limit.
                while (entry := tf.next()) is not None:
                    count += 1
                    if count > max_members:
                        raise _too_many(filename, max_members)
                    _add_tar_member(archive, filename, entry)
                _check_size(archive, filename, max_bytes)
                yield archive
    except (InvalidDataset, PayloadTooLarge):
        raise
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise InvalidDataset(
            f"could not read {shorten(filename)!r} as a {kind} archive: {shorten(str(e))}",
            code="unreadable_dataset",
        ) from e


def _add_zip_member(archive: Archive, filename: str, info: zipfile.ZipInfo) -> None:
    parts = _parts(filename, info.filename)
    mode = info.external_attr >> 16
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _unsafe(filename, info.filename, "a symbolic link or special file")
    if info.is_dir() or not parts:
        return
    archive._add(filename, parts, info.file_size, info)


def _add_tar_member(archive: Archive, filename: str, info: tarfile.TarInfo) -> None:
    parts = _parts(filename, info.name)
    if info.issym() or info.islnk():
        raise _unsafe(filename, info.name, f"a link to {shorten(info.linkname)!r}")
    if info.isdir():
        return
    if not info.isfile():
        raise _unsafe(filename, info.name, "a device, FIFO or other special file")
    if parts:
        archive._add(filename, parts, info.size, info)


def _check_size(archive: Archive, filename: str, max_bytes: int) -> None:
    declared = sum(m.size for m in archive.members)
    if declared > max_bytes:
        raise _too_large(filename, declared, max_bytes)
