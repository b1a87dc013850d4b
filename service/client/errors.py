"""The one exception the client raises for an error answer: the server's `code` and `detail`."""

from __future__ import annotations

from typing import Any

import httpx


class APIError(Exception):
    """The server answered with an error: its HTTP status and the contract's `{detail, code}`.

    `body` is the whole JSON answer (some carry more, such as `errors` listing each bad field).
    An answer that is not the contract's JSON (a proxy's 502 page) gets `code` `http_<status>`.
    """

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body

    @classmethod
    def of(cls, response: httpx.Response) -> APIError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            detail = body.get("detail", body.get("error", ""))
            return cls(response.status_code, body["code"], str(detail), body)
        text = response.text.strip()[:500] or response.reason_phrase
        return cls(response.status_code, f"http_{response.status_code}", text, {"detail": text})
