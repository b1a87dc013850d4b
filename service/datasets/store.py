"""Training datasets: checked on upload, stored content-addressed by sha256, recorded in the DB.

Blocking: call from a thread.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.reader import DEFAULT_MAX_BYTES, Dataset, read_dataset, read_labels
from service.db.tables import DatasetRow, utcnow
from service.errors import CorruptCheckpoint, NotFound
from service.files import Owner, fsync_file, publish, sha256_file


class DatasetStore:
    def __init__(
        self,
        root: Path,
        owner: Owner,
        sessions: sessionmaker[Session],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.root = root
        self.owner = owner
        self._sessions = sessions
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def add(self, upload: Path, filename: str, name: str | None) -> DatasetRow:
        """Check an uploaded file, then keep it under its sha256 (identical uploads share it)."""
        dataset = read_dataset(upload, filename, max_bytes=self.max_bytes)
        sha = sha256_file(upload)
        # By content, not by the client's file name: identical bytes are stored once.
        with open(upload, "rb") as handle:
            suffix = ".npz" if handle.read(4) == b"PK\x03\x04" else ".safetensors"
        final = self.root / f"{sha}{suffix}"
        if not final.exists():
            # The upload sits in the same data dir, so the final move is an atomic rename.
            fsync_file(upload)
            publish(upload, final)
        row = DatasetRow(
            id=uuid.uuid4().hex,
            name=name or filename or sha[:12],
            sha256=sha,
            num_samples=dataset.num_samples,
            x_shape=list(dataset.x.shape),
            y_shape=list(dataset.y.shape),
            y_kind=dataset.y_kind,
            size_bytes=final.stat().st_size,
            filename=final.name,
            created_at=utcnow(),
        )
        with self._sessions.begin() as session:
            session.add(row)
        return row

    def get(self, dataset_id: str) -> DatasetRow:
        with self._sessions.begin() as session:
            row = session.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id!r} does not exist", code="dataset_not_found")
            return row

    def all(self) -> list[DatasetRow]:
        with self._sessions.begin() as session:
            return list(session.scalars(select(DatasetRow).order_by(DatasetRow.created_at)))

    def load(self, row: DatasetRow) -> Dataset:
        """The stored tensors, refused when the file no longer matches its sha256."""
        path = self.root / row.filename
        found = sha256_file(path)
        if found != row.sha256:
            raise CorruptCheckpoint(
                f"dataset file {row.filename} is corrupt (sha256 {found}, recorded {row.sha256})",
                code="corrupt_dataset",
            )
        return read_dataset(path, row.filename, max_bytes=self.max_bytes)

    def labels(self, row: DatasetRow) -> torch.Tensor:
        """Only the stored `y`, as read on upload; `load` (in the worker) checks the sha256."""
        return read_labels(self.root / row.filename, row.filename, max_bytes=self.max_bytes)

    def sweep(self) -> None:
        self.owner.sweep(self.root)
