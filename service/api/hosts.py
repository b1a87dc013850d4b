"""Refuse requests whose `Host` header names no host this server answers for (DNS rebinding).

A web page an operator visits can point its own domain name at 127.0.0.1 (DNS rebinding) and then
read, as same-origin, every GET the server leaves open: model lists, versions, their weights. Its
requests carry the attacker's host name in `Host`, so answering only the names in
`BNSERVE_ALLOWED_HOSTS` (default: the bind address and the loopback names) closes that door.

Starlette's TrustedHostMiddleware does the same check but answers plain text; this one answers
the contract's JSON error. `/healthz` stays open to any Host, for probes that address the
process by an IP of the moment (a Kubernetes pod's); it says nothing but "ok".
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_response

OPEN_PATHS = frozenset({"/healthz"})


def host_name(header: str) -> str:
    """The host of a `Host` header value, without its port: `[::1]:8000` -> `::1`."""
    value = header.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class AllowedHostsMiddleware:
    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        names = {name.strip().lower().strip("[]") for name in allowed if name.strip()}
        self.any = "*" in names
        self.exact = {n for n in names if not n.startswith("*.")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # "*.a.b" -> ".a.b"

    def allows(self, host: str) -> bool:
        return self.any or host in self.exact or (bool(host) and host.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"host"), b"")
        host = host_name(header.decode("latin-1"))
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        response = error_response(
            400,
            f"this server does not answer for the host {host!r} named in the Host header; add it "
            "to BNSERVE_ALLOWED_HOSTS (comma-separated; '*' allows any)",
            "invalid_host",
        )
        await response(scope, receive, send)
