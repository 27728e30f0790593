"""`/jobs`: submit, list, inspect, cancel and delete jobs; list and download their artifacts."""

import json
import logging
import mimetypes
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import delete
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, ServicesDep, SessionDep, StorageDep
from api.errors import ApiError, describe_validation_error, not_found
from api.schemas import ArtifactList, ArtifactOut, CreateJobFromUpload, JobOut, JobPage, JobStateName
from api.streaming import parse_job_form
from api.submission import (
    check_attack_box,
    create_job_from_file,
    create_job_from_upload,
    inspect_checkpoint,
    parse_spec,
)
from core.jobs import (
    ApiKey,
    Job,
    JobState,
    Upload,
    artifacts_prefix,
    delete_job_row,
    get_job,
    job_prefix,
    list_jobs,
    request_cancel,
)
from core.storage import ObjectNotFound

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_JSON_BODY_BYTES = 2 * 1024 * 1024
# The largest offset that SQLite and PostgreSQL both take as an integer parameter.
MAX_LIST_OFFSET = 2**31 - 1
# Artifact names are plain relative paths. Anything else, encoded dot segments included,
# is rejected before it reaches the store.
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")

_CREATE_JOB_BODIES = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["checkpoint", "spec"],
                    "properties": {
                        "checkpoint": {"type": "string", "format": "binary", "description": "safetensors file or zipped diffusers folder"},
                        "spec": {"type": "string", "description": "JobSpec as JSON"},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/CreateJobFromUpload"}},
        },
    }
}


def _created(response: Response, job: Job, replayed: bool) -> JobOut:
    response.headers["Location"] = f"/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.from_job(job)


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    openapi_extra=_CREATE_JOB_BODIES,
    summary="Submit a job: a checkpoint (multipart) or an earlier upload (JSON), and a JobSpec",
)
async def create_job(
    request: Request,
    response: Response,
    services: ServicesDep,
    session: SessionDep,
    api_key: ApiKeyDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> JobOut:
    # The key lookup keeps a pooled connection checked out until the request ends, and an
    # upload can stream for minutes, so concurrent uploads would exhaust the pool.
    await run_in_threadpool(session.close)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    settings = services.settings
    spool_dir = settings.resolved_scratch_dir / "api-spool"

    if content_type == "multipart/form-data":
        form = await parse_job_form(request, spool_dir, settings.max_upload_bytes)
        try:
            spec = parse_spec(form.spec_text)
            if form.checkpoint is None:
                raise ApiError(422, "invalid_request", "missing file field `checkpoint`; attach the model file", field="checkpoint")
            if form.checkpoint.size == 0:
                raise ApiError(422, "invalid_input", f"{form.checkpoint.filename} is empty (0 bytes); attach the model file", field="checkpoint")
            info = await run_in_threadpool(inspect_checkpoint, form.checkpoint.path, form.checkpoint.filename, services)
            check_attack_box(spec, info)
            job, replayed = await run_in_threadpool(
                create_job_from_file, services, api_key, spec, form.checkpoint, idempotency_key
            )
        finally:
            if form.checkpoint is not None:
                form.checkpoint.remove()
        return _created(response, job, replayed)

    if content_type == "application/json":
        body = await _read_json(request)
        try:
            payload = CreateJobFromUpload.model_validate(body)
        except ValidationError as error:
            message, field = describe_validation_error(error.errors(include_url=False))
            raise ApiError(422, "invalid_spec" if field and field.startswith("spec") else "invalid_request", message, field=field) from None
        job, replayed = await run_in_threadpool(
            create_job_from_upload, services, api_key, payload.spec, payload.checkpoint_key, idempotency_key, spool_dir
        )
        return _created(response, job, replayed)

    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'!r} is not accepted; send multipart/form-data with `checkpoint` and `spec`, "
        "or application/json with `checkpoint_key` and `spec`",
    )


async def _read_json(request: Request) -> object:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_JSON_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"JSON body exceeds {MAX_JSON_BODY_BYTES} bytes; upload the checkpoint through POST /uploads")
    try:
        return json.loads(body)
    except ValueError as error:
        raise ApiError(422, "invalid_request", f"request body is not valid JSON ({error}); fix the JSON") from None


