"""Request and response bodies of the HTTP contract (shared/API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.tables import ModelRow, VersionRow


class ErrorBody(BaseModel):
    detail: str
    code: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    models: dict[str, dict[str, Any]]


class ArchitecturePublic(BaseModel):
    name: str
    description: str
    input_shape: list[int]
    task: str
    config_schema: dict[str, Any]
    default_config: dict[str, Any]


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(examples=["digits"])
    architecture: str = Field(examples=["mnist_cnn"])
    config: dict[str, Any] = Field(default_factory=dict)


class VersionPublic(BaseModel):
    version: int
    sha256: str
    size_bytes: int
    source: str
    note: str | None
    created_at: datetime
    report: dict[str, Any]
    lineage: dict[str, Any] | None
    serving: bool

    @classmethod
    def of(cls, row: VersionRow, serving_version: int | None) -> VersionPublic:
        return cls(
            version=row.version,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            source=row.source,
            note=row.note,
            created_at=row.created_at,
            report=row.report,
            lineage=row.lineage,
            serving=row.version == serving_version,
        )


class ModelPublic(BaseModel):
    name: str
    architecture: str
    config: dict[str, Any]
    input_shape: list[int]
    task: str
    labels: list[str] | None
    serving_version: int | None
    versions: list[VersionPublic]
    created_at: datetime

    @classmethod
    def of(
        cls, row: ModelRow, input_shape: tuple[int, ...], task: str, labels: list[str] | None
    ) -> ModelPublic:
        return cls(
            name=row.name,
            architecture=row.architecture,
            config=row.config,
            input_shape=list(input_shape),
            task=task,
            labels=labels,
            serving_version=row.serving_version,
            versions=[VersionPublic.of(v, row.serving_version) for v in row.versions],
            created_at=row.created_at,
        )


class PromoteResult(BaseModel):
    model: str
    serving_version: int
    previous_version: int | None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="One sample (nested list of the model's input shape) or a batch of them"
    )


class PredictResponse(BaseModel):
    model: str
    version: int
    outputs: list[Any]
    predictions: list[int] | None = None
    probabilities: list[list[float]] | None = None
    labels: list[str] | None = Field(
        default=None, description="class label of each prediction, when the model has labels"
    )
