"""Bearer-token auth for state-changing requests (and reads, with BNSERVE_PROTECT_READS)."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from fastapi import Request

from service.errors import Unauthorized
from service.settings import Settings

log = logging.getLogger(__name__)


def load_or_create_token(settings: Settings) -> str:
    """`BNSERVE_API_TOKEN`, or a random token kept in `<data dir>/api-token` (mode 0600)."""
    if settings.API_TOKEN:
        return settings.API_TOKEN
    path: Path = settings.token_file
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL: when several processes start at once, one creates it and the others read it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    log.warning("created API token in %s (set BNSERVE_API_TOKEN to choose one)", path.resolve())
    return token


def check_bearer(request: Request, token: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
            "(BNSERVE_API_TOKEN, or the file api-token in the data dir)",
        )