def _find_job(session: Session, job_id: str, api_key: ApiKey) -> Job:
    """Return the key's job `job_id`, or raise 404."""
    # PostgreSQL rejects NUL characters in query parameters, and no id contains one.
    job = get_job(session, job_id, api_key.id) if "\x00" not in job_id else None
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("", response_model=JobPage, summary="List this key's jobs, newest first")
def list_my_jobs(
    session: SessionDep,
    api_key: ApiKeyDep,
    state: JobStateName | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
) -> JobPage:
    jobs, total = list_jobs(session, api_key.id, state=state, limit=limit, offset=offset)
    return JobPage(items=[JobOut.from_job(job) for job in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="State, phase, progress, timings and metrics of one job")
def read_job(job_id: str, session: SessionDep, api_key: ApiKeyDep) -> JobOut:
    job = _find_job(session, job_id, api_key)
    return JobOut.from_job(job)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued job, or stop a running one at its next step")
def cancel_job(job_id: str, session: SessionDep, api_key: ApiKeyDep) -> JobOut:
    job = _find_job(session, job_id, api_key)
    if job.state not in (JobState.QUEUED.value, JobState.RUNNING.value):
        raise ApiError(409, "job_finished", f"job {job_id} is already {job.state}; only queued or running jobs can be cancelled")
    job = request_cancel(session, job)
    session.commit()
    logger.info("cancel requested for job %s (now %s)", job.id, job.state, extra={"job_id": job.id})
    return JobOut.from_job(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a job that is not running, with its input and artifacts")
def delete_job(job_id: str, session: SessionDep, api_key: ApiKeyDep, store: StorageDep) -> Response:
    job = _find_job(session, job_id, api_key)
    input_key = job.input_key
    if not delete_job_row(session, job_id, api_key.id):
        raise ApiError(409, "job_running", f"job {job_id} is running; cancel it (POST /jobs/{job_id}/cancel) and delete it once it stops")
    session.execute(delete(Upload).where(Upload.object_key == input_key))
    session.commit()

    store.delete_prefix(job_prefix(job_id))
    if not input_key.startswith(job_prefix(job_id)):
        store.delete(input_key)
    logger.info("deleted job %s and its objects", job_id, extra={"job_id": job_id})
    return Response(status_code=204)


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="List the job's output files")
def list_artifacts(job_id: str, session: SessionDep, api_key: ApiKeyDep, store: StorageDep) -> ArtifactList:
    job = _find_job(session, job_id, api_key)
    prefix = artifacts_prefix(job_id)
    items = [
        ArtifactOut(name=stored.key[len(prefix) :], size=stored.size, url=f"/jobs/{job_id}/artifacts/{stored.key[len(prefix):]}")
        for stored in store.list_prefix(prefix)
    ]
    return ArtifactList(job_id=job_id, items=items)


def check_artifact_name(name: str) -> str:
    """Return `name` if it is a plain relative artifact path; 400 for traversal attempts."""
    lowered = name.lower()
    if ".." in name or "%2e" in lowered or "%2f" in lowered or "%5c" in lowered or not _ARTIFACT_NAME.match(name):
        raise ApiError(
            400,
            "invalid_artifact_name",
            f"artifact name {name!r} is not a plain file name; use a name from GET /jobs/{{id}}/artifacts",
            field="name",
        )
    return name


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download one artifact: a redirect to a short-lived URL (S3) or the file itself (local store)",
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "Redirect to a presigned URL"}},
)
def download_artifact(job_id: str, name: str, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep) -> Response:
    check_artifact_name(name)
    job = _find_job(session, job_id, api_key)
    store = services.store
    key = artifacts_prefix(job_id) + name
    try:
        stored = store.head(key)
    except ObjectNotFound:
        raise ApiError(404, "not_found", f"job {job_id} has no artifact {name!r}; list them with GET /jobs/{job_id}/artifacts") from None

    basename = name.rsplit("/", 1)[-1]
    url = store.presigned_get(key, services.settings.presigned_url_ttl_s, filename=basename)
    if url is not None:
        return RedirectResponse(url, status_code=307)

    media_type = mimetypes.guess_type(basename)[0] or "application/octet-stream"
    headers = {"Content-Length": str(stored.size), "Content-Disposition": f'attachment; filename="{basename}"'}
    return StreamingResponse(store.stream(key), media_type=media_type, headers=headers)
