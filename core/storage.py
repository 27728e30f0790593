"""The object store: a local folder (embedded default) or any S3 API.

Keys are `/`-separated relative paths such as `jobs/<id>/artifacts/report.json`. Every
write hashes what it stores, so callers get the size and SHA-256 without a second read.
Writes go through a temporary name, so a reader never sees half an object. This module
must not import torch.
"""

import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.settings import Settings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# S3 parts must be at least 5 MiB except the last; 8 MiB keeps memory bounded per upload.
PART_BYTES = 8 * 1024 * 1024
MAX_PARTS = 10_000
MAX_SINGLE_COPY_BYTES = 5 * 1024**3

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._+=@-]+$")


class StorageError(Exception):
    """The store failed or rejected an operation."""


class ObjectNotFound(StorageError):
    pass


class ObjectTooLarge(StorageError):
    def __init__(self, key: str, limit: int):
        super().__init__(f"object {key!r} exceeds {limit} bytes")
        self.key = key
        self.limit = limit


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class MultipartPart:
    part_number: int
    etag: str


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key; raise ValueError naming the bad segment."""
    if not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid object key {key!r}: use a relative path with `/` separators")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.match(segment):
            raise ValueError(
                f"invalid object key {key!r}: segment {segment!r} must be non-empty, not `.` or `..`, "
                "and use only letters, digits and ._+=@-"
            )
    return key


def _iter_file(stream: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            return
        yield chunk


def _as_chunks(source: BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    if hasattr(source, "read"):
        return _iter_file(source)  # type: ignore[arg-type]
    return iter(source)  # type: ignore[arg-type]


def _download_to_file(key: str, path: Path | str, open_chunks: Callable[[], Iterable[bytes]]) -> StoredObject:
    """Write the chunks of `open_chunks()` to `path` through a temporary file beside it, and hash them.

    `open_chunks` runs once the temporary file is open, so the file is removed whether
    opening the object or reading it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp_path, "wb") as out:
            for chunk in open_chunks():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return StoredObject(key, size, digest.hexdigest())


