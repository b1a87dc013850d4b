"""S3-compatible object storage through boto3 (AWS S3, MinIO, Ceph RGW, moto).

Endpoint, region and credentials come from boto3's usual sources (`AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, profiles, instance roles), never from
bnserve's settings, so no credential passes through them. Uploads use boto3's managed transfer:
a file above `MULTIPART_THRESHOLD` goes up in `MULTIPART_CHUNK` parts read from disk, never held
whole in memory, and the object appears only when the last part is in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.storage import ObjectInfo, ObjectMissing

MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 16 << 20


def _missing(exc: Exception) -> bool:
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code")) in {"404", "NoSuchKey", "NotFound"}


class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any = None,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunk: int = MULTIPART_CHUNK,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client(
            "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"})
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunk,
            max_concurrency=4,
        )

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)

    def get_file(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            with dest.open("xb") as out:
                self.client.download_fileobj(
                    self.bucket, self._key(key), out, Config=self._transfer
                )
        except ClientError as exc:
            dest.unlink(missing_ok=True)
            if _missing(exc):
                raise ObjectMissing(key) from None
            raise
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def info(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"])

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = str(item["Key"]).removeprefix(self.prefix)
                yield ObjectInfo(key, int(item["Size"]), item["LastModified"])

    def check(self) -> None:
        """Raise when the bucket cannot be reached or read with these credentials."""
        self.client.head_bucket(Bucket=self.bucket)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
