"""Running one job: train (or recalibrate BN) a private copy, then publish the result as a version.

The model trained here is built from scratch or from a stored version's weights in this worker
process; it is never an object that serves predictions. The result goes through the same
`publishing.prepare` (validation, canonical bytes, gate) and `publish` as an upload, and a promote
is one database update that every API process follows.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session
from torch import nn

from models import get_architecture
from service.architectures import require_running_stats
from service.checkpoints.validation import state_dict_from_safetensors
from service.datasets.image_jobs import labels_to_record
from service.datasets.images import images_to_tensor
from service.datasets.reader import Dataset
from service.datasets.store import DatasetStore
from service.db.tables import DatasetRow, JobRow, ModelRow, VersionRow
from service.errors import Conflict, InvalidDataset
from service.preprocess.pipeline import Preprocess
from service.publishing import prepare, publish
from service.registry import InTransaction, Registry
from service.serving.precision import current_precision
from service.training.loader import TrainingImages
from service.training.recalibration import recalibrate_bn
from service.training.state import TrainState
from service.training.trainer import EpochMetrics, TrainParams, compare, evaluate, train
from service.worker.eta import StepClock
from service.worker.resume import ResumeStore

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled (or taken from this worker) before it published anything."""


@dataclass
class Outcome:
    result_version: int
    promoted: bool
    # Training jobs only: the epoch whose weights were published, and why the run ended.
    kept_epoch: int | None = None
    stop_reason: str | None = None


@dataclass
class JobHooks:
    should_stop: Callable[[], bool]
    on_progress: Callable[[dict[str, Any]], None]
    on_epoch: Callable[[dict[str, Any]], None]
    # Atomically marks the job as publishing unless it was cancelled; False means cancelled.
    begin_publishing: Callable[[], bool]
    # Whether this worker still holds the job (it was not cancelled or taken from it).
    holds_job: Callable[[], bool] = lambda: True
    # A resumed job's metrics of the epochs it will not run again, with its progress.
    on_resume: Callable[[list[dict[str, Any]], dict[str, Any]], None] = lambda _m, _p: None
    # What records the job's result (promoted or not) inside the version's own transaction.
    # (promoted, kept epoch, stop reason) -> what records them in the version's transaction.
    record_result: Callable[[bool, int | None, str | None], InTransaction | None] = (
        lambda _promoted, _kept, _reason: None
    )


def resolve_base(job: JobRow, model: ModelRow) -> int | None:
    if job.base_version is None:
        return None
    if job.base_version == "serving":
        if model.serving_version is None:
            raise ValueError(f"model {model.name!r} has no serving version to start from")
        return model.serving_version
    return int(job.base_version)


def _seed(job: JobRow) -> int:
    """The job's seed, or one drawn for it (recorded in the lineage) when it named none."""
    seed = job.params.get("seed")
    return int(seed) if seed is not None else secrets.randbits(63)


def _weights(registry: Registry, model: ModelRow, version: int) -> dict[str, torch.Tensor]:
    """A stored version's tensors, of this model only (not of a re-created namesake)."""
    _, _, data = registry.read_checkpoint(model.name, version, model_id=model.id)
    return state_dict_from_safetensors(data)


def _identity(job: JobRow, model: ModelRow, dataset: DatasetRow) -> dict[str, Any]:
    """What a saved training state must match to be resumed: this job, model, data and params."""
    identity = {
        "job_id": job.id,
        "kind": job.kind,
        "model_id": model.id,
        "architecture": model.architecture,
        "config": model.config,
        "dataset_sha256": dataset.sha256,
        "base_version": job.base_version,
        "params": job.params,
    }
    # As it reads back from the file's JSON, so the two compare equal when they are the same.
    normalized: dict[str, Any] = json.loads(json.dumps(identity))
    return normalized


