"""`bnserve serve` (also `python -m service`) and `bnserve worker`: options over `Settings`.

Each option is one `BNSERVE_*` setting: given, it wins over the environment (and a `.env` file);
not given, the setting comes from there as always. Nothing heavy is imported until a command
runs, so `--help` and a refused argument start nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from service.settings import Settings
from service.startup import FlagError, StartupError, exit_on_startup_error, load_settings


@dataclass(frozen=True)
class SettingOption:
    flag: str
    setting: str
    help: str
    type: Any = None

    @property
    def param(self) -> str:
        return self.setting.lower()

    def option(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        default = Settings.model_fields[self.setting].get_default(call_default_factory=True)
        if isinstance(default, bool):
            default = "true" if default else "false"
        shown = default if default not in (None, "", []) else "unset"
        if isinstance(default, Path):
            shown = f"./{default}"
        help_text = f"{self.help} [BNSERVE_{self.setting}; default: {shown}]"
        if self.type is bool:
            return click.option(self.flag, self.param, default=None, help=help_text)
        return click.option(
            self.flag, self.param, type=self.type, default=None, help=help_text, metavar=None
        )


CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])
DATA_DIR = SettingOption(
    "--data-dir",
    "DATA_DIR",
    "checkpoints, datasets, the SQLite registry and the api-token file",
    click.Path(file_okay=False, path_type=Path),
)
DATABASE_URL = SettingOption(
    "--database-url", "DATABASE_URL", "sqlite:// or postgresql:// (default: SQLite in the data dir)"
)
DEVICE = SettingOption("--device", "DEVICE", "auto, cpu, cuda, cuda:N or mps")
LOG_LEVEL = SettingOption("--log-level", "LOG_LEVEL", "log level", LOG_LEVELS)
LOG_FORMAT = SettingOption(
    "--log-format", "LOG_FORMAT", "text, or json: one object a line", click.Choice(["text", "json"])
)
PLUGINS = SettingOption(
    "--plugins", "ARCHITECTURE_PLUGINS", "comma-separated modules that register architectures"
)

SERVE_OPTIONS = (
    SettingOption("--host", "HOST", "address to listen on"),
    SettingOption("--port", "PORT", "port to listen on", click.IntRange(0, 65535)),
    DATA_DIR,
    DATABASE_URL,
    DEVICE,
    SettingOption(
        "--workers", "WORKERS", "training worker processes to start (0: none)", click.INT
    ),
    SettingOption("--api-workers", "API_WORKERS", "API processes on this port", click.INT),
    SettingOption("--allowed-hosts", "ALLOWED_HOSTS", "comma-separated Host names to answer"),
    PLUGINS,
    SettingOption("--demo/--no-demo", "DEMO", "create and train a demo model on first start", bool),
    SettingOption("--access-log/--no-access-log", "ACCESS_LOG", "one log line per request", bool),
    LOG_LEVEL,
    LOG_FORMAT,
)
WORKER_OPTIONS = (
    DATA_DIR,
    DATABASE_URL,
    DEVICE,
    SettingOption(
        "--threads", "WORKER_THREADS", "PyTorch threads (0: this machine's cores)", click.INT
    ),
    SettingOption("--poll-s", "WORKER_POLL_S", "seconds between looks at the queue", click.FLOAT),
    PLUGINS,
    LOG_LEVEL,
    LOG_FORMAT,
)


def with_settings(
    options: tuple[SettingOption, ...],
) -> Callable[[Callable[[Settings], None]], Callable[..., None]]:
    """Add `options` to a command, which then gets the `Settings` they and the environment make."""

    def decorate(run: Callable[[Settings], None]) -> Callable[..., None]:
        def command(**given: Any) -> None:
            overrides = {
                o.setting: given[o.param] for o in options if given.get(o.param) is not None
            }
            flags = {o.setting: o.flag.split("/")[0] for o in options}
            try:
                settings = load_settings(overrides, flags)
            except FlagError as exc:
                raise click.UsageError(str(exc)) from None
            except StartupError as exc:
                exit_on_startup_error(exc)
            run(settings)

        command.__doc__ = run.__doc__
        command.__name__ = run.__name__
        for option in reversed(options):
            command = option.option()(command)
        return command

    return decorate


@click.command(context_settings=CONTEXT)
@with_settings(SERVE_OPTIONS)
def serve(settings: Settings) -> None:
    """Start the API server (and its training workers, --workers)."""
    from service.launch import run_api

    run_api(settings)


@click.command(context_settings=CONTEXT)
@with_settings(WORKER_OPTIONS)
def worker(settings: Settings) -> None:
    """Start a training worker on the database and data dir of an API server."""
    from service.worker.__main__ import run

    run(settings)
