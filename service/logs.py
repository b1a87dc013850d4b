"""One log format for every process (API, uvicorn, workers): text by default, or JSON lines.

`BNSERVE_LOG_FORMAT=text` (default) writes `time level role logger: message`, plus
` request_id=...` on lines written while a request is handled; `json` writes one object a line
with the same fields (`time`, `level`, `role`, `logger`, `message`, `request_id`, `exc_info`), for
log shippers. uvicorn's own loggers (`uvicorn.error`, and `uvicorn.access` with
`BNSERVE_ACCESS_LOG`) propagate to the same root handler (`service.api.server` passes uvicorn
`log_config=None`), so there is one format, not two.

The request id lives in a context variable that `service.api.request_id` sets for each request;
the handler's filter copies it onto every record, so lines logged by a route, the error table or
uvicorn's access log all carry it. Log messages name models, versions, jobs and paths, never
tensor data or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

# The id of the request being handled in this context (None outside requests).
request_id: ContextVar[str | None] = ContextVar("bnserve_request_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s"


class RequestContext(logging.Filter):
    """Puts the process's role and the current request id on each record the handler writes."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            return text
        # After the message's first line, so a traceback below it stays readable.
        head, newline, rest = text.partition("\n")
        return f"{head} request_id={rid}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: a message with newlines (a traceback) stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": getattr(record, "role", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            line["request_id"] = rid
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def make_handler(fmt: LogFormat, role: str) -> logging.Handler:
    """A stderr handler writing `fmt` lines for a process playing `role` (`api`, `worker`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContext(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def configure(level: str, fmt: LogFormat, role: str) -> None:
    """Send every logger (ours and uvicorn's) through one handler, unless the host process (a
    test runner, an embedding application) has set up logging already."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(make_handler(fmt, role))
    root.setLevel(level.upper())
    # Python warnings (a library's deprecation notice) in the same format, not raw on stderr.
    logging.captureWarnings(True)
