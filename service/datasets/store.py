"""Training datasets: checked on upload, stored content-addressed by sha256, recorded in the DB.

A dataset is stored like a checkpoint version: the checked upload is renamed to a temp file in
the dataset folder whose name carries its sha256, its row is committed, then the temp file is
renamed to `<sha256>.<suffix>`. A failure before the commit (a full disk, a failed insert)
removes the temp file at once; a crash leaves a dead writer's temp file that `recover` deletes,
or, after the commit, rolls forward. So a file under its final name always has a row, and a row
always has its file (or the temp file that becomes it).

Blocking: call from a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.archives import ArchiveKind, image_archive_kind
from service.datasets.images import (
    ImageLimits,
    ImageSamples,
    load_image_samples,
    scan_image_archive,
)
from service.datasets.reader import DEFAULT_MAX_BYTES, Dataset, read_dataset, read_labels
from service.db.engine import read_sessions
from service.db.tables import DatasetRow, utcnow
from service.errors import CorruptCheckpoint, InvalidInput, NotFound
from service.files import (
    Owner,
    disk_full_as_error,
    fsync_file,
    publish,
    sha256_file,
    temp_owner,
    temp_tag,
)
from service.preprocess.pipeline import ImagePipeline

log = logging.getLogger(__name__)

# The `name` column's length: a longer name is refused rather than cut or left to the driver.
MAX_NAME_LENGTH: int = DatasetRow.__table__.c.name.type.length  # type: ignore[attr-defined]


class DatasetStore:
    def __init__(
        self,
        root: Path,
        owner: Owner,
        sessions: sessionmaker[Session],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_image_pixels: int = 4096 * 4096,
        max_files: int = 100_000,
    ) -> None:
        self.root = root
        self.owner = owner
        self._sessions = sessions
        self._reads = read_sessions(sessions)  # on SQLite: no write lock for reads
        self.max_bytes = max_bytes
        self.image_limits = ImageLimits(
            max_pixels=max_image_pixels, max_bytes=max_bytes, max_files=max_files
        )
        root.mkdir(parents=True, exist_ok=True)

    def add(self, upload: Path, filename: str, name: str | None) -> DatasetRow:
        """Check an uploaded file, then keep it under its sha256 (identical uploads share it)."""
        if name is not None and len(name) > MAX_NAME_LENGTH:
            raise InvalidInput(
                f"dataset name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}",
                code="invalid_name",
                limit=MAX_NAME_LENGTH,
            )
        kind = image_archive_kind(upload, filename, max_members=self.image_limits.max_files)
        row = DatasetRow(id=uuid.uuid4().hex, size_bytes=upload.stat().st_size, created_at=utcnow())
        if kind is not None:
            info = scan_image_archive(upload, filename, kind, self.image_limits)
            sha = sha256_file(upload)
            final = self.root / f"{sha}.{kind}"
            row.kind, row.classes = "images", info.classes
            row.image_size = None if info.image_size is None else list(info.image_size)
            row.num_samples, row.x_shape = info.num_samples, None
            row.y_shape, row.y_kind = [info.num_samples], "class"
        else:
            dataset = read_dataset(upload, filename, max_bytes=self.max_bytes)
            sha = sha256_file(upload)
            # By content, not by the client's file name: identical bytes are stored once.
            with open(upload, "rb") as handle:
                suffix = ".npz" if handle.read(4) == b"PK\x03\x04" else ".safetensors"
            final = self.root / f"{sha}{suffix}"
            row.kind, row.num_samples = "tensors", dataset.num_samples
            row.x_shape, row.y_shape = list(dataset.x.shape), list(dataset.y.shape)
            row.y_kind = dataset.y_kind
        row.filename, row.sha256 = final.name, sha
        row.name = name or (filename or sha[:12])[:MAX_NAME_LENGTH]
        staged = self.owner.temp_path(self.root, tag=sha)
        try:
            with disk_full_as_error(self.root):
                # The upload sits in the same data dir, so this is a rename, not a copy.
                fsync_file(upload)
                os.replace(upload, staged)
                self._insert(staged, row)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        self._keep(staged, final, row)
        return row

    def _insert(self, staged: Path, row: DatasetRow) -> None:
        """Commit the row (object storage puts the object first: service/datasets/remote.py)."""
        with self._sessions.begin() as session:
            session.add(row)

    def _keep(self, staged: Path, final: Path, row: DatasetRow) -> None:
        """The row is committed: give the staged file its final name."""
        # Even when `final` exists (identical bytes stored before): replacing it with the same
        # bytes is harmless, and it cannot then be an orphan that a recovery removes meanwhile.
        try:
            publish(staged, final)
        except FileNotFoundError:
            # Another process's `recover` rolled it forward between our commit and this rename.
            if not final.exists():
                raise

    def get(self, dataset_id: str) -> DatasetRow:
        with self._reads.begin() as session:
            row = session.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id!r} does not exist", code="dataset_not_found")
            return row

    def all(self) -> list[DatasetRow]:
        with self._reads.begin() as session:
            return list(session.scalars(select(DatasetRow).order_by(DatasetRow.created_at)))

    def load(self, row: DatasetRow) -> Dataset:
        """The stored tensors, refused when the file no longer matches its sha256."""
        with self._verified(row) as path:
            return read_dataset(path, row.filename, max_bytes=self.max_bytes)

    def load_images(self, row: DatasetRow, pipeline: ImagePipeline) -> ImageSamples:
        """An image dataset through `pipeline` up to CenterCrop (uint8), its sha256 checked."""
        kind: ArchiveKind = "tar" if row.filename.endswith(".tar") else "zip"
        with self._verified(row) as path:
            return load_image_samples(path, pipeline, self.image_limits, kind=kind)

    @contextmanager
    def _verified(self, row: DatasetRow) -> Iterator[Path]:
        """The dataset's file once it hashes to the recorded sha256, for the block (a remote
        store's cached copy may be evicted after it)."""
        path = self.root / row.filename
        if not path.exists():
            self._roll_forward(row.filename, row.sha256)
        found = sha256_file(path)
        if found != row.sha256:
            raise CorruptCheckpoint(
                f"dataset file {row.filename} is corrupt (sha256 {found}, recorded {row.sha256})",
                code="corrupt_dataset",
            )
        yield path

    def labels(self, row: DatasetRow) -> torch.Tensor:
        """Only the stored `y`, as read on upload; `load` (in the worker) checks the sha256."""
        with self._unverified(row) as path:
            return read_labels(path, row.filename, max_bytes=self.max_bytes)

    @contextmanager
    def _unverified(self, row: DatasetRow) -> Iterator[Path]:
        yield self.root / row.filename

    def _roll_forward(self, filename: str, sha256: str) -> bool:
        """Finish a store that a crash cut between the row's commit and the rename."""
        temps = [p for p in self.root.iterdir() if temp_owner(p) and temp_tag(p) == sha256]
        # The same bytes may be staged by a live upload too: a dead writer's file is the lost one.
        temps.sort(key=lambda p: self.owner.is_alive(temp_owner(p) or ""))
        if temps:
            with contextlib.suppress(FileNotFoundError):  # another process finished it first
                publish(temps[0], self.root / filename)
        return (self.root / filename).exists()

    def recover(self) -> list[str]:
        """Make the folder agree with the rows after a crash (run on start); returns what it did.

        The folder is listed before the rows are read: a file gets its final name only after
        its row is committed, so a listed final file with no row by then really is an orphan.
        """
        listed = [p for p in self.root.iterdir() if p.is_file()]
        with self._reads.begin() as session:
            known = dict(session.execute(select(DatasetRow.filename, DatasetRow.sha256)).all())
        actions: list[str] = []
        for filename, sha in known.items():
            if not (self.root / filename).exists() and self._roll_forward(filename, sha):
                actions.append(f"rolled forward {filename}")
        for path in listed:
            if (
                temp_owner(path) is None
                and not path.name.startswith(".")
                and (path.name not in known)
            ):
                path.unlink(missing_ok=True)
                actions.append(f"removed orphan dataset file {path.name}")
        actions += [f"removed temp file {p.name}" for p in self.owner.sweep(self.root)]
        for action in actions:
            log.warning("dataset store recovery: %s", action)
        return actions
