"""Following a job's events with a live progress bar: what `bnserve train` and `follow` show."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from service.api.schemas import JobPublic
from service.cli.output import duration
from service.client import Client, JobEvent


def _detail(event: JobEvent) -> str:
    p, m = event.progress, event.metrics or {}
    parts = [f"step {p.step}/{p.steps}"]
    if m.get("train_loss") is not None:
        parts.append(f"loss {m['train_loss']:.4f}")
    if m.get("val_accuracy") is not None:
        parts.append(f"val acc {m['val_accuracy']:.3f}")
    parts.append(f"ETA {duration(p.eta_s)}")
    return "  ".join(parts)


def follow(client: Client, job_id: str, out: Console) -> JobPublic:
    """Show the job's progress until it ends; returns the job as it ended."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    logged = 0
    with Progress(*columns, console=out) as progress:
        bar = progress.add_task("queued", total=None, detail="")
        for event in client.job_events(job_id):
            p = event.progress
            if event.final and event.job is not None:
                if event.status == "succeeded":
                    progress.update(bar, total=1, completed=1, description="done")
                progress.update(bar, detail=_detail(event).replace(f"ETA {duration(p.eta_s)}", ""))
                _log_epochs(progress.console, event.job.metrics, logged)
                return event.job
            if p.steps:
                total = p.epochs * p.steps
                done = (p.epoch - 1) * p.steps + p.step
                progress.update(
                    bar,
                    total=total,
                    completed=done,
                    description=f"epoch {p.epoch}/{p.epochs}",
                    detail=_detail(event),
                )
            else:
                progress.update(bar, description=event.status)
            metrics = event.metrics
            epoch = int(metrics.get("epoch", 0)) if metrics is not None else 0
            if metrics is not None and epoch == logged + 1:
                logged = _log_epochs(progress.console, [metrics], logged)
            elif epoch > logged + 1:
                # Epochs shorter than the server's poll share an event: read them all once.
                logged = _log_epochs(progress.console, client.job(job_id).metrics, logged)
    # The stream ended without an outcome (a proxy cut it): carry on from the job as it is.
    return client.wait_job(job_id)


def _log_epochs(out: Console, metrics: list[dict[str, object]], logged: int) -> int:
    """Print each epoch's line once, above the bar; returns the last epoch printed."""
    for m in metrics:
        epoch = int(str(m.get("epoch", 0)))
        if epoch <= logged:
            continue
        fields = [f"epoch {epoch}"]
        for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
            if isinstance(m.get(key), float | int):
                fields.append(f"{label} {float(str(m[key])):.4f}")
        if isinstance(m.get("val_accuracy"), float | int):
            fields.append(f"val acc {float(str(m['val_accuracy'])):.3f}")
        if isinstance(m.get("lr"), float | int):
            fields.append(f"lr {float(str(m['lr'])):.3g}")
        out.print("  ".join(fields))
        logged = epoch
    return logged
