"""Read request bodies in chunks into a spool file, hashing and size-checking as they arrive.

Starlette's `request.form()` spools a whole upload before the route sees it, so the size
limit could only be checked afterwards. Here the multipart parser is fed chunk by chunk
and the upload stops at `max_bytes`. The spool file sits on the API's disk because format
checks need random access (a zip's directory is at its end); it is deleted when the
request ends.
"""

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError
from core.scratch import scratch_name

# Room for the multipart framing and the spec field on top of the checkpoint itself.
FORM_OVERHEAD_BYTES = 2 * 1024 * 1024
MAX_SPEC_BYTES = 1024 * 1024

_UNSAFE_FILENAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._+=@-]")


def safe_filename(name: str | None, default: str = "checkpoint") -> str:
    """Reduce a client-supplied file name to a safe base name that keeps its extension."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_FILENAME_CHARACTERS.sub("_", base).lstrip(".")
    if len(base) > 200:
        stem, dot, suffix = base.rpartition(".")
        base = stem[: 200 - len(suffix) - 1] + dot + suffix if dot and len(suffix) < 20 else base[:200]
    return base or default


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the checkpoint exceeds the upload limit of {limit} bytes (SEALER_MAX_UPLOAD_BYTES); "
        "upload a smaller checkpoint or ask the operator to raise the limit",
        field="checkpoint",
    )


def check_content_length(request: Request, limit: int) -> None:
    """Reject at once a request that declares a body above `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
    if length > limit:
        raise too_large(limit - FORM_OVERHEAD_BYTES if limit > FORM_OVERHEAD_BYTES else limit)


@dataclass
class SpooledFile:
    path: Path
    filename: str
    size: int = 0
    sha256: str = ""

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _SpoolWriter:
    """Append chunks to a new temporary file, hashing them and enforcing a byte limit."""

    def __init__(self, folder: Path, filename: str, max_bytes: int):
        folder.mkdir(parents=True, exist_ok=True)
        # Named after this process, so that a restarted API removes what a killed one left.
        path = folder / scratch_name("upload")
        self.handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self.file = SpooledFile(path, filename)
        self.digest = hashlib.sha256()
        self.max_bytes = max_bytes

    def write(self, data: bytes) -> None:
        self.file.size += len(data)
        if self.file.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self.digest.update(data)
        self.handle.write(data)

    def finish(self) -> SpooledFile:
        self.handle.close()
        self.file.sha256 = self.digest.hexdigest()
        return self.file

    def abort(self) -> None:
        self.handle.close()
        self.file.remove()


async def spool_body(request: Request, folder: Path, filename: str, max_bytes: int) -> SpooledFile:
    """Write the raw request body to a spool file; raise 413 past `max_bytes`."""
    check_content_length(request, max_bytes)
    writer = _SpoolWriter(folder, filename, max_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
    except ClientDisconnect:
        writer.abort()
        raise ApiError(400, "client_disconnected", "the client disconnected before the body was complete; retry") from None
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


@dataclass
class JobForm:
    spec_text: str | None
    checkpoint: SpooledFile | None


class _FormCollector:
    """Callbacks for python-multipart: the `checkpoint` file goes to a spool, `spec` to memory."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.on_data: Callable[[bytes], None] | None = None
        self.spec = bytearray()
        self.seen: set[str] = set()
        self.writer: _SpoolWriter | None = None
        self.checkpoint: SpooledFile | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header_value.extend(data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": lambda data, start, end: self.on_data(data[start:end]) if self.on_data else None,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.headers = {}
        self.on_data = None

    def header_end(self) -> None:
        self.headers[bytes(self.header_name).lower()] = bytes(self.header_value).strip()
        self.header_name.clear()
        self.header_value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.seen:
            raise ApiError(422, "invalid_request", f"form field {name!r} appears twice; send it once", field=name)
        self.seen.add(name)

        if name == "checkpoint":
            raw_filename = options.get(b"filename")
            filename = safe_filename(raw_filename.decode("utf-8", "replace") if raw_filename else None)
            self.writer = _SpoolWriter(self.folder, filename, self.max_bytes)
            self.on_data = self.writer.write
        elif name == "spec":
            self.on_data = self.append_spec
        else:
            raise ApiError(
                422,
                "invalid_request",
                f"unknown form field {name!r}; send `checkpoint` (the file) and `spec` (JSON)",
                field=name,
            )

    def append_spec(self, data: bytes) -> None:
        self.spec.extend(data)
        if len(self.spec) > MAX_SPEC_BYTES:
            raise ApiError(413, "payload_too_large", f"the spec field exceeds {MAX_SPEC_BYTES} bytes", field="spec")

    def part_end(self) -> None:
        if self.writer is not None:
            self.checkpoint = self.writer.finish()
            self.writer = None
        self.on_data = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.checkpoint is not None:
            self.checkpoint.remove()
            self.checkpoint = None


async def parse_job_form(request: Request, folder: Path, max_bytes: int) -> JobForm:
    """Stream a `multipart/form-data` body with a `checkpoint` file and a `spec` field."""
    check_content_length(request, max_bytes + FORM_OVERHEAD_BYTES)
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary; let the HTTP client build the form")

    collector = _FormCollector(folder, max_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        collector.abort()
        raise
    except FormParserError as error:
        collector.abort()
        raise ApiError(400, "bad_request", f"malformed multipart body ({error}); let the HTTP client build the form") from None
    except ClientDisconnect:
        collector.abort()
        raise ApiError(400, "client_disconnected", "the client disconnected before the upload was complete; retry") from None
    except BaseException:
        collector.abort()
        raise

    if collector.writer is not None:  # The body ended inside the file part.
        collector.abort()
        raise ApiError(400, "bad_request", "the multipart body ended inside the checkpoint part; upload again")
    spec_text = bytes(collector.spec).decode("utf-8", "replace") if "spec" in collector.seen else None
    return JobForm(spec_text=spec_text, checkpoint=collector.checkpoint)
