"""`bnserve`: the server's commands and every API operation, on `service.client`.

The API commands take `--url` (BNSERVE_URL) and `--token` (BNSERVE_API_TOKEN, else the
`api-token` file of `--data-dir`/BNSERVE_DATA_DIR). An error answer prints the server's status,
`code` and `detail` on stderr and exits with the code `service.cli.exits` gives its status.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from service.cli import exits, output
from service.cli.follow import follow
from service.cli.serve import CONTEXT, serve, worker
from service.client import DEFAULT_URL, APIError, Client, ProgressCallback

F = TypeVar("F", bound=Callable[..., Any])

# Uploads from this size up show a progress bar (smaller ones are done before it could draw).
PROGRESS_FROM_BYTES = 1 << 20


def read_token(token: str | None, data_dir: Path) -> str | None:
    """--token / BNSERVE_API_TOKEN, else the token the server keeps in its data dir, if any."""
    if token:
        return token
    path = data_dir / "api-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def api_command(fn: F) -> F:
    """Give the command a `Client` (as `bn`) from the connection options, and map its errors."""

    @click.option(
        "--url", envvar="BNSERVE_URL", default=DEFAULT_URL, show_default=True, help="[BNSERVE_URL]"
    )
    @click.option(
        "--token",
        envvar="BNSERVE_API_TOKEN",
        default=None,
        help="bearer token [BNSERVE_API_TOKEN; default: <data dir>/api-token]",
    )
    @click.option(
        "--data-dir",
        envvar="BNSERVE_DATA_DIR",
        default="./data",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="where to find the api-token file [BNSERVE_DATA_DIR]",
    )
    @click.option("--timeout", default=60.0, show_default=True, help="seconds per request")
    @functools.wraps(fn)
    def command(url: str, token: str | None, data_dir: Path, timeout: float, **kwargs: Any) -> Any:
        try:
            with Client(url, token=read_token(token, data_dir), timeout=timeout) as bn:
                return fn(bn, **kwargs)
        except APIError as error:
            output.print_error(error)
            if error.status == 401 and not read_token(token, data_dir):
                output.errors_console().print(
                    f"no token: pass --token, set BNSERVE_API_TOKEN, or run where {data_dir} "
                    "is the server's data dir"
                )
            raise click.exceptions.Exit(exits.for_status(error.status)) from None
        except httpx.TransportError as error:
            output.errors_console().print(f"[bold red]error[/]: cannot reach {url}: {error}")
            raise click.exceptions.Exit(exits.UNREACHABLE) from None

    return command  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print the JSON answer")(fn)


def _upload_bar(path: Path) -> tuple[Progress | None, ProgressCallback | None]:
    if path.stat().st_size < PROGRESS_FROM_BYTES:
        return None, None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=output.errors_console(),
    )
    bar = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)

    def on_progress(sent: int, total: int) -> None:
        progress.update(bar, completed=sent, total=total)
        if sent >= total:
            progress.update(bar, description="checking on the server")

    return progress, on_progress


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="bnserve")
def cli() -> None:
    """bnserve: serve, train and call PyTorch BatchNorm models."""


cli.add_command(serve)
cli.add_command(worker)


@cli.command()
@api_command
@json_option
def architectures(bn: Client, as_json: bool) -> None:
    """List the architectures models can be created from."""
    rows = bn.architectures()
    output.print_json(rows) if as_json else output.console().print(output.architectures_table(rows))


@cli.command()
@api_command
@json_option
def models(bn: Client, as_json: bool) -> None:
    """List the models."""
    rows = bn.models()
    output.print_json(rows) if as_json else output.console().print(output.models_table(rows))


@cli.command()
@click.argument("name")
@click.argument("architecture")
@click.option("--config", default=None, help="architecture config as JSON, e.g. '{\"hidden\": 32}'")
@click.option("--max-batch-size", type=click.IntRange(1), default=None, help="per-model batching")
@api_command
@json_option
def create(
    bn: Client,
    name: str,
    architecture: str,
    config: str | None,
    max_batch_size: int | None,
    as_json: bool,
) -> None:
    """Create model NAME from ARCHITECTURE (see `bnserve architectures`)."""
    try:
        parsed = json.loads(config) if config else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--config") from None
    serving = {"max_batch_size": max_batch_size} if max_batch_size else None
    model = bn.create_model(name, architecture, parsed, serving=serving)
    if as_json:
        output.print_json(model)
    else:
        output.console().print(f"created model {model.name} ({model.architecture}, {model.task})")


@cli.command()
@click.argument("name")
@api_command
def delete(bn: Client, name: str) -> None:
    """Delete model NAME with its versions and files."""
    bn.delete_model(name)
    output.console().print(f"deleted model {name}")


@cli.command()
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--promote/--no-promote", default=True, show_default=True, help="serve it at once")
@click.option("--note", default=None, help="a note kept with the version")
@api_command
@json_option
def upload(
    bn: Client, model: str, file: Path, promote: bool, note: str | None, as_json: bool
) -> None:
    """Upload FILE (a state_dict .pt/.pth or .safetensors) as MODEL's next version."""
    progress, on_progress = _upload_bar(file)
    if progress is not None:
        with progress:
            version = bn.upload_version(
                model, file, promote=promote, note=note, on_progress=on_progress
            )
    else:
        version = bn.upload_version(model, file, promote=promote, note=note)
    if as_json:
        output.print_json(version)
        return
    out = output.console()
    state = "serving" if version.serving else "not serving"
    out.print(f"{model} version {version.version} ({state}), sha256 {version.sha256[:12]}")
    for key, value in version.report.items():
        if value not in (None, [], {}, ""):
            out.print(f"  {key}: {json.dumps(value)}", soft_wrap=True)