def _saved_state(
    states: ResumeStore, job: JobRow, identity: dict[str, Any]
) -> tuple[TrainState, dict[str, Any]] | None:
    saved = states.load(job.id)
    if saved is None:
        return None
    if saved[1].get("identity") != identity:
        log.warning("job %s: the saved training state is another run's; starting over", job.id)
        states.remove(job.id)
        return None
    return saved


def environment(device: torch.device) -> dict[str, Any]:
    """What a run's bit-for-bit result depends on besides its inputs and seed: the torch build,
    the device, the intra-op threads (they change the order of float reductions) and the fp32
    precision of CUDA kernels."""
    return {
        "torch": torch.__version__,
        "device": str(device),
        "intra_op_threads": torch.get_num_threads(),
        "fp32_precision": current_precision(),
    }


def run_job(
    job: JobRow,
    registry: Registry,
    datasets: DatasetStore,
    device: torch.device,
    hooks: JobHooks,
    states: ResumeStore | None = None,
    loader_threads: int = 0,
) -> Outcome:
    model = registry.get_model(job.model_name)
    if model.id != job.model_id:
        raise ValueError(f"model {job.model_name!r} was deleted and created again")
    arch = get_architecture(model.architecture)
    config = arch.parse_config(model.config)
    dataset_row = datasets.get(job.dataset_id)
    identity = _identity(job, model, dataset_row)
    saved = _saved_state(states, job, identity) if states and job.kind == "train" else None
    if saved is not None:
        # The parent and the seed of the run that saved it (a drawn seed, "serving" as it was).
        parent, seed = saved[1]["parent_version"], saved[0].seed
    else:
        parent, seed = resolve_base(job, model), _seed(job)
    # Fresh weights are drawn from the global RNG, so the job's seed must decide them too:
    # otherwise the same job (and the seed its lineage records) could not be run again.
    torch.manual_seed(seed)
    module = arch.build(config)
    # Before any training: a job queued before its plugin changed would train, then fail the gate.
    require_running_stats(module, arch.name)
    if parent is not None and saved is None:
        module.load_state_dict(_weights(registry, model, parent))
    augments = job.kind == "train" and bool(job.params.get("augment"))
    data, images = training_data(
        datasets,
        dataset_row,
        model,
        input_shape=tuple(config.input_shape()),
        loader_threads=loader_threads if augments else None,
    )
    epochs = int(job.params.get("epochs") or 1)

    clock = StepClock(epochs)

    def on_step(epoch: int, step: int, steps: int) -> None:
        eta_s = clock.eta_s(epoch, step, steps)
        hooks.on_progress(
            {"epoch": epoch, "epochs": epochs, "step": step, "steps": steps, "eta_s": eta_s}
        )

    lineage: dict[str, Any] = {
        "job_id": job.id,
        "kind": job.kind,
        "parent_version": parent,
        "dataset_id": dataset_row.id,
        "dataset_sha256": dataset_row.sha256,
        "hyperparameters": dict(job.params),
        "environment": environment(device),
    }
    kept_epoch: int | None = None
    stop_reason: str | None = None
    if job.kind == "recalibrate_bn":
        done = recalibrate_bn(
            module,
            data.x,
            batch_size=int(job.params["batch_size"]),
            should_stop=hooks.should_stop,
            on_step=on_step,
            device=device,
            seed=int(job.params.get("seed") or 0),
        )
        if not done:
            raise Cancelled
        source, better = "recalibrate", True
    else:
        epoch_started = [time.perf_counter()]

        def on_epoch(m: EpochMetrics) -> None:
            now = time.perf_counter()
            _log_epoch(job.id, epochs, m, now - epoch_started[0])
            epoch_started[0] = now
            hooks.on_epoch(asdict(m))

        meta = {"identity": identity, "parent_version": parent}

        def on_state(state: TrainState) -> None:
            if states is not None and hooks.holds_job():
                _save_state(states, job.id, state, meta)

        if saved is not None:
            after = saved[0].epoch
            progress = {"epoch": after, "epochs": epochs, "step": 0, "steps": 0}
            progress["resumed_from_epoch"] = after
            hooks.on_progress(progress)
            hooks.on_resume(saved[0].metrics, progress)
            log.info("job %s resumes after epoch %d of %d", job.id, after, epochs)
        params = TrainParams.model_validate({**job.params, "seed": seed})
        result = train(
            module,
            data.x,
            data.y,
            task=config.task,
            params=params,
            should_stop=hooks.should_stop,
            on_step=on_step,
            on_epoch=on_epoch,
            device=device,
            resume=saved[0] if saved is not None else None,
            on_state=on_state,
            images=images,
        )
        if result.stopped:
            raise Cancelled
        lineage["seed"] = result.seed
        lineage["metrics"] = {
            "val_loss": result.final_val_loss,
            "val_accuracy": result.final_val_accuracy,
            "kept_epoch": result.kept_epoch,
            "stop_reason": result.stop_reason,
            "epochs": [asdict(m) for m in result.metrics],
        }
        kept_epoch, stop_reason = result.kept_epoch, result.stop_reason
        module.load_state_dict(result.state_dict)
        source, better = "train", True
        if job.promote == "if_better":
            better = _better_than_serving(
                registry,
                model,
                module,
                data.x,
                data.y,
                result.val_indices,
                config.task,
                (result.final_val_loss, result.final_val_accuracy),
                device,
                lineage,
            )
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    prepared = prepare(model, state, device)
    promote = job.promote == "always" or (job.promote == "if_better" and better)
    # The last moment a cancel can still leave nothing behind; after it, cancels get 409.
    if hooks.should_stop() or not hooks.begin_publishing():
        raise Cancelled
    # One transaction adds the version, promotes it and records it as the job's result, and only
    # for the model this job was created for: exactly once, whatever happens to this process.
    record = hooks.record_result(promote, kept_epoch, stop_reason)
    labels = labels_to_record(
        model.config, dataset_row.classes, fresh=parent is None, job_kind=job.kind
    )
    if labels is not None:
        lineage["class_labels"] = labels
        record = _with_labels(record, model, labels)
    row = publish(
        registry,
        prepared,
        source=source,
        note=f"job {job.id}",
        lineage=lineage,
        promote=promote,
        in_transaction=record,
    )
    log.info("job %s stored %s version %d (promoted: %s)", job.id, model.name, row.version, promote)
    return Outcome(
        result_version=row.version,
        promoted=promote,
        kept_epoch=kept_epoch,
        stop_reason=stop_reason,
    )


