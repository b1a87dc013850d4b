"""Checkpoint files: one canonical safetensors file per version, written crash-safely.

Layout: `<checkpoints>/<model id>/v<N>.safetensors`. A version is published in three steps:
`stage` writes and fsyncs a temp file whose name carries the sha256, the registry commits the
version row, then `publish` renames the temp file to `v<N>.safetensors`. A crash before the
commit leaves only a dead writer's temp file, which `recover` deletes; a crash between commit and
rename leaves a row whose temp file `recover` (or the next read) moves into place. Version
numbers are never reused, so a `v<N>` file without a row can always be deleted.

Replicas share the folder, so one process may recover while another publishes. `recover` lists
the files before it reads the rows: a file only appears under its final name after its row is
committed, so any listed file that has no row by then really is an orphan.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.errors import CorruptCheckpoint, NotFound
from service.files import (
    Owner,
    disk_full_as_error,
    publish,
    temp_owner,
    temp_tag,
    write_durably,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedCheckpoint:
    model_id: str
    path: Path
    sha256: str
    size_bytes: int


def version_filename(version: int) -> str:
    return f"v{version}.safetensors"


class CheckpointStore:
    """Checkpoint bytes on disk; the registry's rows say which of them exist."""

    def __init__(self, root: Path, owner: Owner) -> None:
        self.root = root
        self.owner = owner
        root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, model_id: str) -> Path:
        return self.root / model_id

    def close(self) -> None:
        """Nothing to release: the folder's locks belong to the process's `Owner`."""

    def stage(self, model_id: str, data: bytes) -> StagedCheckpoint:
        """Write `data` to a temp file (removed again on failure; 507 when the disk is full)."""
        folder = self.model_dir(model_id)
        sha = hashlib.sha256(data).hexdigest()
        temp = self.owner.temp_path(folder, tag=sha)
        with disk_full_as_error(self.root):
            folder.mkdir(parents=True, exist_ok=True)
            write_durably(temp, [data])
        return StagedCheckpoint(model_id, temp, sha, len(data))

    def publish(self, staged: StagedCheckpoint, version: int) -> str:
        name = version_filename(version)
        final = self.model_dir(staged.model_id) / name
        try:
            publish(staged.path, final)
        except FileNotFoundError:
            # Another process's `recover` rolled this version forward between our commit and
            # this rename; the row is committed, so the file it moved is ours.
            if not final.exists():
                raise
        return name

    def discard(self, staged: StagedCheckpoint) -> None:
        staged.path.unlink(missing_ok=True)

    def read(self, model_id: str, filename: str, sha256: str) -> bytes:
        """The checkpoint's bytes, refused when they no longer hash to the recorded sha256."""
        with self.open_verified(model_id, filename, sha256) as handle:
            return handle.read()

    def open_verified(self, model_id: str, filename: str, sha256: str) -> BinaryIO:
        """The checkpoint opened for reading at its start, once its bytes hash to `sha256`.

        For streaming it out without holding it in memory: the hash is taken through the same
        handle, and versions are only ever replaced by rename, so what is sent is what was
        checked.
        """
        path = self.model_dir(model_id) / filename
        if not path.exists():
            self._roll_forward(model_id, filename, sha256)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFound(
                f"checkpoint file {filename} of model {model_id} is missing from the store",
                code="checkpoint_missing",
            ) from None
        try:
            found = hashlib.file_digest(handle, "sha256").hexdigest()
            if found != sha256:
                raise CorruptCheckpoint(
                    f"checkpoint {filename} is corrupt: its sha256 is {found}, the registry "
                    f"recorded {sha256}; refusing to serve it (restore the file or upload the "
                    "version again)",
                    expected_sha256=sha256,
                    found_sha256=found,
                )
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle

    def delete_model(self, model_id: str) -> None:
        shutil.rmtree(self.model_dir(model_id), ignore_errors=True)

    def recover(self, read_known: Callable[[], dict[str, dict[str, str]]]) -> list[str]:
        """Make the folder agree with the registry after a crash; returns what it did.

        `read_known` returns model id -> {filename: sha256} for every recorded version; it is
        called after the folder is listed (see the module docstring for why).
        """
        listed = {
            folder.name: list(folder.iterdir())
            for folder in self.root.iterdir()
            if folder.is_dir() and not folder.name.startswith(".")
        }
        known = read_known()
        actions: list[str] = []
        for model_id, files in known.items():
            for filename, sha in files.items():
                if not (self.model_dir(model_id) / filename).exists() and self._roll_forward(
                    model_id, filename, sha
                ):
                    actions.append(f"rolled forward {model_id}/{filename}")
        for model_id, paths in listed.items():
            folder = self.model_dir(model_id)
            if model_id not in known:
                # A deleted model's folder, unless a live process is still staging into it.
                if not any(self._is_live_temp(p) for p in folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
                    actions.append(f"removed orphan folder {model_id}")
                continue
            for path in paths:
                if temp_owner(path) is not None:
                    if not self._is_live_temp(path) and path.exists():
                        path.unlink(missing_ok=True)
                        actions.append(f"removed temp file {model_id}/{path.name}")
                elif path.name not in known[model_id]:
                    path.unlink(missing_ok=True)
                    actions.append(f"removed orphan checkpoint {model_id}/{path.name}")
        for action in actions:
            log.warning("checkpoint store recovery: %s", action)
        return actions

    def _is_live_temp(self, path: Path) -> bool:
        token = temp_owner(path)
        return token is not None and self.owner.is_alive(token)

    def _roll_forward(self, model_id: str, filename: str, sha256: str) -> bool:
        """Finish a publish that a crash cut between the registry commit and the rename."""
        folder = self.model_dir(model_id)
        if not folder.is_dir():
            return False
        candidates = [
            p for p in folder.iterdir() if temp_owner(p) is not None and temp_tag(p) == sha256
        ]
        if not candidates:
            return False
        # The same bytes may also be staged by a live upload of a later version: a dead writer's
        # temp file is the one this row lost.
        candidates.sort(key=self._is_live_temp)
        # FileNotFoundError: another process finished it first.
        with contextlib.suppress(FileNotFoundError):
            publish(candidates[0], folder / filename)
        return (folder / filename).exists()
