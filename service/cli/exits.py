"""The exit codes of `bnserve`, which shell scripts may rely on (listed in the README).

Usage errors are click's own 2. An error answer from the server maps by its HTTP status.
"""

from __future__ import annotations

OK = 0
ERROR = 1  # the server refused the request (a 4xx not listed below: 400, 413, 415, 422, ...)
USAGE = 2  # a bad option or argument, or an invalid setting (nothing was sent or started)
UNREACHABLE = 3  # no answer from the server: connection refused, DNS, timeout
UNAUTHORIZED = 4  # 401: missing or wrong token (--token, BNSERVE_API_TOKEN, <data dir>/api-token)
NOT_FOUND = 5  # 404: no such model, version, dataset or job
CONFLICT = 6  # 409: exists already, nothing serving, job already finished
SERVER_ERROR = 7  # 5xx: overloaded or timed out (503), disk full (507), a server fault (500)
JOB_FAILED = 8  # `train` / `follow`: the job ended failed
JOB_CANCELLED = 9  # `train` / `follow`: the job ended cancelled
INTERRUPTED = 130  # Ctrl-C while following a job (which keeps running)


def for_status(status: int) -> int:
    """The exit code for an error answer with this HTTP status."""
    if status == 401:
        return UNAUTHORIZED
    if status == 404:
        return NOT_FOUND
    if status == 409:
        return CONFLICT
    if status >= 500:
        return SERVER_ERROR
    return ERROR


def for_outcome(status: str) -> int:
    """The exit code for a job that ended with this status."""
    return {"succeeded": OK, "failed": JOB_FAILED, "cancelled": JOB_CANCELLED}.get(status, ERROR)
