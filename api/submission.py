"""Turn an accepted upload into a queued job: check, store, record, send.

Every check runs before anything is written, and every write is undone when a later step
fails, so a rejected request leaves no row and no object behind.
"""

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api.deps import Services
from api.errors import ApiError, spec_validation_error
from api.streaming import SpooledFile, too_large
from core import metrics
from core.jobs import ApiKey, Job, JobState, Upload, UploadState, new_id, record_state_change
from core.queue import send_job
from core.scratch import scratch_name
from core.spec import JobSpec

logger = logging.getLogger(__name__)


# Each copy to an S3 store keeps one 8 MiB part in memory at a time, and glibc keeps freed
# parts in the arena of the thread that allocated them. Running every copy on a few threads
# of its own bounds the API's memory however many uploads arrive together, while the other
# uploads keep spooling to disk. docs/reliability.md has the measured figures.
STORE_COPY_THREADS = 4
_store_copies = ThreadPoolExecutor(max_workers=STORE_COPY_THREADS, thread_name_prefix="store-copy")


def copy_to_store(services: Services, key: str, path: Path) -> None:
    """Copy a spool file to the object store on one of the STORE_COPY_THREADS copy threads."""
    _store_copies.submit(services.store.put_file, key, path).result()


def parse_spec(spec_text: str | None) -> JobSpec:
    """Parse the multipart `spec` field; errors name the spec field at fault."""
    if spec_text is None:
        raise ApiError(422, "invalid_spec", "missing form field `spec`; send the job spec as JSON", field="spec")
    try:
        raw = json.loads(spec_text)
    except json.JSONDecodeError as error:
        raise ApiError(
            422, "invalid_spec", f"spec is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); fix the JSON", field="spec"
        ) from None
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise spec_validation_error(error) from None


def inspect_checkpoint(path: Path, filename: str, services: Services) -> dict | None:
    """Check the checkpoint's format with core.formats; raise 415/422 when it is unusable."""
    try:
        from core.formats import inspect_upload
    except ImportError:  # Older checkouts without core.formats: the worker validates instead.
        logger.warning("core.formats is unavailable; %s is queued without a format check", filename)
        return None
    info = inspect_upload(path, filename=filename, settings=services.settings)
    for warning in info.warnings:
        logger.info("upload %s: %s", filename, warning)
    return info.to_dict()


def check_attack_box(spec: JobSpec, info: dict | None) -> None:
    """Reject a pixel attack box outside the images that the uploaded pipeline generates.

    Only diffusers uploads carry the configs that fix the image size. For single files the
    worker checks the box against the base model before any training.
    """
    if info is None or spec.attack.kind != "pixel" or spec.attack.box is None or not info.get("image_size"):
        return
    width, height = info["image_size"]
    left, top, right, bottom = spec.attack.box
    if right > width or bottom > height:
        raise ApiError(
            422,
            "invalid_spec",
            f"attack.box {list(spec.attack.box)} falls outside the {width}x{height} images this model generates; "
            "give a box inside the image",
            field="spec.attack.box",
        )


def request_hash(spec: JobSpec, checkpoint_identity: str) -> str:
    """Fingerprint of a job request, to tell a retry from a different request under one idempotency key."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{canonical}\n{checkpoint_identity}".encode()).hexdigest()


def find_replay(services: Services, api_key: ApiKey, idempotency_key: str | None, fingerprint: str) -> Job | None:
    """Return the job created earlier with this idempotency key, or None; 422 if its request differed."""
    if idempotency_key is None:
        return None
    with services.sessions() as session:
        job = session.scalar(
            select(Job).where(Job.api_key_id == api_key.id, Job.idempotency_key == idempotency_key)
        )
    if job is None:
        return None
    if job.request_hash != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with a different checkpoint or spec; "
            "use a new key for a new request",
            field="Idempotency-Key",
        )
    return job


def _new_job(
    job_id: str,
    api_key: ApiKey,
    spec: JobSpec,
    *,
    input_key: str,
    filename: str,
    size: int,
    sha256: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> Job:
    return Job(
        id=job_id,
        api_key_id=api_key.id,
        state=JobState.QUEUED.value,
        spec=spec.model_dump(mode="json"),
        input_key=input_key,
        input_filename=filename,
        input_size=size,
        input_sha256=sha256,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        step=0,
        total=0,
        attempts=0,
        cancel_requested=False,
    )


def _queue(services: Services, job: Job, cleanup) -> None:
    """Send the job's task; when the broker is down, undo the job and answer 503."""
    try:
        send_job(services.celery, job.id)
    except Exception as error:
        logger.error("could not queue job %s: %s", job.id, error)
        with services.sessions.begin() as session:
            session.execute(
                update(Upload)
                .where(Upload.object_key == job.input_key, Upload.state == UploadState.CONSUMED.value)
                .values(state=UploadState.COMPLETE.value)
            )
            session.delete(session.get(Job, job.id))
        cleanup()
        raise ApiError(
            503, "queue_unavailable", f"the job queue is unreachable ({type(error).__name__}); retry in a minute"
        ) from None
    record_state_change(JobState.QUEUED.value)
    logger.info("queued job %s", job.id, extra={"job_id": job.id})