@cli.command()
@click.argument("model")
@api_command
@json_option
def versions(bn: Client, model: str, as_json: bool) -> None:
    """List MODEL's versions, oldest first (* serves)."""
    rows = bn.versions(model)
    if as_json:
        output.print_json(rows)
    else:
        output.console().print(output.versions_table(model, rows))


@cli.command()
@click.argument("model")
@click.argument("version", type=click.IntRange(1))
@api_command
def promote(bn: Client, model: str, version: int) -> None:
    """Serve VERSION of MODEL from now on (also how to roll back)."""
    result = bn.promote(model, version)
    before = result.previous_version
    output.console().print(f"{model} now serves version {version} (was {before or 'none'})")


def _read_inputs(source: str | None, inline: str | None) -> Any:
    """Inputs from --inputs, a .npy file (an array), a JSON file, or `-` (JSON on stdin)."""
    if (source is None) == (inline is None):
        raise click.UsageError("give either FILE (.json, .npy or - for stdin) or --inputs")
    if inline is not None:
        text = inline
    elif source == "-":
        text = sys.stdin.read()
    elif source is not None and source.endswith(".npy"):
        import numpy as np

        try:
            return np.load(source, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read {source}: {exc}", param_hint="FILE") from None
    else:
        try:
            text = Path(str(source)).read_text()
        except OSError as exc:
            raise click.BadParameter(str(exc), param_hint="FILE") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="FILE / --inputs") from None
    return data["inputs"] if isinstance(data, dict) and "inputs" in data else data


@cli.command()
@click.argument("model")
@click.argument("file", required=False)
@click.option("--inputs", "inline", default=None, help="the inputs as JSON, instead of FILE")
@click.option("--version", type=click.IntRange(1), default=None, help="a version, not the serving")
@api_command
@json_option
def predict(
    bn: Client,
    model: str,
    file: str | None,
    inline: str | None,
    version: int | None,
    as_json: bool,
) -> None:
    """Predict with MODEL: FILE is .npy, or JSON ({"inputs": ...} or a bare list; - for stdin)."""
    answer = bn.predict(model, _read_inputs(file, inline), version=version)
    if as_json:
        output.print_json(answer)
    else:
        output.console().print(output.predictions_table(answer))


@cli.group(context_settings=CONTEXT)
def datasets() -> None:
    """Upload and list training datasets."""


@datasets.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="a name (default: the file's)")
@api_command
@json_option
def datasets_upload(bn: Client, file: Path, name: str | None, as_json: bool) -> None:
    """Upload FILE: .npz or .safetensors with x (samples) and y (class ids or targets)."""
    progress, on_progress = _upload_bar(file)
    if progress is not None:
        with progress:
            row = bn.upload_dataset(file, name=name, on_progress=on_progress)
    else:
        row = bn.upload_dataset(file, name=name)
    if as_json:
        output.print_json(row)
    else:
        output.console().print(f"dataset {row.id} ({row.name}, {row.num_samples} samples)")


@datasets.command("list")
@api_command
@json_option
def datasets_list(bn: Client, as_json: bool) -> None:
    """List the datasets."""
    rows = bn.datasets()
    output.print_json(rows) if as_json else output.console().print(output.datasets_table(rows))


