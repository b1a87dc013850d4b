"""Connection bounds: idle and slow sockets cannot deny service, the over-cap answer is the
contract's JSON, and ordinary keep-alive clients are untouched.

Each test runs against a real `python -m service` process (the httptools protocol) and against
an in-process server on the h11 protocol, the fallback where httptools cannot be imported.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ServerProcess,
    ThreadServer,
    create_model,
    make_settings,
    pt_bytes,
    trained_state_dict,
    upload,
)

CAP = 8
HEADER_TIMEOUT_S = 1.0
# Generous: the machine is shared and slow; without the bound the sockets stay open for ever.
SLACK_S = 6.0
ENV = {"BNSERVE_MAX_CONNECTIONS": str(CAP), "BNSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}


Server = ServerProcess | ThreadServer


@pytest.fixture(scope="module", params=["process", "h11"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per module and protocol (starting one is most of a test's time), serving `m`."""
    data_dir = tmp_path_factory.mktemp("connections") / "data"
    srv: Server
    if request.param == "process":
        srv = ServerProcess(data_dir, ENV).start()
    else:
        settings = make_settings(data_dir, MAX_CONNECTIONS=CAP, HEADER_TIMEOUT_S=HEADER_TIMEOUT_S)
        srv = ThreadServer(settings, http="service.api.connections:GuardedH11Protocol").start()
    try:
        serve_model(srv)
        yield srv
    finally:
        srv.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (EOF or reset), without blocking."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def seconds_until_closed(sock: socket.socket, drip: bytes = b"", limit: float = 30.0) -> float:
    """Seconds until the server closes `sock`, sending `drip` one byte every 0.1 s meanwhile."""
    began = time.monotonic()
    pending = iter(drip)
    while time.monotonic() - began < limit:
        if closed_by_server(sock):
            return time.monotonic() - began
        byte = next(pending, None)
        if byte is not None:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - began
        time.sleep(0.1)
    return float("inf")


@contextmanager
def idle_flood(server: Server, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send nothing, each reopened as soon as the server closes it."""
    sockets = [connect(server) for _ in range(count)]
    stop = threading.Event()

    def renew() -> None:
        while not stop.is_set():
            for i, sock in enumerate(sockets):
                if closed_by_server(sock):
                    sock.close()
                    sockets[i] = connect(server)
            time.sleep(0.05)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield sockets
    finally:
        stop.set()
        thread.join(timeout=10)
        for sock in sockets:
            sock.close()


def read_statuses(sock: socket.socket, count: int) -> list[int]:
    """The status codes of the next `count` responses on `sock` (bodies with Content-Length)."""
    data, statuses = b"", []
    while len(statuses) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {statuses}"
            data += chunk
            continue
        head = data[:head_end].decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:])
        end = head_end + 4 + int(fields["content-length"])
        while len(data) < end:
            data += sock.recv(65536)
        statuses.append(int(head[0].split()[1]))
        data = data[end:]
    return statuses


def first_success(call: Any, bound: float) -> tuple[httpx.Response, float]:
    """The first 2xx answer of `call()` retried until `bound` seconds, and when it came."""
    began = time.monotonic()
    last: httpx.Response | None = None
    while time.monotonic() - began < bound:
        last = call()
        if last.is_success:
            return last, time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"no success within {bound} s; last answer: {last and last.text}")


def serve_model(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        create_model(client, "m", "mlp_bn")
        assert upload(client, "m", pt_bytes(trained_state_dict("mlp_bn"))).status_code == 201
        first_success(lambda: client.post("/v1/models/m/predict", json={"inputs": [0, 1]}), 30)


def test_silent_connections_are_closed_within_the_header_timeout(server):
    with connect(server) as sock:
        assert seconds_until_closed(sock) < HEADER_TIMEOUT_S + SLACK_S


def test_a_head_sent_a_byte_at_a_time_is_closed_within_the_header_timeout(server):
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 500
    with connect(server) as sock:
        assert seconds_until_closed(sock, drip=head) < HEADER_TIMEOUT_S + SLACK_S


def test_a_keep_alive_connection_that_stalls_mid_head_is_closed(server):
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)) as conn:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
        assert conn.sock is not None
        # The next request begins and stops halfway through its head.
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert seconds_until_closed(conn.sock) < HEADER_TIMEOUT_S + SLACK_S


def test_a_renewed_flood_of_idle_connections_does_not_keep_clients_out(server):
    bound = HEADER_TIMEOUT_S + SLACK_S
    with idle_flood(server, 2 * CAP):
        time.sleep(0.5)  # every slot is held by the flood before the clients come
        for _ in range(3):
            # A new client each round, on a new connection, not only one that was already in.
            with httpx.Client(base_url=server.url, timeout=30) as client:
                r, took = first_success(lambda c=client: c.get("/healthz"), bound)
                assert r.json()
                assert took < bound
                r, took = first_success(
                    lambda c=client: c.post("/v1/models/m/predict", json={"inputs": [0.5, -1.0]}),
                    bound,
                )
                assert len(r.json()["outputs"]) == 1
                assert took < bound


def test_requests_beyond_the_cap_get_the_json_503_with_retry_after(server):
    # Every slot busy with a request whose body never comes: nothing idle to make room with.
    head = (
        b"POST /v1/models/m/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    busy = [connect(server) for _ in range(CAP)]
    try:
        for sock in busy:
            sock.sendall(head)
        time.sleep(0.5)
        r = httpx.get(server.url + "/healthz", timeout=30)
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/json"
        assert r.json()["code"] == "too_many_connections"
        assert "BNSERVE_MAX_CONNECTIONS" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-request-id"]  # answered before the app, still with its id
    finally:
        for sock in busy:
            sock.close()
    r, _ = first_success(lambda: httpx.get(server.url + "/healthz", timeout=30), 30)
    assert r.json()


def test_a_keep_alive_client_is_unaffected(server):
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)) as conn:
        conn.connect()
        assert conn.sock is not None
        local = conn.sock.getsockname()
        for i in range(200):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read()
            if i == 100:
                # Idle past the header timeout but within keep-alive: the connection stays.
                time.sleep(HEADER_TIMEOUT_S + 1)
        # Pipelined: two heads in one write, two answers in order on the same connection.
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
        assert read_statuses(conn.sock, 2) == [200, 200]
        assert conn.sock.getsockname() == local


def test_a_request_uvicorn_cannot_parse_gets_the_json_400_with_a_request_id(server):
    """uvicorn answers these in plain text; the contract's error body is valid for /v1 and /v2."""
    sock = connect(server)
    try:
        sock.sendall(
            b"POST /v1/jobs/x/cancel HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: )!U#[\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request", lines
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]
    error = json.loads(body)
    assert error["code"] == "bad_request"
    assert error["detail"] == error["error"]
    assert error["detail"].startswith("malformed HTTP request")
