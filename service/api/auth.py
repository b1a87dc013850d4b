"""Bearer-token auth for state-changing requests (and reads, with BNSERVE_PROTECT_READS).

A token is never empty or short: `BNSERVE_API_TOKEN` below `MIN_TOKEN_LENGTH` stops the start
(settings validator), and a token file that is empty, blank or short (a first start on a full
disk used to leave an empty one, which turned auth off) is replaced by a fresh random token.
"""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import secrets
from pathlib import Path

from fastapi import Request

from service.errors import Unauthorized
from service.files import publish
from service.settings import MIN_TOKEN_LENGTH, Settings

log = logging.getLogger(__name__)


def _read_token(path: Path) -> str | None:
    """The file's token, or None when the file is missing or holds no usable token."""
    try:
        token = path.read_bytes().decode("utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return token if len(token) >= MIN_TOKEN_LENGTH else None


def load_or_create_token(settings: Settings) -> str:
    """`BNSERVE_API_TOKEN`, or a random token kept in `<data dir>/api-token` (mode 0600).

    The file is written whole to a temp file, fsynced, renamed over the final name and the folder
    fsynced, so a crash or a full disk never leaves an empty token behind. Processes starting at
    once agree on one token: writers take an exclusive lock and re-read the file under it, so the
    first one writes and the others find its token.
    """
    if settings.API_TOKEN:
        return settings.API_TOKEN
    path: Path = settings.token_file
    token = _read_token(path)
    if token is not None:
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".api-token.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        token = _read_token(path)
        if token is not None:
            return token
        if path.exists():
            log.warning("the token in %s is empty or short; replacing it", path.resolve())
        token = secrets.token_urlsafe(32)
        temp = path.parent / ".api-token.tmp"  # one writer at a time, under the lock
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode through O_CREAT
                with os.fdopen(os.dup(fd), "w") as handle:
                    handle.write(token + "\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            publish(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    log.info("created API token in %s (set BNSERVE_API_TOKEN to choose one)", path.resolve())
    return token


UNAUTHORIZED = (
    "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
    "(BNSERVE_API_TOKEN, or the file api-token in the data dir)"
)


def bearer_matches(header: str, *tokens: str | None) -> bool:
    """Whether an `Authorization` header carries one of `tokens` (compared in constant time)."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    sent = given.strip().encode()
    # An empty or short token never matches (never reached: settings and the file refuse them).
    return any(
        token is not None
        and len(token) >= MIN_TOKEN_LENGTH
        and hmac.compare_digest(sent, token.encode())
        for token in tokens
    )


def check_bearer(request: Request, token: str) -> None:
    if not bearer_matches(request.headers.get("authorization", ""), token):
        raise Unauthorized(UNAUTHORIZED)