def training_data(
    datasets: DatasetStore,
    row: DatasetRow,
    model: ModelRow,
    *,
    input_shape: tuple[int, ...],
    loader_threads: int | None = None,
) -> tuple[Dataset, TrainingImages | None]:
    """The job's samples as float tensors: a tensor dataset's x, or an image dataset's images
    through the model's pipeline (the same `normalize` that serving ends in) with their labels;
    with `loader_threads` (a job that augments), an image dataset's pixels too, for the loader
    threads that augment them.
    """
    if row.kind != "images":
        return datasets.load(row), None
    if not model.preprocess:
        raise ValueError(f"model {model.name!r} has no image pipeline for an image dataset")
    pipeline = Preprocess.model_validate(model.preprocess).image
    samples = datasets.load_images(row, pipeline)
    if list(samples.classes) != list(row.classes or []):
        raise ValueError("the dataset's class folders differ from its recorded classes")
    height, width, channels = samples.images.shape[1:]
    if (channels, height, width) != tuple(input_shape):
        # Only a pipeline without a fixed size on images of several sizes gets here: the job's
        # check could not know the size, and serving would refuse these samples.
        raise InvalidDataset(
            f"the images give {[channels, height, width]} after the model's pipeline but the "
            f"architecture takes {list(input_shape)}; give the pipeline a center_crop",
            code="shape_mismatch",
        )
    data = Dataset(
        x=images_to_tensor(samples.images, pipeline),
        y=torch.from_numpy(samples.labels),
        y_kind="class",
    )
    if loader_threads is None:
        return data, None
    images = TrainingImages(
        pixels=samples.images,
        mean=tuple(pipeline.mean),
        std=tuple(pipeline.std),
        threads=loader_threads,
    )
    return data, images


