"""Reading `GET /v1/jobs/{id}/events`: the text/event-stream framing and the typed events."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from service.api.schemas import JobProgress, JobPublic
from service.client.errors import APIError

OUTCOMES = ("succeeded", "failed", "cancelled")


class JobEvent(BaseModel):
    """One event: `progress` while the job runs, then one named after its outcome.

    The outcome's event also carries the whole job (`job`), as `GET /v1/jobs/{id}` answers it.
    """

    event: str
    id: str
    status: str
    progress: JobProgress
    # The latest epoch's metrics (`epoch`, `train_loss`, `val_loss`, `val_accuracy`, ...).
    metrics: dict[str, Any] | None = None
    job: JobPublic | None = None

    @property
    def final(self) -> bool:
        return self.event in OUTCOMES


class EventParser:
    """Feed it the stream's lines; it returns each complete (event, data) at its blank line."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            message = (self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return message
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


def job_event(event: str, data: str) -> JobEvent:
    """The typed event; an `error` event (the job disappeared) raises the server's error."""
    body = json.loads(data)
    if event == "error":
        raise APIError(404, str(body.get("code")), str(body.get("detail")), body)
    return JobEvent.model_validate({"event": event, **body})
