"""The blob store: one abstraction for model weights, job inputs and job artifacts.

Keys are ``/``-separated relative paths (``jobs/<id>/adversarial.npy``). Two backends pass the same
contract (``tests/unit/test_blob_store.py``): ``FileStore``, a directory on one machine, and
``S3Store``, an S3-compatible bucket (MinIO, AWS) that gateways and workers on several machines
share. Neither lets a reader see half a blob: the filesystem store writes through a temporary file
and an atomic rename, and an S3 PUT is atomic.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from workers.settings import CommonSettings

_KEY_RE = re.compile(r"^[A-Za-z0-9_.@-]+(/[A-Za-z0-9_.@-]+)*$")


class BlobNotFoundError(KeyError):
    """No blob under that key."""


class BlobStoreUnavailable(OSError):  # noqa: N818 - a state of a dependency, as the gateway's 503 says
    """The store did not answer or refused the request (S3 down, wrong credentials, no bucket)."""


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in {".", ".."} for part in key.split("/")):
        raise ValueError(f"expected a relative key of [A-Za-z0-9_.@-] segments, got {key!r}")
    return key


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def scan(self, prefix: str) -> Iterator[BlobInfo]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


class FileStore:
    """Blobs as files under one root directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    @staticmethod
    def _staged(target: Path, data: bytes) -> Path:
        """``data`` written whole to a temporary file beside ``target``, for a rename or a link."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put(self, key: str, data: bytes) -> None:
        target = self.path(key)
        tmp = self._staged(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if there is no blob under it yet; False when there is one. Atomic
        between processes sharing the directory: a hard link fails when its name exists, and the
        blob appears whole (the temporary file is complete before it is linked)."""
        target = self.path(key)
        tmp = self._staged(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """The keys under the folder ``prefix``, sorted."""
        return sorted(info.key for info in self.scan(prefix))

    def scan(self, prefix: str) -> Iterator[BlobInfo]:
        """Key, size and modification time of each blob under the folder ``prefix``."""
        base = self.path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for p in base.rglob("*"):
            if p.name.startswith(".tmp-"):
                continue
            try:
                stat = p.stat()
            except FileNotFoundError:  # deleted while we walked
                continue
            if p.is_file():
                yield BlobInfo(str(p.relative_to(self.root)), stat.st_size, stat.st_mtime)

    def delete(self, key: str) -> None:
        """Remove one blob; nothing happens when there is none."""
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)


class S3Store:
    """Blobs as objects of one S3-compatible bucket (MinIO, AWS S3), under an optional ``prefix``.

    Credentials and region come from boto3's usual chain (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles); ``endpoint_url`` names a server
    other than AWS. Path-style addressing, which MinIO and most self-hosted servers expect.
    """

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None) -> None:
        import boto3  # here, not at import: the file store needs none of it
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3},
                          connect_timeout=10, read_timeout=60))

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """boto3's failures (no answer, refused, no such bucket) as ``BlobStoreUnavailable``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise BlobStoreUnavailable(f"S3 bucket {self.bucket!r}: {exc}") from exc

    def _folder(self, prefix: str) -> str:
        return self.prefix + check_key(prefix.rstrip("/")) + "/"

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=name, Body=data)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if there is no object under it yet; False when there is one. A
        conditional PUT (``If-None-Match: *``), which AWS S3, MinIO and moto decide atomically."""
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._errors():
            try:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412",
                                                                  "ConditionalRequestConflict"}:
                    return False
                raise
        return True

    def get(self, key: str) -> bytes:
        name = self._name(key)
        with self._errors():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=name)
            except self.client.exceptions.NoSuchKey:
                raise BlobNotFoundError(key) from None
            return response["Body"].read()  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                    return False
                raise
            return True

    def list(self, prefix: str) -> list[str]:
        """The keys under the folder ``prefix``, sorted."""
        return sorted(info.key for info in self.scan(prefix))

    def scan(self, prefix: str) -> Iterator[BlobInfo]:
        """Key, size and modification time of each blob under the folder ``prefix``."""
        folder = self._folder(prefix)
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for item in page.get("Contents", []):
                    yield BlobInfo(item["Key"][len(self.prefix):], int(item["Size"]),
                                   item["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        """Remove one blob; nothing happens when there is none."""
        name = self._name(key)
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=name)

    def delete_prefix(self, prefix: str) -> None:
        keys = [self.prefix + info.key for info in self.scan(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._errors():
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def open_store(settings: CommonSettings) -> BlobStore:
    """The blob store the settings name: ``file`` (``<var>/blobs``, the default) or ``s3``."""
    if settings.blob_store == "s3":
        assert settings.s3_bucket is not None  # the settings' validator makes sure
        return S3Store(settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url)
    return FileStore(settings.blob_root)
