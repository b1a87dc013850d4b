"""How `bnserve` shows results: Rich tables for people, `--json` for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from service.api.schemas import (
    ArchitecturePublic,
    DatasetPublic,
    JobPublic,
    JobSummary,
    ModelPublic,
    PredictResponse,
    VersionPublic,
)
from service.client import APIError

# Tables printed to a pipe or file (no terminal width to fit) may be this wide, so ids stay whole.
PIPE_WIDTH = 200


def console() -> Console:
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=PIPE_WIDTH)


def errors_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """The value as the server sent it, indented: stable for `jq` and scripts."""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [v.model_dump(mode="json") for v in value]
    click.echo(json.dumps(data, indent=2))


def print_error(error: APIError) -> None:
    """`error: <status> <code>: <detail>`, then each field-level problem the server listed."""
    out = errors_console()
    out.print(f"[bold red]error[/]: {error.status} {error.code}: {error.detail}", soft_wrap=True)
    for item in error.body.get("errors") or []:
        out.print(f"  - {json.dumps(item) if not isinstance(item, str) else item}", soft_wrap=True)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        # Ids and times stay whole; in a narrow terminal the other columns wrap first.
        whole = name in ("id", "created", "name")
        table.add_column(name, overflow="fold", no_wrap=whole)
    for row in rows:
        table.add_row(*("-" if cell is None else str(cell) for cell in row))
    return table


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _float(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def architectures_table(rows: Sequence[ArchitecturePublic]) -> Table:
    return _table(
        "architectures",
        ["name", "task", "input", "description"],
        ([a.name, a.task, _shape(a.input_shape), a.description] for a in rows),
    )


def models_table(rows: Sequence[ModelPublic]) -> Table:
    return _table(
        "models",
        ["name", "architecture", "task", "input", "serving", "versions"],
        (
            [
                m.name,
                m.architecture,
                m.task,
                _shape(m.input_shape),
                m.serving_version,
                len(m.versions),
            ]
            for m in rows
        ),
    )


def versions_table(model: str, rows: Sequence[VersionPublic]) -> Table:
    return _table(
        f"versions of {model}",
        ["version", "serving", "source", "bytes", "created", "sha256", "note"],
        (
            [
                v.version,
                "*" if v.serving else "",
                v.source,
                v.size_bytes,
                v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                v.sha256[:12],
                v.note,
            ]
            for v in rows
        ),
    )


def datasets_table(rows: Sequence[DatasetPublic]) -> Table:
    return _table(
        "datasets",
        ["id", "name", "samples", "x", "y", "created"],
        (
            [
                d.id,
                d.name,
                d.num_samples,
                _shape(d.x_shape)
                if d.x_shape is not None
                else f"images {len(d.classes or [])} classes",
                f"{d.y_kind} {_shape(d.y_shape)}",
                d.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for d in rows
        ),
    )


def jobs_table(rows: Sequence[JobPublic | JobSummary]) -> Table:
    """Jobs a row each; the last epoch's validation figures where the job's metrics came along
    (`bnserve jobs ID`: listings leave per-epoch metrics out)."""

    def last(job: JobPublic | JobSummary, key: str) -> Any:
        metrics = getattr(job, "metrics", None)
        return metrics[-1].get(key) if metrics else None

    return _table(
        "jobs",
        ["id", "model", "kind", "status", "epoch", "val loss", "val acc", "version", "created"],
        (
            [
                j.id,
                j.model,
                j.kind,
                j.status,
                f"{j.progress.epoch}/{j.progress.epochs}",
                _float(last(j, "val_loss")),
                _float(last(j, "val_accuracy")),
                j.result_version,
                j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for j in rows
        ),
    )


def predictions_table(answer: PredictResponse) -> Table:
    title = f"{answer.model} v{answer.version}"
    if answer.predictions is not None:
        labels: list[str | None] = (
            [*answer.labels] if answer.labels else [None] * len(answer.predictions)
        )
        probabilities = answer.probabilities or [[] for _ in answer.predictions]
        return _table(
            title,
            ["sample", "prediction", "label", "probability"],
            (
                [i, p, label, _float(probs[p]) if p < len(probs) else None]
                for i, (p, label, probs) in enumerate(
                    zip(answer.predictions, labels, probabilities, strict=True)
                )
            ),
        )
    return _table(
        title,
        ["sample", "outputs"],
        ([i, json.dumps(_rounded(row))] for i, row in enumerate(answer.outputs)),
    )


def _rounded(value: Any) -> Any:
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 5) if isinstance(value, float) else value


def duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s` or `42s`; `-` when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
