"""The object store against a local folder and a real S3 server (rclone)."""

import hashlib
import io
import os
from pathlib import Path

import httpx
import pytest

from core.storage import (
    PART_BYTES,
    LocalStore,
    MultipartPart,
    ObjectNotFound,
    ObjectTooLarge,
    S3Store,
    StorageError,
    validate_key,
)


def _s3_store(s3_server, bucket: str, secret: str | None = None) -> S3Store:
    return S3Store(
        bucket=bucket,
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
        access_key_id=s3_server.access_key_id,
        secret_access_key=secret or s3_server.secret_access_key,
        max_attempts=2,
    )


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    s3_server = request.getfixturevalue("s3_server")
    return _s3_store(s3_server, request.getfixturevalue("s3_bucket"))


def test_put_stream_roundtrip(store, tmp_path: Path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    stored = store.put_stream("jobs/a/input/model.safetensors", io.BytesIO(data))

    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    fetched = store.get_to_file("jobs/a/input/model.safetensors", tmp_path / "out" / "model.safetensors")
    assert fetched.sha256 == stored.sha256
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data
    assert b"".join(store.stream("jobs/a/input/model.safetensors")) == data


def test_put_stream_multipart(store):
    chunks = [os.urandom(1024 * 1024) for _ in range(PART_BYTES // (1024 * 1024) * 2 + 3)]
    stored = store.put_stream("big/object.bin", iter(chunks))

    joined = b"".join(chunks)
    assert stored.size == len(joined)
    assert stored.sha256 == hashlib.sha256(joined).hexdigest()
    assert store.head("big/object.bin").size == len(joined)
    assert hashlib.sha256(b"".join(store.stream("big/object.bin"))).hexdigest() == stored.sha256


def test_put_stream_over_limit_leaves_nothing(store):
    chunks = [b"x" * (1024 * 1024)] * (PART_BYTES // (1024 * 1024) + 2)

    with pytest.raises(ObjectTooLarge):
        store.put_stream("uploads/too/big.bin", iter(chunks), max_bytes=PART_BYTES + 1)

    assert store.list_prefix("uploads/") == []
    if isinstance(store, S3Store):
        pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert pending == []
    else:
        assert list(store.tmp_dir.iterdir()) == []


def test_list_and_delete_prefix(store):
    for name in ("jobs/1/a.txt", "jobs/1/sub/b.txt", "jobs/12/c.txt", "jobs/2/d.txt"):
        store.put_bytes(name, name.encode())

    assert [item.key for item in store.list_prefix("jobs/1/")] == ["jobs/1/a.txt", "jobs/1/sub/b.txt"]
    assert [item.key for item in store.list_prefix("jobs/1")] == ["jobs/1/a.txt", "jobs/1/sub/b.txt", "jobs/12/c.txt"]
    assert store.delete_prefix("jobs/1/") == 2
    assert [item.key for item in store.list_prefix("jobs/")] == ["jobs/12/c.txt", "jobs/2/d.txt"]
    store.delete("jobs/does-not-exist")


def test_move_replaces_key(store):
    store.put_bytes("jobs/1/staging/report.json", b"{}")

    store.move("jobs/1/staging/report.json", "jobs/1/artifacts/report.json")

    assert not store.exists("jobs/1/staging/report.json")
    assert b"".join(store.stream("jobs/1/artifacts/report.json")) == b"{}"


def test_move_multipart_sized_object(store):
    data = os.urandom(2 * PART_BYTES + 1)
    store.put_bytes("jobs/1/staging/sanitized.zip", data)

    store.move("jobs/1/staging/sanitized.zip", "jobs/1/artifacts/sanitized.zip")

    assert not store.exists("jobs/1/staging/sanitized.zip")
    assert hashlib.sha256(b"".join(store.stream("jobs/1/artifacts/sanitized.zip"))).digest() == hashlib.sha256(data).digest()


def test_missing_object_raises(store, tmp_path: Path):
    with pytest.raises(ObjectNotFound):
        store.head("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get_to_file("nope/x", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        store.stream("nope/x")
    assert not (tmp_path / "x").exists()


def test_read_range(store):
    store.put_bytes("r/file", b"0123456789")

    assert store.read_range("r/file", 2, 3) == b"234"
    assert store.read_range("r/file", 8, 10) == b"89"


def test_folder_roundtrip(store, tmp_path: Path):
    source = tmp_path / "state"
    (source / "nested").mkdir(parents=True)
    (source / "step.json").write_text('{"step": 4}')
    (source / "nested" / "weights.bin").write_bytes(b"\x00\x01")

    store.put_folder("jobs/9/state/v1/", source)
    store.get_folder("jobs/9/state/v1/", tmp_path / "copy")

    assert (tmp_path / "copy" / "step.json").read_text() == '{"step": 4}'
    assert (tmp_path / "copy" / "nested" / "weights.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a//b", "a\\b", "a/./b", "", "a/%2e%2e/b"])
def test_validate_key_rejects(key: str):
    with pytest.raises(ValueError):
        validate_key(key)


def test_local_store_reserves_tmp(tmp_path: Path):
    store = LocalStore(tmp_path)

    with pytest.raises(ValueError):
        store.put_bytes(".tmp/x", b"")
    assert store.presigned_get("a/b", 60) is None
    with pytest.raises(StorageError):
        store.create_multipart("a/b")


@pytest.mark.services
def test_s3_presigned_get(s3_server, s3_bucket: str):
    store = _s3_store(s3_server, s3_bucket)
    store.put_bytes("jobs/1/artifacts/report.json", b'{"ok": true}')

    url = store.presigned_get("jobs/1/artifacts/report.json", 60, filename="report.json")
    response = httpx.get(url)

    assert response.status_code == 200
    assert response.content == b'{"ok": true}'
    tampered = httpx.get(url.replace("report.json", "other.json", 1))
    assert tampered.status_code in (400, 403)


@pytest.mark.services
def test_s3_presigned_multipart(s3_server, s3_bucket: str):
    store = _s3_store(s3_server, s3_bucket)
    parts_data = [os.urandom(PART_BYTES // 2 + 5 * 1024 * 1024), os.urandom(1000)]
    upload_id = store.create_multipart("uploads/u1/model.safetensors")

    parts = []
    for number, data in enumerate(parts_data, start=1):
        url = store.presigned_part_url("uploads/u1/model.safetensors", upload_id, number, 60)
        response = httpx.put(url, content=data)
        assert response.status_code == 200
        parts.append(MultipartPart(number, response.headers["etag"]))
    stored = store.complete_multipart("uploads/u1/model.safetensors", upload_id, parts)

    assert stored.size == sum(len(data) for data in parts_data)
    assert b"".join(store.stream("uploads/u1/model.safetensors")) == b"".join(parts_data)


@pytest.mark.services
def test_s3_wrong_secret_rejected(s3_server, s3_bucket: str):
    store = _s3_store(s3_server, s3_bucket, secret="wrong-secret")

    with pytest.raises(StorageError):
        store.check()


@pytest.mark.services
def test_s3_ensure_bucket_creates(s3_server):
    store = _s3_store(s3_server, "sealer-created-by-test")

    store.ensure_bucket()
    store.ensure_bucket()

    store.check()
