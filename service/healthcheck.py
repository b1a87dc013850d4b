"""`python -m service.healthcheck`: exit 0 when the server on this host answers `/healthz`, else 1.

The container health check (the Dockerfile's `HEALTHCHECK`, `docker-compose.yml`): the slim image
has no curl, and this reads the same `BNSERVE_HOST` and `BNSERVE_PORT` the server listens on.
"""

from __future__ import annotations

import sys

import httpx

from service.startup import StartupError, exit_on_startup_error, load_settings

# A wildcard bind address is reached through loopback.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def healthz_url(host: str, port: int) -> str:
    host = _LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def main() -> int:
    try:
        settings = load_settings()
    except StartupError as exc:
        exit_on_startup_error(exc)
    url = healthz_url(settings.HOST, settings.PORT)
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"unhealthy: {url} answered {response.status_code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