class ObjectStore(ABC):
    """What the API and the worker need from an object store."""

    #: True when clients upload and download through presigned URLs instead of the API.
    presigns = False

    @abstractmethod
    def put_stream(
        self, key: str, source: BinaryIO | Iterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Store what `source` yields under `key` in bounded memory; raise ObjectTooLarge past `max_bytes`."""

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as stream:
            return self.put_stream(key, stream)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.put_stream(key, [data])

    @abstractmethod
    def get_to_file(self, key: str, path: Path) -> StoredObject:
        """Download `key` to `path` (written through a temporary file) and hash it."""

    @abstractmethod
    def stream(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """Yield the object's bytes in chunks; raise ObjectNotFound before the first chunk."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Return up to `length` bytes from offset `start`."""

    @abstractmethod
    def head(self, key: str) -> StoredObject:
        """Return the object's size; raise ObjectNotFound when missing."""

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list_prefix(self, prefix: str) -> list[StoredObject]:
        """Return every object whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many were deleted."""
        objects = self.list_prefix(prefix)
        for stored in objects:
            self.delete(stored.key)
        return len(objects)

    @abstractmethod
    def move(self, source: str, destination: str) -> None:
        """Rename an object; readers see either the old or the new key, never a partial object."""

    def presigned_get(self, key: str, ttl_s: int, filename: str | None = None) -> str | None:
        """Return a short-lived download URL, or None when the store cannot sign one."""
        return None

    def create_multipart(self, key: str) -> str:
        raise StorageError(f"{type(self).__name__} has no presigned multipart uploads; stream the body instead")

    def presigned_part_url(self, key: str, upload_id: str, part_number: int, ttl_s: int) -> str:
        raise StorageError(f"{type(self).__name__} has no presigned multipart uploads; stream the body instead")

    def complete_multipart(self, key: str, upload_id: str, parts: list[MultipartPart]) -> StoredObject:
        raise StorageError(f"{type(self).__name__} has no presigned multipart uploads; stream the body instead")

    def abort_multipart(self, key: str, upload_id: str) -> None:
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError when the store is unreachable."""

    def put_folder(self, prefix: str, folder: Path) -> list[StoredObject]:
        """Upload every file under `folder` to `prefix` + its relative path."""
        stored = []
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder).as_posix()
                stored.append(self.put_file(prefix + relative, path))
        return stored

    def get_folder(self, prefix: str, folder: Path) -> list[StoredObject]:
        """Download every object under `prefix` into `folder`, keeping relative paths."""
        fetched = []
        for stored in self.list_prefix(prefix):
            relative = stored.key[len(prefix) :]
            target = folder / relative
            if not target.resolve().is_relative_to(folder.resolve()):
                raise StorageError(f"object {stored.key!r} would land outside {folder}; refusing to download it")
            fetched.append(self.get_to_file(stored.key, target))
        return fetched


class LocalStore(ObjectStore):
    """Objects as files under one folder. Temporary files live in `<root>/.tmp`."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        validate_key(key)
        if key.startswith(".tmp/"):
            raise ValueError(f"invalid object key {key!r}: `.tmp/` is reserved for partial writes")
        return self.root / key

    def put_stream(self, key, source, *, max_bytes=None) -> StoredObject:
        target = self.path_for(key)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in _as_chunks(source):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ObjectTooLarge(key, max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredObject(key, size, digest.hexdigest())

    def get_to_file(self, key, path) -> StoredObject:
        source = self.path_for(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        return _download_to_file(key, path, lambda: self.stream(key))

    def stream(self, key, chunk_bytes=CHUNK_BYTES) -> Iterator[bytes]:
        source = self.path_for(key)
        try:
            handle = open(source, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                yield from _iter_file(handle, chunk_bytes)

        return chunks()

    def read_range(self, key, start, length) -> bytes:
        source = self.path_for(key)
        try:
            with open(source, "rb") as stream:
                stream.seek(start)
                return stream.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def head(self, key) -> StoredObject:
        source = self.path_for(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        return StoredObject(key, source.stat().st_size)

    def list_prefix(self, prefix) -> list[StoredObject]:
        # The prefix may end inside a name (`jobs/ab` matches `jobs/abc/...`), as in S3.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and not key.startswith(".tmp/"):
                found.append(StoredObject(key, path.stat().st_size))
        return sorted(found, key=lambda stored: stored.key)

    def delete(self, key) -> None:
        target = self.path_for(key)
        target.unlink(missing_ok=True)
        self._remove_empty_parents(target.parent)

    def _remove_empty_parents(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def move(self, source, destination) -> None:
        source_path = self.path_for(source)
        target = self.path_for(destination)
        if not source_path.is_file():
            raise ObjectNotFound(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source_path, target)
        self._remove_empty_parents(source_path.parent)

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageError(f"local store folder {self.root} is missing or not writable")


class S3Store(ObjectStore):
    """Objects in one S3 bucket, through boto3 with retries and exponential backoff."""

    presigns = True

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        max_attempts: int = 8,
        public_endpoint_url: str | None = None,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        config = Config(
            region_name=region,
            signature_version="s3v4",
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=10,
            read_timeout=120,
            # Flexible checksums are an AWS extension; S3-compatible servers differ (rclone
            # 1.75 returns the whole object's CRC on ranged reads), so use them only where
            # the API requires them. Uploads are hashed with SHA-256 by this class anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        credentials = {"aws_access_key_id": access_key_id or None, "aws_secret_access_key": secret_access_key or None}
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config, **credentials)
        # Presigned URLs embed the host they were signed for, so they are signed for the
        # endpoint that clients reach, which may differ from the one this process uses.
        self.presign_client = self.client
        if public_endpoint_url and public_endpoint_url != endpoint_url:
            self.presign_client = boto3.client("s3", endpoint_url=public_endpoint_url, config=config, **credentials)

    def _is_missing(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            # Servers differ in how they report a missing bucket (404, or 400 for rclone).
            pass
        logger.info("creating bucket %s", self.bucket)
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_stream(self, key, source, *, max_bytes=None) -> StoredObject:
        validate_key(key)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict] = []
        try:
            for chunk in _as_chunks(source):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(key, max_bytes)
                digest.update(chunk)
                if not buffer and len(chunk) >= PART_BYTES:
                    # A whole part, as put_file reads them, goes out as it is: through the buffer
                    # it would be held up to three times at once.
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(chunk)))
                    continue
                buffer += chunk
                while len(buffer) >= PART_BYTES:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer[:PART_BYTES])))
                    del buffer[:PART_BYTES]

            if upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buffer))
            else:
                if buffer:
                    parts.append(self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            if upload_id is not None:
                self.abort_multipart(key, upload_id)
            raise
        return StoredObject(key, size, digest.hexdigest())

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as stream:
            return self.put_stream(key, _iter_file(stream, PART_BYTES))

    def _upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> dict:
        if part_number > MAX_PARTS:
            raise StorageError(f"object {key!r} needs more than {MAX_PARTS} parts of {PART_BYTES} bytes")
        response = self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number, Body=data
        )
        return {"PartNumber": part_number, "ETag": response["ETag"]}

    def get_to_file(self, key, path) -> StoredObject:
        validate_key(key)
        return _download_to_file(key, path, lambda: self.stream(key))

    def stream(self, key, chunk_bytes=CHUNK_BYTES) -> Iterator[bytes]:
        validate_key(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as error:
            if self._is_missing(error):
                raise ObjectNotFound(key) from None
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_bytes)
            finally:
                body.close()

        return chunks()

    def read_range(self, key, start, length) -> bytes:
        validate_key(key)
        if length <= 0:
            return b""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        except Exception as error:
            if self._is_missing(error):
                raise ObjectNotFound(key) from None
            if "InvalidRange" in str(error):
                return b""
            raise
        return response["Body"].read()

    def head(self, key) -> StoredObject:
        validate_key(key)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            if self._is_missing(error):
                raise ObjectNotFound(key) from None
            raise
        return StoredObject(key, int(response["ContentLength"]))

    def list_prefix(self, prefix) -> list[StoredObject]:
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found.append(StoredObject(item["Key"], int(item["Size"])))
        return sorted(found, key=lambda stored: stored.key)

    def delete(self, key) -> None:
        validate_key(key)
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix) -> int:
        keys = [stored.key for stored in self.list_prefix(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} objects under {prefix!r}, "
                    f"first {first.get('Key')!r}: {first.get('Message')}"
                )
        return len(keys)

    def move(self, source, destination) -> None:
        # S3 has no rename: a server-side copy (atomic for the reader of `destination`),
        # then the delete. CopyObject takes objects up to 5 GiB in one request. Larger ones
        # need boto3's managed multipart copy (UploadPartCopy), which some S3-compatible
        # servers lack (rclone 1.75 among them), so it is used only where it is required.
        validate_key(source)
        validate_key(destination)
        copy_source = {"Bucket": self.bucket, "Key": source}
        if self.head(source).size <= MAX_SINGLE_COPY_BYTES:
            self.client.copy_object(CopySource=copy_source, Bucket=self.bucket, Key=destination)
        else:
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=MAX_SINGLE_COPY_BYTES, multipart_chunksize=PART_BYTES * 64)
            self.client.copy(copy_source, self.bucket, destination, Config=config)
        self.client.delete_object(Bucket=self.bucket, Key=source)

    def presigned_get(self, key, ttl_s, filename=None) -> str | None:
        validate_key(key)
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)

    def create_multipart(self, key) -> str:
        validate_key(key)
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def presigned_part_url(self, key, upload_id, part_number, ttl_s) -> str:
        if not 1 <= part_number <= MAX_PARTS:
            raise ValueError(f"part number {part_number} is outside 1..{MAX_PARTS}")
        return self.presign_client.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part_number},
            ExpiresIn=ttl_s,
        )

    def complete_multipart(self, key, upload_id, parts) -> StoredObject:
        ordered = sorted(parts, key=lambda part: part.part_number)
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": part.part_number, "ETag": part.etag} for part in ordered]},
        )
        return self.head(key)

    def abort_multipart(self, key, upload_id) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as error:  # The upload may already be complete or gone.
            logger.warning("could not abort multipart upload %s of %s: %s", upload_id, key, error)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            raise StorageError(f"S3 bucket {self.bucket!r} is unreachable: {error}") from error


# S3 error codes that a later retry can cure (besides any 5xx status).
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable", "InternalError"})


def is_transient_error(error: BaseException) -> bool:
    """True for store errors that a retry can cure: no connection, a timeout, a 5xx response or throttling."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:
        return False
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        response = error.response or {}
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES
    return False


def make_store(settings: Settings) -> ObjectStore:
    """Build the store that `settings.storage` names."""
    if settings.storage == "s3":
        return S3Store(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            max_attempts=settings.s3_max_attempts,
            public_endpoint_url=settings.s3_public_endpoint_url or None,
        )
    return LocalStore(settings.local_store_dir)


def remove_tree(path: Path) -> None:
    """Remove a scratch folder, logging instead of raising when something stays behind."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not fully remove scratch folder %s", path)
