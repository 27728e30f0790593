"""A small Python client for the Sealer HTTP API; `sealer submit/status/download` use it.

    client = SealerClient("http://127.0.0.1:8000", api_key)
    job = client.submit(Path("model.safetensors"), spec)
    job = client.wait(job["id"])
    client.download(job["id"], Path("out"))

A folder is zipped on the fly into a temporary file. Files above `upload_threshold_bytes`
go through `POST /uploads` (presigned S3 parts, or one streamed PUT with the local store)
before the job is created. This module must not import torch.
"""

import json
import logging
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.errors import SealerError
from core.spec import JobSpec

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_UPLOAD_THRESHOLD_BYTES = 512 * 1024**2
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


class ClientError(SealerError):
    """The API rejected a request, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "client_error", field: str | None = None):
        super().__init__(message, field=field, code=code)
        self.status = status


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success or response.is_redirect:
        return
    try:
        error = response.json()["error"]
        message, code, field = error["message"], error["code"], error.get("field")
    except (ValueError, KeyError, TypeError):
        message, code, field = response.text[:500] or response.reason_phrase, "http_error", None
    raise ClientError(f"{response.request.method} {response.request.url.path} -> {response.status_code}: {message}", status=response.status_code, code=code, field=field)


def spec_to_dict(spec: JobSpec | dict | Path | str) -> dict:
    """Accept a JobSpec, a dict or a path to a JSON file; validate it locally first."""
    if isinstance(spec, (str, Path)):
        spec = json.loads(Path(spec).read_text(encoding="utf-8"))
    if isinstance(spec, dict):
        spec = JobSpec.model_validate(spec)
    return spec.model_dump(mode="json")


@contextmanager
def checkpoint_file(model: Path) -> Iterator[Path]:
    """Yield a file to upload: `model` itself, or a temporary zip of a diffusers folder."""
    model = Path(model)
    if model.is_file():
        yield model
        return
    if not model.is_dir():
        raise ClientError(f"model path {model} does not exist; give a .safetensors file, an archive or a diffusers folder")

    with tempfile.TemporaryDirectory(prefix="sealer-zip-") as folder:
        archive = Path(folder) / f"{model.resolve().name}.zip"
        # Weights barely compress, so the zip stores them; only small files are deflated.
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in sorted(model.rglob("*")):
                if path.is_symlink():
                    raise ClientError(f"{path} is a symbolic link; copy the file it points to into the folder")
                if path.is_file():
                    compression = zipfile.ZIP_STORED if path.stat().st_size > 1024**2 else zipfile.ZIP_DEFLATED
                    zipped.write(path, path.relative_to(model).as_posix(), compress_type=compression)
        yield archive


class SealerClient:
    """Blocking client for one Sealer API and one API key."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        upload_threshold_bytes: int = DEFAULT_UPLOAD_THRESHOLD_BYTES,
        retries: int = 3,
    ):
        self.url = url.rstrip("/")
        self.upload_threshold_bytes = upload_threshold_bytes
        self.retries = retries
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, write=None, read=timeout_s),
            follow_redirects=False,
        )
        # Presigned URLs carry their own signature; they must not see the API key.
        self.plain_http = httpx.Client(timeout=httpx.Timeout(timeout_s, write=None), follow_redirects=True)

    def close(self) -> None:
        self.http.close()
        self.plain_http.close()

    def __enter__(self) -> "SealerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- requests ---------------------------------------------------------------------

    def _request(self, method: str, path: str, *, retry: bool = False, **kwargs) -> httpx.Response:
        """Send one request; with `retry`, connection failures are retried with backoff."""
        attempts = self.retries if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if attempt == attempts:
                    raise ClientError(f"cannot reach {self.url} ({type(error).__name__}: {error}); check --url and that the server runs") from None
                delay = 2 ** (attempt - 1)
                logger.warning("%s %s failed (%s); retrying in %d s", method, path, error, delay)
                time.sleep(delay)
                continue
            _raise_for_error(response)
            return response
        raise AssertionError("unreachable")

    # ----- jobs ---------------------------------------------------------------------------

    def submit(
        self,
        model: Path,
        spec: JobSpec | dict | Path | str,
        *,
        idempotency_key: str | None = None,
    ) -> dict:
        """Upload `model` (file or folder) and create a job; return the job.

        The same idempotency key is sent on every retry, so a retried request never creates
        a second job.
        """
        spec_dict = spec_to_dict(spec)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        with checkpoint_file(Path(model)) as path:
            if path.stat().st_size > self.upload_threshold_bytes:
                upload = self.upload(path)
                body = {"checkpoint_key": upload["checkpoint_key"], "spec": spec_dict}
                return self._request("POST", "/jobs", json=body, headers=headers, retry=True).json()
            return self._submit_multipart(path, spec_dict, headers)

    def _submit_multipart(self, path: Path, spec_dict: dict, headers: dict) -> dict:
        for attempt in range(1, self.retries + 1):
            with open(path, "rb") as stream:
                try:
                    response = self.http.post(
                        "/jobs",
                        files={"checkpoint": (path.name, stream, "application/octet-stream")},
                        data={"spec": json.dumps(spec_dict)},
                        headers=headers,
                    )
                except httpx.TransportError as error:
                    if attempt == self.retries:
                        raise ClientError(f"uploading {path.name} to {self.url} failed ({error}); check the server and retry") from None
                    time.sleep(2 ** (attempt - 1))
                    continue
            _raise_for_error(response)
            return response.json()
        raise AssertionError("unreachable")

    def upload(self, path: Path, on_bytes: Callable[[int, int], None] | None = None) -> dict:
        """Upload a file through `POST /uploads`; return the completed upload."""
        size = path.stat().st_size
        upload = self._request("POST", "/uploads", json={"filename": path.name, "size": size}, retry=True).json()

        if upload["method"] == "put":
            with open(path, "rb") as stream:
                response = self.http.put(upload["upload_url"], content=stream, headers={"Content-Length": str(size)})
            _raise_for_error(response)
            return response.json()

        etags = []
        part_size = upload["part_size"]
        sent = 0
        with open(path, "rb") as stream:
            for part in upload["parts"]:
                stream.seek((part["part_number"] - 1) * part_size)
                data = stream.read(part_size)
                response = self.plain_http.put(part["url"], content=data)
                if not response.is_success:
                    raise ClientError(f"uploading part {part['part_number']} failed with {response.status_code}: {response.text[:300]}")
                etags.append({"part_number": part["part_number"], "etag": response.headers["etag"]})
                sent += len(data)
                if on_bytes is not None:
                    on_bytes(sent, size)
        return self._request("POST", upload["complete_url"], json={"parts": etags}, retry=True).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/jobs/{job_id}", retry=True).json()

    def jobs(self, *, state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return self._request("GET", "/jobs", params=params, retry=True).json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        poll_interval_s: float = 2.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the job is succeeded, failed or cancelled; return its last state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} is still {job['state']} after {timeout_s} s; wait longer or check the worker")
            time.sleep(poll_interval_s)

    # ----- artifacts ----------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[dict]:
        return self._request("GET", f"/jobs/{job_id}/artifacts", retry=True).json()["items"]

    def download(self, job_id: str, dest: Path, names: list[str] | None = None) -> list[Path]:
        """Download the job's artifacts (or only `names`) into `dest`; return the file paths."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for item in self.artifacts(job_id):
            if names is not None and item["name"] not in names:
                continue
            target = dest / item["name"]
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ClientError(f"artifact name {item['name']!r} points outside {dest}; refusing to write it")
            self._download_one(job_id, item["name"], target)
            written.append(target)
        return written

    def _download_one(self, job_id: str, name: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        with self.http.stream("GET", f"/jobs/{job_id}/artifacts/{name}") as response:
            if response.is_redirect:
                location = response.headers["location"]
                with self.plain_http.stream("GET", location) as redirected:
                    _raise_for_error(redirected)
                    _write_stream(redirected, partial)
            else:
                if not response.is_success:
                    response.read()
                _raise_for_error(response)
                _write_stream(response, partial)
        os.replace(partial, target)


def _write_stream(response: httpx.Response, path: Path) -> None:
    with open(path, "wb") as out:
        for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
            out.write(chunk)
