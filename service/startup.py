"""What must hold before a process writes anything: its settings parse, its device and plugins load.

`python -m service` and `python -m service.worker` run these first, so a bad start (issue #10:
`BNSERVE_PORT=abc` printed a 17-line pydantic traceback naming `PORT`; `BNSERVE_DEVICE=cuda` on a
CPU machine failed after the demo model had been created and its job queued) stops with one line
per problem, naming the `BNSERVE_*` variable and the values it takes, and leaves the data dir and
the database exactly as they were.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from service.errors import shorten
from service.settings import Settings

if TYPE_CHECKING:
    import torch


# Settings whose values may hold a secret: their errors name the variable, never the value.
_SECRETS = frozenset({"API_TOKEN", "DATABASE_URL", "STORAGE_URL"})


class StartupError(Exception):
    """A start that cannot go on; its message is the one line the operator sees."""


def _bounds(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for name, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if (value := getattr(item, name, None)) is not None:
                parts.append(f"{word} {value}")
    return " and ".join(parts)


def allowed_values(field: FieldInfo) -> str:
    """The values a setting takes, in words: `an integer >= 0 and <= 65535`, `true or false`."""
    annotation: Any = field.annotation
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(options) < len(typing.get_args(annotation))
        annotation = options[0] if len(options) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    elif annotation is bool:
        text = "true or false"
    elif annotation in (int, float):
        text = "an integer" if annotation is int else "a number"
        if bounds := _bounds(field):
            text += f" {bounds}"
    elif typing.get_origin(annotation) is list:
        text = "a comma-separated list"
    else:
        text = "a path" if getattr(annotation, "__name__", "") == "Path" else "a string"
    return text + (" (or unset)" if optional else "")


def describe(exc: ValidationError) -> str:
    """One line per bad setting: the variable, what it was given, why not and what it takes."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        field = Settings.model_fields.get(name)
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        if not name:  # a rule across settings: its message names them
            lines.append(f"invalid settings: {message}")
            continue
        # Secrets (a token, a URL's password) are never echoed, not even in an error.
        hidden = name in _SECRETS or not isinstance(given, str)
        shown = "" if hidden else f"={shorten(given, 80)!r}"
        if field is None or message.startswith(f"BNSERVE_{name}"):
            lines.append(f"invalid setting BNSERVE_{name}{shown}: {message}")
        else:
            lines.append(
                f"invalid setting BNSERVE_{name}{shown}: {message} "
                f"(allowed: {allowed_values(field)})"
            )
    return "\n".join(lines)


class FlagError(StartupError):
    """A value given as a command-line option was refused: the CLI answers it as a usage error."""


def load_settings(
    overrides: Mapping[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment with `overrides` on top, or a `StartupError` saying why not.

    When a refused value came from `overrides` (`flags` names the command-line option that gave
    each setting), the error is a `FlagError` that names the options rather than the variables.
    """
    given = dict(overrides or {})
    try:
        return Settings(**given)
    except ValidationError as exc:
        if not {str(e["loc"][0]) for e in exc.errors() if e["loc"]} & set(given):
            raise StartupError(describe(exc)) from None
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            source = (flags or {}).get(name, name) if name in given else f"BNSERVE_{name}"
            lines.append(f"{source}: {error['msg'].removeprefix('Value error, ')}")
        raise FlagError("invalid setting: " + "; ".join(lines)) from None


def available_devices() -> list[str]:
    """The `BNSERVE_DEVICE` values that work on this machine."""
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def preflight(settings: Settings) -> torch.device:
    """Check what a start needs before it writes a byte: the device exists, the plugins import.

    Returns the device. `service.app.build_services` and the worker do the same again (cheap:
    imports are cached), after this has made sure neither fails there.
    """
    # Imported here: `load_settings` stays light for `service.healthcheck`, run every few seconds.
    from models import load_plugins
    from service.serving.device import resolve_device

    try:
        device = resolve_device(settings.DEVICE)
    except RuntimeError as exc:
        raise StartupError(f"{exc} (this machine has: {', '.join(available_devices())})") from None
    try:
        load_plugins(settings.ARCHITECTURE_PLUGINS)
    except ImportError as exc:
        raise StartupError(f"BNSERVE_ARCHITECTURE_PLUGINS: {exc}") from None
    check_database(settings)
    check_storage(settings)
    return device


def check_storage(settings: Settings) -> None:
    """A bucket that cannot be reached, or read with these credentials, stops the start in one
    line (the endpoint and the bucket named, never a credential)."""
    if not settings.remote_storage:
        return
    try:
        from service.storage.s3 import S3Storage
    except ImportError:
        raise StartupError(
            "BNSERVE_STORAGE_URL=s3://... needs boto3: pip install 'bnserve[s3]'"
        ) from None
    storage = S3Storage.from_url(settings.STORAGE_URL)
    try:
        storage.check()
    except Exception as exc:
        endpoint = storage.client.meta.endpoint_url
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise StartupError(
            f"cannot use the bucket of BNSERVE_STORAGE_URL ({storage.describe()} at {endpoint}): "
            f"{reason}"
        ) from None


def check_database(settings: Settings) -> None:
    """A PostgreSQL server that cannot be reached (or refuses the login) stops the start here, in
    one line, not in a traceback from the migrations. SQLite is not opened: that creates a file.

    The URL is not printed: it may carry a password.
    """
    if not settings.database_url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(settings.database_url, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]
        raise StartupError(f"cannot use the database of BNSERVE_DATABASE_URL: {reason}") from None
    finally:
        engine.dispose()


def exit_on_startup_error(exc: StartupError) -> NoReturn:
    """Print the problem as `bnserve: ...` on stderr and exit 2 (a usage error), no traceback."""
    for line in str(exc).splitlines():
        print(f"bnserve: {line}", file=sys.stderr)
    sys.exit(2)
