"""A real S3 endpoint for tests: moto's standalone server on a free loopback port.

Not a patched client: boto3 (in the tests and in the server processes they start) talks HTTP to
it exactly as to AWS S3 or MinIO, through the standard AWS variables that `s3_env` returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import free_port


@dataclass
class S3Endpoint:
    url: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The variables a process needs to reach the bucket (fake credentials moto accepts)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture(scope="module", name="s3_server")
def s3_server_fixture() -> Iterator[str]:
    """moto's server, one per test module (a fresh bucket per test keeps them apart)."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


_count = iter(range(1_000_000))


@pytest.fixture(name="s3")
def s3_fixture(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """A new empty bucket, with this process's AWS variables pointing at it."""
    endpoint = S3Endpoint(s3_server, f"bnserve-test-{os.getpid()}-{next(_count)}")
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)
    endpoint.client().create_bucket(Bucket=endpoint.bucket)
    return endpoint