def create_job_from_file(
    services: Services, api_key: ApiKey, spec: JobSpec, upload: SpooledFile, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Store a checked spool file and queue its job; return the job and whether it is a replay."""
    fingerprint = request_hash(spec, f"sha256:{upload.sha256}")
    replay = find_replay(services, api_key, idempotency_key, fingerprint)
    if replay is not None:
        return replay, True

    job_id = new_id()
    input_key = f"jobs/{job_id}/input/{upload.filename}"
    copy_to_store(services, input_key, upload.path)
    metrics.count_upload_bytes(upload.size)

    def cleanup() -> None:
        _delete_quietly(services, input_key)

    job = _new_job(
        job_id,
        api_key,
        spec,
        input_key=input_key,
        filename=upload.filename,
        size=upload.size,
        sha256=upload.sha256,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    try:
        with services.sessions.begin() as session:
            session.add(job)
    except IntegrityError:
        # A concurrent request with the same idempotency key won the insert.
        cleanup()
        replay = find_replay(services, api_key, idempotency_key, fingerprint)
        if replay is None:
            raise
        return replay, True
    except BaseException:
        cleanup()
        raise

    _queue(services, job, cleanup)
    return job, False


def find_upload(services: Services, api_key: ApiKey, checkpoint_key: str) -> Upload:
    upload = None
    if "\x00" not in checkpoint_key:  # PostgreSQL rejects NUL characters, and no key contains one.
        with services.sessions() as session:
            upload = session.scalar(
                select(Upload).where(
                    Upload.api_key_id == api_key.id,
                    (Upload.object_key == checkpoint_key) | (Upload.id == checkpoint_key),
                )
            )
    if upload is None:
        raise ApiError(
            404,
            "not_found",
            f"upload {checkpoint_key!r} not found; pass the `checkpoint_key` that POST /uploads returned",
            field="checkpoint_key",
        )
    return upload


def create_job_from_upload(
    services: Services, api_key: ApiKey, spec: JobSpec, checkpoint_key: str, idempotency_key: str | None, spool_dir: Path
) -> tuple[Job, bool]:
    """Check an upload made through `POST /uploads` and queue its job."""
    upload = find_upload(services, api_key, checkpoint_key)
    fingerprint = request_hash(spec, f"upload:{upload.object_key}")
    replay = find_replay(services, api_key, idempotency_key, fingerprint)
    if replay is not None:
        return replay, True

    if upload.state == UploadState.PENDING.value:
        raise ApiError(
            409,
            "upload_incomplete",
            f"upload {upload.id} is not complete; finish it (PUT the body or POST its parts to /uploads/{upload.id}/complete) first",
            field="checkpoint_key",
        )
    if upload.state == UploadState.CONSUMED.value:
        raise ApiError(
            409,
            "upload_used",
            f"upload {upload.id} already belongs to a job; upload the checkpoint again for a new job",
            field="checkpoint_key",
        )

    # The checkpoint never passed through the API, so fetch it once to check its format.
    spool_dir.mkdir(parents=True, exist_ok=True)
    local = spool_dir / scratch_name("upload")
    try:
        fetched = services.store.get_to_file(upload.object_key, local)
        if fetched.size > services.settings.max_upload_bytes:
            raise too_large(services.settings.max_upload_bytes)
        check_attack_box(spec, inspect_checkpoint(local, upload.filename, services))
    finally:
        local.unlink(missing_ok=True)

    job_id = new_id()
    job = _new_job(
        job_id,
        api_key,
        spec,
        input_key=upload.object_key,
        filename=upload.filename,
        size=fetched.size,
        sha256=fetched.sha256,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    try:
        with services.sessions.begin() as session:
            claimed = session.execute(
                update(Upload)
                .where(Upload.id == upload.id, Upload.state == UploadState.COMPLETE.value)
                .values(state=UploadState.CONSUMED.value)
            )
            if claimed.rowcount != 1:
                raise ApiError(409, "upload_used", f"upload {upload.id} was just used by another job; upload again")
            session.add(job)
    except IntegrityError:
        replay = find_replay(services, api_key, idempotency_key, fingerprint)
        if replay is None:
            raise
        return replay, True

    _queue(services, job, cleanup=lambda: None)
    return job, False


def _delete_quietly(services: Services, key: str) -> None:
    try:
        services.store.delete(key)
    except Exception as error:  # StorageError or boto3's own types; the request failed already.
        logger.warning("could not delete object %s after a failed request: %s", key, error)
