"""The blob-store contract, one table for both backends: the filesystem store and the S3 store
against a real S3-speaking server (tests/s3server.py), through ``open_store`` as the service
builds them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.store import BlobNotFoundError, BlobStore, FileStore, S3Store, open_store
from tests.s3server import S3Server, any_store, s3_server  # noqa: F401 - fixtures
from workers.settings import CommonSettings


def test_put_get_exists_delete(any_store: BlobStore) -> None:  # noqa: F811
    any_store.put("jobs/a/x.bin", b"abc")
    any_store.put("jobs/a/x.bin", b"abcd")  # a put replaces
    assert any_store.get("jobs/a/x.bin") == b"abcd"
    assert any_store.exists("jobs/a/x.bin")
    assert not any_store.exists("jobs/a/missing") and not any_store.exists("jobs/a")
    with pytest.raises(BlobNotFoundError):
        any_store.get("jobs/a/missing")
    any_store.delete("jobs/a/x.bin")
    any_store.delete("jobs/a/x.bin")  # deleting what is not there is no error
    assert not any_store.exists("jobs/a/x.bin")
    with pytest.raises(BlobNotFoundError):
        any_store.get("jobs/a/x.bin")


def test_create_writes_only_what_is_not_there(any_store: BlobStore) -> None:  # noqa: F811
    """The create-if-absent that registry version claims rely on (If-None-Match on S3)."""
    assert any_store.create("registry/models/m/1.claim", b"first")
    assert not any_store.create("registry/models/m/1.claim", b"second")
    assert any_store.get("registry/models/m/1.claim") == b"first"
    assert any_store.list("registry") == ["registry/models/m/1.claim"]  # no temporary file left
    with pytest.raises(ValueError):
        any_store.create("../x", b"")


def test_list_scan_and_delete_prefix(any_store: BlobStore) -> None:  # noqa: F811
    before = time.time()
    for key, data in {"jobs/a/x.bin": b"1", "jobs/a/sub/y.bin": b"22", "jobs/ab/z.bin": b"333",
                      "inputs/a.npz": b"4444"}.items():
        any_store.put(key, data)
    assert any_store.list("jobs") == ["jobs/a/sub/y.bin", "jobs/a/x.bin", "jobs/ab/z.bin"]
    assert any_store.list("jobs/a") == ["jobs/a/sub/y.bin", "jobs/a/x.bin"]  # a folder, not a string prefix
    assert any_store.list("jobs/a/") == any_store.list("jobs/a")
    assert any_store.list("nothing") == []
    infos = {info.key: info for info in any_store.scan("jobs")}
    assert {k: i.size for k, i in infos.items()} == {"jobs/a/sub/y.bin": 2, "jobs/a/x.bin": 1,
                                                       "jobs/ab/z.bin": 3}
    # S3 keeps whole seconds; both clocks are this machine's
    assert all(before - 2 <= i.modified <= time.time() + 2 for i in infos.values())
    any_store.delete_prefix("jobs/a")
    assert any_store.list("jobs") == ["jobs/ab/z.bin"]
    assert any_store.list("inputs") == ["inputs/a.npz"]


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/../b", "", "a b", "x/./y"])
def test_bad_keys_are_refused(any_store: BlobStore, bad: str) -> None:  # noqa: F811
    with pytest.raises(ValueError):
        any_store.put(bad, b"")
    for method in ("get", "exists", "delete", "list", "delete_prefix"):
        with pytest.raises(ValueError):
            getattr(any_store, method)(bad)


def test_large_blob_round_trips(any_store: BlobStore) -> None:  # noqa: F811
    data = bytes(range(256)) * 40_000  # 10 MB: past boto3's multipart threshold for uploads
    any_store.put("uploads/j/model.onnx", data)
    assert any_store.get("uploads/j/model.onnx") == data


def test_settings_select_the_backend(tmp_path: Path, s3_server: S3Server) -> None:  # noqa: F811
    assert isinstance(open_store(CommonSettings(var_dir=tmp_path)), FileStore)
    s3 = open_store(CommonSettings(var_dir=tmp_path, blob_store="s3", s3_bucket="b-1",
                                   s3_endpoint_url=s3_server.endpoint_url))
    assert isinstance(s3, S3Store) and s3.bucket == "b-1"
    with pytest.raises(ValidationError, match="ADVERSA_S3_BUCKET"):
        CommonSettings(var_dir=tmp_path, blob_store="s3")
    with pytest.raises(ValidationError):
        CommonSettings(var_dir=tmp_path, blob_store="ftp")


def test_prefixes_keep_deployments_apart(s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.new_bucket()
    a = S3Store(bucket, prefix="a", endpoint_url=s3_server.endpoint_url)
    b = S3Store(bucket, prefix="b/", endpoint_url=s3_server.endpoint_url)
    a.put("inputs/x.npz", b"a")
    assert not b.exists("inputs/x.npz") and b.list("inputs") == []
    b.put("inputs/x.npz", b"b")
    b.delete_prefix("inputs")
    assert a.get("inputs/x.npz") == b"a"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a/inputs/x.npz"]
