"""Training and BN-recalibration jobs: created here, run by worker processes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from models import get_architecture
from service.api.deps import ReadAuth, Services, ServicesDep, WriteAuth
from service.api.events import job_events, poll_interval
from service.api.openapi import errors
from service.api.schemas import JobCreate, JobPublic, JobSummary
from service.architectures import check_architecture
from service.datasets.image_jobs import check_image_job
from service.datasets.reader import check_labels_for_model, check_shapes_for_model
from service.db.tables import JobRow
from service.errors import InvalidInput, NotServing
from service.training.options import check_augment
from service.training.trainer import TrainParams, validate_trainable

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# One server-sent event of `GET /v1/jobs/{id}/events` (each event is checked against this).
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["progress", "succeeded", "failed", "cancelled", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": '{"id", "status", "progress", "metrics"} (the latest epoch\'s), plus '
            '"job" (the whole job) on the last event; `error`: {"detail", "code"}',
        },
    },
}


def _validated_params(body: JobCreate, num_samples: int) -> dict[str, Any]:
    if body.kind == "recalibrate_bn":
        if num_samples < 2:
            raise InvalidInput("recalibration needs at least 2 samples", code="dataset_too_small")
        return {"batch_size": body.batch_size, "seed": body.seed}
    missing = [f for f in ("epochs", "lr") if getattr(body, f) is None]
    if missing:
        raise InvalidInput(f"a training job needs {' and '.join(missing)}", code="missing_field")
    fields = body.model_dump(
        include={
            "epochs",
            "batch_size",
            "lr",
            "optimizer",
            "momentum",
            "weight_decay",
            "l1",
            "val_fraction",
            "seed",
            "keep",
            "early_stopping",
            "lr_schedule",
            "bn",
            "precise_bn",
            "augment",
        },
        exclude_none=True,
    )
    try:
        params = TrainParams.model_validate(fields)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
        ]
        raise InvalidInput(
            f"invalid hyperparameters: {errors[0]['message']}",
            code="invalid_hyperparameters",
            errors=errors,
        ) from None
    try:
        validate_trainable(num_samples, params)
    except ValueError as exc:
        raise InvalidInput(
            f"dataset of {num_samples} samples cannot train: {exc}", code="dataset_too_small"
        ) from None
    if body.promote == "if_better" and params.val_fraction == 0:
        raise InvalidInput(
            "promote 'if_better' compares on the validation split: set val_fraction > 0, or "
            "use promote 'always' or 'never'",
            code="invalid_promote",
        )
    # momentum only means something to SGD (TrainParams refuses it set for Adam/AdamW).
    skip = {"momentum"} if params.optimizer != "sgd" else set()
    return params.model_dump(mode="json", exclude_none=True, exclude=skip)


def _create(services: Services, body: JobCreate) -> JobRow:
    """Check everything a worker would trip over before the job is queued, cheapest first.

    The rows answer every check but the class-id range, so a bad request is refused without
    touching the dataset's file; only then is its `y` read (never `x`, and never all of it twice:
    the worker verifies the sha256 when it loads the whole dataset). An image dataset's rows
    answer every check: its labels are its class folders, checked on upload.
    """
    model = services.registry.get_model(body.model)
    arch = get_architecture(model.architecture)
    config = arch.parse_config(model.config)
    check_architecture(arch, config)
    dataset_row = services.datasets.get(body.dataset)
    params = _validated_params(body, dataset_row.num_samples)
    _check_augment(body, dataset_row.kind, tuple(config.input_shape()))
    base = body.base_version
    if base is None and body.kind == "recalibrate_bn":
        base = "serving"
    if base == "serving" and model.serving_version is None:
        raise NotServing(f"model {model.name!r} has no serving version to start from")
    if isinstance(base, int):
        services.registry.get_version(model.name, base)
    if dataset_row.kind == "images":
        check_image_job(
            model_name=model.name,
            job_kind=body.kind,
            classes=list(dataset_row.classes or []),
            image_size=dataset_row.image_size,
            num_samples=dataset_row.num_samples,
            preprocess=model.preprocess,
            input_shape=tuple(config.input_shape()),
            task=config.task,
            num_outputs=config.num_outputs(),
            class_labels=getattr(config, "class_labels", None),
            max_bytes=services.settings.max_dataset_bytes,
        )
    else:
        check_shapes_for_model(
            sample_shape=tuple((dataset_row.x_shape or [])[1:]),
            y_kind=dataset_row.y_kind,
            y_shape=tuple(dataset_row.y_shape),
            input_shape=tuple(config.input_shape()),
            task=config.task,
            num_outputs=config.num_outputs(),
        )
    if config.task == "classification" and dataset_row.kind != "images":
        check_labels_for_model(
            services.datasets.labels(dataset_row), num_outputs=config.num_outputs()
        )
    return services.jobs.create(
        kind=body.kind,
        model_id=model.id,
        model_name=model.name,
        dataset_id=dataset_row.id,
        base_version=None if base is None else str(base),
        params=params,
        promote=body.promote,
    )


def _check_augment(body: JobCreate, dataset_kind: str, input_shape: tuple[int, ...]) -> None:
    """Augmentation transforms images: refused (422) for tensors, or when it cannot keep the
    model's input size (the batches are the model's input)."""
    if body.augment is None:
        return
    if body.kind != "train":
        raise InvalidInput(
            "augment applies to train jobs; a recalibration measures the BN statistics of the "
            "data as it is served, never augmented",
            code="invalid_augment",
        )
    if dataset_kind != "images":
        raise InvalidInput(
            "augment applies to image datasets (a .zip or .tar of class folders); this dataset "
            "holds tensors, which have no pixels to crop, flip or jitter",
            code="augment_needs_images",
        )
    problem = check_augment(body.augment, input_shape[-2], input_shape[-1])
    if problem is not None:
        raise InvalidInput(f"augment: {problem}", code="invalid_augment")


@router.post("", status_code=202, dependencies=[WriteAuth], responses=errors(404, 409, 422))
async def create_job(body: JobCreate, services: ServicesDep) -> JobPublic:
    # On the upload executor: it may read the dataset's labels from disk.
    return JobPublic.of(await services.run_upload(_create, services, body))


@router.get("", dependencies=[ReadAuth])
async def list_jobs(
    services: ServicesDep,
    status: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobSummary]:
    """The newest jobs first, without per-epoch metrics (`GET /v1/jobs/{id}` has them)."""
    rows = await services.db.run(services.jobs.recent, status=status, limit=limit)
    return [JobSummary.of(r) for r in rows]


@router.get("/{job_id}", dependencies=[ReadAuth], responses=errors(404))
async def get_job(job_id: str, services: ServicesDep) -> JobPublic:
    return JobPublic.of(await services.db.run(services.jobs.get, job_id))


@router.get(
    "/{job_id}/events",
    dependencies=[ReadAuth],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`progress` events, then one named after the outcome; see "
            "`service.api.events`",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
        **errors(404),
    },
)
async def job_events_stream(job_id: str, services: ServicesDep) -> StreamingResponse:
    """Follow a job: an event per progress update and a last one named after its outcome."""
    first = await services.db.run(services.jobs.get, job_id)
    return StreamingResponse(
        job_events(
            lambda job_id: services.db.run(services.jobs.get, job_id),
            first,
            poll_s=poll_interval(services.settings.WORKER_HEARTBEAT_S),
        ),
        media_type="text/event-stream",
        # No caching, and no buffering by nginx, which would hold the events back.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/cancel", status_code=202, dependencies=[WriteAuth], responses=errors(404, 409)
)
async def cancel_job(job_id: str, services: ServicesDep) -> JobPublic:
    """A queued job ends `cancelled` at once; a running one stops within a training step."""
    return JobPublic.of(await services.db.run(services.jobs.cancel, job_id))