def _dataset_id(bn: Client, given: str) -> str:
    """A dataset's id, also from its name when that names exactly one."""
    rows = bn.datasets()
    if any(d.id == given for d in rows):
        return given
    named = [d.id for d in rows if d.name == given]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise click.UsageError(f"{len(named)} datasets are named {given!r}: give its id")
    return given  # the server answers 404 dataset_not_found


def _base_version(value: str | None) -> int | str | None:
    if value is None or value == "serving":
        return value
    if value.isdigit():
        return int(value)
    raise click.BadParameter("a version number or 'serving'", param_hint="--base-version")


def _finish(job_id: str, status: str, job_error: str | None, version: int | None) -> None:
    out = output.console()
    if status == "succeeded":
        out.print(f"job {job_id} succeeded: version {version}")
    elif job_error:
        output.errors_console().print(f"job {job_id} {status}: {job_error}", soft_wrap=True)
    else:
        out.print(f"job {job_id} {status}")
    raise click.exceptions.Exit(exits.for_outcome(status))


def _follow(bn: Client, job_id: str) -> None:
    try:
        job = follow(bn, job_id, output.errors_console())
    except KeyboardInterrupt:
        output.errors_console().print(
            f"stopped following; job {job_id} goes on (bnserve cancel {job_id} stops it)"
        )
        raise click.exceptions.Exit(exits.INTERRUPTED) from None
    promoted = " (promoted)" if job.promoted else ""
    kept = f", epoch {job.kept_epoch} kept" if job.kept_epoch is not None else ""
    stopped = f", {job.stop_reason.replace('_', ' ')}" if job.stop_reason else ""
    version = (
        f"{job.result_version}{promoted}{kept}{stopped}" if job.result_version is not None else None
    )
    _finish(job.id, job.status, job.error, version)  # type: ignore[arg-type]


@cli.command()
@click.argument("model")
@click.argument("dataset")
@click.option("--epochs", type=click.IntRange(1), default=None, help="needed for training")
@click.option("--batch-size", type=click.IntRange(2), default=None, help="[server: 64]")
@click.option("--lr", type=float, default=None, help="learning rate (needed for training)")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=None)
@click.option("--momentum", type=float, default=None, help="SGD only")
@click.option("--weight-decay", type=float, default=None)
@click.option("--val-fraction", type=float, default=None, help="[server: 0.2]")
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option(
    "--promote",
    "promote_rule",
    type=click.Choice(["never", "always", "if_better"]),
    default=None,
    help="[server: if_better]",
)
@click.option("--base-version", default=None, help="a version number or 'serving' (default fresh)")
@click.option("--kind", type=click.Choice(["train", "recalibrate_bn"]), default=None)
@click.option("--detach", is_flag=True, help="print the job id and exit, without following")
@api_command
def train(
    bn: Client,
    model: str,
    dataset: str,
    base_version: str | None,
    promote_rule: str | None,
    detach: bool,
    **params: Any,
) -> None:
    """Train MODEL on DATASET (id or name) and follow it; the exit code is its outcome."""
    job = bn.create_job(
        model,
        _dataset_id(bn, dataset),
        base_version=_base_version(base_version),
        promote=promote_rule,
        **params,
    )
    if detach:
        click.echo(job.id)
        return
    output.errors_console().print(f"job {job.id} queued")
    _follow(bn, job.id)


@cli.command("follow")
@click.argument("job_id")
@api_command
def follow_command(bn: Client, job_id: str) -> None:
    """Follow JOB_ID until it ends; the exit code is its outcome."""
    _follow(bn, job_id)


@cli.command()
@click.argument("job_id", required=False)
@click.option(
    "--status",
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    default=None,
)
@click.option("--limit", type=click.IntRange(1, 1000), default=None)
@api_command
@json_option
def jobs(
    bn: Client, job_id: str | None, status: str | None, limit: int | None, as_json: bool
) -> None:
    """List the latest jobs, or show JOB_ID."""
    if job_id is not None:
        job = bn.job(job_id)
        output.print_json(job) if as_json else output.console().print(output.jobs_table([job]))
        return
    rows = bn.jobs(status, limit)
    output.print_json(rows) if as_json else output.console().print(output.jobs_table(rows))


@cli.command()
@click.argument("job_id")
@api_command
def cancel(bn: Client, job_id: str) -> None:
    """Cancel JOB_ID: it ends cancelled and leaves no version."""
    job = bn.cancel_job(job_id)
    output.console().print(f"job {job.id}: cancel requested ({job.status})")
