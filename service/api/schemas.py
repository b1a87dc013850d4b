"""Request and response bodies of the HTTP contract (shared/API.md), for server and client."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.names import NAME_PATTERN
from service.preprocess.pipeline import Preprocess
from service.training.options import Augment, EarlyStopping, LRSchedule
from service.training.params import PreciseBN

if TYPE_CHECKING:
    # Only for the `of` constructors: the client imports these models without the database.
    from service.db.tables import DatasetRow, JobRow, ModelRow, VersionRow


class ErrorBody(BaseModel):
    """Every error answer; some carry more fields (`errors`, `limit`, ...) beside these two."""

    model_config = ConfigDict(extra="allow")

    detail: str = Field(description="what is wrong, and what to do about it")
    code: str = Field(description="a stable snake_case name of the problem", examples=["not_found"])


class V2ErrorBody(BaseModel):
    """Every error answer on `/v2` paths: the Open Inference Protocol's form, with our `code`."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what is wrong, and what to do about it")
    code: str = Field(description="a stable snake_case name of the problem", examples=["not_found"])


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


class ServingOptions(BaseModel):
    """How one model is served; anything left out takes the server's setting."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="most samples in one forward pass (default BNSERVE_MAX_BATCH_SIZE); a "
        "heavy model on a small CPU may want fewer, a GPU more",
    )


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Documented, not enforced here: the registry refuses other names with `invalid_name`.
    name: str = Field(examples=["digits"], json_schema_extra={"pattern": NAME_PATTERN.pattern})
    architecture: str = Field(examples=["mnist_cnn"])
    config: dict[str, Any] = Field(default_factory=dict)
    serving: ServingOptions = Field(default_factory=ServingOptions)
    preprocess: Preprocess | None = Field(
        None,
        description="an image pipeline (torchvision's convert, Resize, CenterCrop, ToTensor, "
        "Normalize); the model then also takes images. Fixed for the model's life.",
    )


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
    # The serving-time optimizations applied where this process has the version loaded; else null.
    optimizations: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        row: VersionRow,
        serving_version: int | None,
        optimizations: dict[str, Any] | None = None,
    ) -> VersionPublic:
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
            optimizations=optimizations,
        )


class ModelPublic(BaseModel):
    name: str
    architecture: str
    config: dict[str, Any]
    input_shape: list[int]
    task: str
    labels: list[str] | None
    serving_version: int | None
    serving: ServingOptions
    preprocess: Preprocess | None = None
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
            serving=ServingOptions.model_validate(row.serving or {}),
            preprocess=Preprocess.model_validate(row.preprocess) if row.preprocess else None,
            versions=[VersionPublic.of(v, row.serving_version) for v in row.versions],
            created_at=row.created_at,
        )


class PromoteResult(BaseModel):
    model: str
    serving_version: int
    previous_version: int | None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Any, not list: a scalar, string or null then gets the same 422 as a wrong shape, one
    # that names the shape the model expects.
    inputs: Any = Field(
        description="One sample (nested list of the model's input shape) or a batch of them"
    )


class TopClass(BaseModel):
    index: int
    label: str | None
    probability: float


class PredictResponse(BaseModel):
    model: str
    version: int
    outputs: list[Any]
    predictions: list[int] | None = None
    probabilities: list[list[float]] | None = None
    labels: list[str] | None = Field(
        default=None, description="class label of each prediction, when the model has labels"
    )
    top_k: list[list[TopClass]] | None = Field(
        default=None, description="with `?top_k=K`: each sample's K most probable classes"
    )


class DatasetPublic(BaseModel):
    id: str
    name: str
    kind: Literal["tensors", "images"] = Field(
        default="tensors",
        description="'tensors': an .npz or .safetensors of x and y; 'images': a .zip or .tar "
        "of images in class folders",
    )
    num_samples: int
    x_shape: list[int] | None = Field(
        description="N x sample shape; null for image datasets, whose samples take the shape "
        "of the pipeline of the model trained on them"
    )
    y_shape: list[int]
    y_kind: str
    classes: list[str] | None = Field(
        default=None,
        description="image datasets: the class folders' names, sorted (label i is classes[i], "
        "as torchvision's ImageFolder)",
    )
    image_size: list[int] | None = Field(
        default=None,
        description="image datasets: the [height, width] every image has, or null when they differ",
    )
    sha256: str
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, row: DatasetRow) -> DatasetPublic:
        return cls.model_validate(row, from_attributes=True)


class JobCreate(BaseModel):
    """A training job (`kind: train`) or a BN recalibration (`kind: recalibrate_bn`)."""

    # strict: `true` is not a momentum of 1.0, nor "10" ten epochs (JSON has numbers for that).
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    dataset: str
    kind: Literal["train", "recalibrate_bn"] = "train"
    base_version: int | Literal["serving"] | None = Field(
        default=None,
        description="a version number, 'serving', or null for fresh weights "
        "(recalibrate_bn defaults to 'serving')",
    )
    epochs: int | None = Field(default=None, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=2, le=65536)
    lr: float | None = Field(default=None, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    l1: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    promote: Literal["never", "always", "if_better"] = "if_better"
    keep: Literal["best", "last"] = Field(
        default="best",
        description="which epoch's weights the job publishes: 'best' by the validation metric "
        "if_better uses (accuracy, ties to the lower loss, for classifiers; loss otherwise), or "
        "'last'. Without a validation split 'best' keeps the last epoch",
    )
    early_stopping: EarlyStopping | None = Field(
        default=None,
        description="stop once the validation loss has not fallen by more than min_delta for "
        "patience epochs; needs val_fraction > 0",
        examples=[{"patience": 3, "min_delta": 0.001}],
    )
    lr_schedule: LRSchedule | None = Field(
        default=None,
        description="a learning-rate schedule by epoch, after optional linear warm-up epochs: "
        "'step' multiplies lr by gamma (default 0.1) every step_size epochs, 'cosine' anneals it "
        "to 0 by the last epoch",
        examples=[{"kind": "cosine", "warmup_epochs": 2}],
    )
    bn: Literal["train", "frozen"] = Field(
        default="train",
        description="'frozen' keeps every BatchNorm layer in eval mode during training: its "
        "running statistics stay as they were, its scale and shift still learn",
    )
    precise_bn: PreciseBN | None = Field(
        default=None,
        description="after the last epoch, recompute BN running statistics with the kept "
        "weights over this many training batches",
        examples=[{"batches": 50}],
    )
    augment: Augment | None = Field(
        default=None,
        description="image datasets: torchvision's random transforms of these names, applied in "
        "this order to the training split only (never validation or serving), drawn from the "
        "job's seed",
        examples=[{"random_crop": {"size": 32, "padding": 4}, "hflip": 0.5}],
    )


class JobProgress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    eta_s: float | None = Field(
        default=None,
        description="seconds until the last step, from this attempt's time per step so far "
        "(null before the first step)",
    )


class JobSummary(BaseModel):
    """A job as `GET /v1/jobs` lists it: everything but the per-epoch metrics, which grow with
    the epochs (up to 1,000 entries a job) and made a listing of 1,000 jobs megabytes long."""

    id: str
    kind: str
    model: str
    dataset: str
    base_version: int | str | None
    status: str
    progress: JobProgress
    params: dict[str, Any]
    promote: str
    result_version: int | None
    promoted: bool | None
    # Training jobs that succeeded: the epoch whose weights were published, and why it ended.
    kept_epoch: int | None
    stop_reason: str | None
    error: str | None
    attempts: int
    # Epochs this attempt took from the job's saved state instead of running them (0: none).
    resumed_from_epoch: int
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def fields_of(row: JobRow) -> dict[str, Any]:
        base: int | str | None = row.base_version
        if isinstance(base, str) and base.isdigit():
            base = int(base)
        progress = (
            JobProgress(**row.progress)
            if row.progress
            else JobProgress(epochs=int(row.params.get("epochs") or 0))
        )
        return {
            "id": row.id,
            "kind": row.kind,
            "model": row.model_name,
            "dataset": row.dataset_id,
            "base_version": base,
            "status": row.status,
            "progress": progress,
            "params": row.params,
            "promote": row.promote,
            "result_version": row.result_version,
            "promoted": row.promoted,
            "kept_epoch": row.kept_epoch,
            "stop_reason": row.stop_reason,
            "error": row.error,
            "attempts": row.attempts,
            "resumed_from_epoch": int((row.progress or {}).get("resumed_from_epoch", 0)),
            "worker": row.worker_id,
            "created_at": row.created_at,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
        }

    @classmethod
    def of(cls, row: JobRow) -> JobSummary:
        return cls(**cls.fields_of(row))


class JobPublic(JobSummary):
    """One job (`GET /v1/jobs/{id}`, and the answers of create and cancel), with its metrics."""

    metrics: list[dict[str, Any]]

    @classmethod
    def of(cls, row: JobRow) -> JobPublic:
        return cls(**cls.fields_of(row), metrics=row.metrics)
