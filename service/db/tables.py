"""The registry's tables: models, their versions, datasets and training jobs.

The database is the one truth that every API process and worker shares: which versions exist,
which one serves, and where each job stands. Checkpoint bytes live in files beside it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored; use utcnow()")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    architecture: Mapped[str] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    serving_version: Mapped[int | None] = mapped_column(Integer)
    # Per-model serving options (`ServingOptions` in the API); null: the settings' defaults.
    serving: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The input pipeline (`Preprocess` in service/preprocess/image.py), fixed at creation so every
    # version is served through the pipeline it was made for; null: the model takes tensors.
    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Bumped in the same transaction that inserts a version: numbers are unique, gap-free and
    # never reused, even after a version is deleted.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="VersionRow.version",
    )


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(String(255))
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Where a trained version came from: job id, parent version, dataset sha256, hyperparameters
    # and final metrics.
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    model: Mapped[ModelRow] = relationship(back_populates="versions")


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    num_samples: Mapped[int] = mapped_column(Integer)
    # "tensors" (.npz / .safetensors: x and y) or "images" (a .zip or .tar of class folders).
    kind: Mapped[str] = mapped_column(String(16), default="tensors", server_default="tensors")
    # None for image datasets: their samples' shape is the pipeline of the model trained on them.
    x_shape: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    y_shape: Mapped[list[Any]] = mapped_column(JSON)
    y_kind: Mapped[str] = mapped_column(String(16))
    # Image datasets: the class folders' names, sorted (label i is classes[i]), and the
    # [height, width] all images share (None when they differ).
    classes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    image_size: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), default="train")
    # No foreign key: a job outlives its model. Deleting a model ends its active jobs
    # `cancelled`, and their rows and metrics stay readable (migration 0004 dropped the cascade).
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    # "serving", a version number as text, or None for fresh weights.
    base_version: Mapped[str | None] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    promote: Mapped[str] = mapped_column(String(16), default="if_better")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Written in the same transaction that adds the version: a job has published exactly when
    # this is set, whatever happens to its worker afterwards.
    result_version: Mapped[int | None] = mapped_column(Integer)
    promoted: Mapped[bool | None] = mapped_column(Boolean)
    # A finished training job's kept epoch (keep=best or last) and why it stopped: "completed"
    # or "early_stopping".
    kept_epoch: Mapped[int | None] = mapped_column(Integer)
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # "publishing" once the worker has started storing the result: from then on a cancel is
    # refused, so a 202 to cancel always means that no version is left behind.
    phase: Mapped[str | None] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
