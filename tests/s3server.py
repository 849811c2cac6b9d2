"""A real S3-speaking server for the store tests: moto's server (``moto[server]``, a dev
dependency) in its own process on a free port, called over HTTP by real boto3. ``make test`` needs
nothing else: the session fixture starts it from the venv and stops it at the end."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from models.store import BlobStore, open_store
from workers.settings import CommonSettings

START_TIMEOUT_S = 120
# moto takes any credentials; these only have to exist for boto3's credential chain.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "adversa-test", "AWS_SECRET_ACCESS_KEY": "adversa-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        """A fresh bucket per test, so tests never see each other's blobs."""
        name = f"adversa-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The environment that points a gateway or worker process at ``bucket``."""
        return {**CREDENTIALS, "ADVERSA_BLOB_STORE": "s3", "ADVERSA_S3_ENDPOINT_URL": self.endpoint_url,
                "ADVERSA_S3_BUCKET": bucket, "ADVERSA_S3_PREFIX": prefix}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}")
    monkeypatch = pytest.MonkeyPatch()
    for name, value in CREDENTIALS.items():  # for stores built in this process by boto3's chain
        monkeypatch.setenv(name, value)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{server.endpoint_url}/moto-api/", timeout=5).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"moto server not up in {START_TIMEOUT_S} s: {log.read_text()}"
            time.sleep(0.2)
        yield server
    finally:
        monkeypatch.undo()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["file", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """Each backend as ``open_store`` builds it from settings: ``<tmp>/blobs``, and a fresh bucket
    (under a key prefix) of the session's S3 server."""
    if request.param == "file":
        yield open_store(CommonSettings(var_dir=tmp_path))
        return
    server: S3Server = request.getfixturevalue("s3_server")
    yield open_store(CommonSettings(var_dir=tmp_path, blob_store="s3", s3_bucket=server.new_bucket(),
                                    s3_endpoint_url=server.endpoint_url, s3_prefix="deploy-a"))