def _with_labels(record: InTransaction | None, model: ModelRow, labels: list[str]) -> InTransaction:
    """`record`, and the dataset's class names become the model's labels in the same commit.

    Only if the model still has none: two fresh-weight jobs on datasets with other classes
    cannot both name its outputs, so the second one's version is not stored (409).
    """

    def run(session: Session, version: VersionRow) -> None:
        if record is not None:
            record(session, version)
        current = session.get(ModelRow, model.id, with_for_update=True)
        if current is None:
            return  # deleted meanwhile: the version's own insert fails for it
        existing = current.config.get("class_labels")
        if existing == labels:
            return
        if existing is not None:
            raise Conflict(
                f"model {model.name!r} was given labels {existing} while this job trained on "
                f"classes {labels}; its version was not stored",
                code="labels_changed",
            )
        arch = get_architecture(current.architecture)
        config = arch.parse_config({**current.config, "class_labels": labels})
        current.config = config.model_dump(mode="json")

    return run


def _log_epoch(job_id: str, epochs: int, m: EpochMetrics, seconds: float) -> None:
    """One INFO line per epoch, so a job's course can be followed in the worker's log."""
    val = (
        ""
        if m.val_loss is None
        else f", val loss {m.val_loss:.4g}"
        + ("" if m.val_accuracy is None else f", val accuracy {m.val_accuracy:.4f}")
    )
    log.info(
        "job %s epoch %d/%d: train loss %.4g%s, %.2f s",
        job_id,
        m.epoch,
        epochs,
        m.train_loss,
        val,
        seconds,
    )


def _save_state(states: ResumeStore, job_id: str, state: TrainState, meta: dict[str, Any]) -> None:
    """Save the epoch's state; a failure (a full disk) only means an older resume point."""
    started = time.perf_counter()
    try:
        size = states.save(job_id, state, meta)
    except OSError as exc:
        log.warning("job %s: could not save the epoch %d state: %s", job_id, state.epoch, exc)
        return
    log.debug(
        "job %s: saved the epoch %d state (%d bytes, %.1f ms)",
        job_id,
        state.epoch,
        size,
        (time.perf_counter() - started) * 1000,
    )


def _better_than_serving(
    registry: Registry,
    job_model: ModelRow,
    trained: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    val_indices: torch.Tensor,
    task: str,
    new: tuple[float | None, float | None],
    device: torch.device,
    lineage: dict[str, Any],
) -> bool:
    """Whether the trained weights are at least as good as the serving version's on this split.

    It compares with the version serving now; a promote made elsewhere between this comparison
    and the job's own promote is overtaken by the job (last promote wins, as for any promote).
    """
    model = registry.get_model(job_model.name)
    if model.id != job_model.id:
        raise ValueError(f"model {model.name!r} was deleted and created again")
    serving = model.serving_version
    if serving is None:
        lineage["compared_with"] = None
        return True
    if new[0] is None:
        raise ValueError("if_better needs a validation split (val_fraction > 0)")
    arch = get_architecture(model.architecture)
    current = arch.build(arch.parse_config(model.config))
    current.load_state_dict(_weights(registry, model, serving))
    current.to(device)
    x_val, y_val = x[val_indices], y[val_indices]
    old = evaluate(current, x_val, y_val, task)
    lineage["compared_with"] = {"version": serving, "val_loss": old[0], "val_accuracy": old[1]}
    return compare((new[0], new[1]), old, task)
