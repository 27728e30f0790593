"""`/uploads`: upload a large checkpoint before `POST /jobs`.

With S3 the client PUTs parts straight to presigned URLs and then posts their ETags to
`/uploads/{id}/complete`, so multi-GB files never pass through the API. With the local
store (and as a fallback with S3) the client PUTs the whole body to `/uploads/{id}`,
which the API streams to the store.
"""

import logging
import math

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.schemas import CompleteUpload, CreateUpload, UploadOut, UploadPart
from api.streaming import safe_filename, spool_body, too_large
from api.submission import copy_to_store
from core import metrics
from core.db import utcnow
from core.jobs import ApiKey, Upload, UploadState, new_id
from core.storage import MAX_PARTS, PART_BYTES, MultipartPart, ObjectNotFound

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/uploads", tags=["uploads"])

MIB = 1024 * 1024


def part_size_for(size: int) -> int:
    """Smallest whole-MiB part size of at least 8 MiB that fits `size` bytes into 10,000 parts."""
    needed = math.ceil(size / MAX_PARTS / MIB) * MIB
    return max(PART_BYTES, needed)


def _describe(upload: Upload, services, *, with_urls: bool) -> UploadOut:
    store = services.store
    if not store.presigns:
        return UploadOut.from_upload(upload, "put", upload_url=f"/uploads/{upload.id}")
    extra: dict = {"complete_url": f"/uploads/{upload.id}/complete", "upload_url": f"/uploads/{upload.id}"}
    if with_urls and upload.state == UploadState.PENDING.value and upload.multipart_id:
        ttl = services.settings.presigned_url_ttl_s
        part_size = part_size_for(upload.size or 1)
        count = max(1, math.ceil((upload.size or 0) / part_size))
        extra["part_size"] = part_size
        extra["parts"] = [
            UploadPart(part_number=number, url=store.presigned_part_url(upload.object_key, upload.multipart_id, number, ttl))
            for number in range(1, count + 1)
        ]
        extra["expires_in_s"] = ttl
    return UploadOut.from_upload(upload, "s3_multipart", **extra)


def _owned_upload(session, upload_id: str, api_key: ApiKey) -> Upload:
    # PostgreSQL rejects NUL characters in query parameters, and no id contains one.
    upload = session.get(Upload, upload_id) if "\x00" not in upload_id else None
    if upload is None or upload.api_key_id != api_key.id:
        raise not_found("upload", upload_id)
    return upload


def _require_pending(upload: Upload) -> None:
    if upload.state != UploadState.PENDING.value:
        raise ApiError(409, "upload_complete", f"upload {upload.id} is already {upload.state}; start a new upload with POST /uploads")


@router.post("", status_code=201, response_model=UploadOut, summary="Start an upload; returns where to send the bytes")
def create_upload(body: CreateUpload, response: Response, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep) -> UploadOut:
    limit = services.settings.max_upload_bytes
    if body.size > limit:
        raise too_large(limit)
    upload_id = new_id()
    filename = safe_filename(body.filename)
    upload = Upload(
        id=upload_id,
        api_key_id=api_key.id,
        filename=filename,
        object_key=f"uploads/{upload_id}/{filename}",
        state=UploadState.PENDING.value,
        size=body.size,
    )
    if services.store.presigns:
        upload.multipart_id = services.store.create_multipart(upload.object_key)
    session.add(upload)
    session.commit()
    response.headers["Location"] = f"/uploads/{upload_id}"
    logger.info("upload %s started for %s (%d bytes)", upload_id, filename, body.size)
    return _describe(upload, services, with_urls=True)


@router.get("/{upload_id}", response_model=UploadOut, summary="State of an upload (fresh part URLs while pending)")
def read_upload(upload_id: str, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep) -> UploadOut:
    return _describe(_owned_upload(session, upload_id, api_key), services, with_urls=True)


@router.put("/{upload_id}", response_model=UploadOut, summary="Send the whole checkpoint as the request body")
async def put_upload_body(
    upload_id: str, request: Request, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep
) -> UploadOut:
    upload = await run_in_threadpool(_owned_upload, session, upload_id, api_key)
    _require_pending(upload)
    # End the read transaction so that no pooled connection stays checked out while the body streams.
    await run_in_threadpool(session.commit)
    limit = min(services.settings.max_upload_bytes, upload.size or services.settings.max_upload_bytes)
    spool_dir = services.settings.resolved_scratch_dir / "api-spool"
    spooled = await spool_body(request, spool_dir, upload.filename, limit)
    try:
        if spooled.size != upload.size:
            raise ApiError(
                422,
                "size_mismatch",
                f"received {spooled.size} bytes but POST /uploads declared {upload.size}; send the whole file",
                field="size",
            )
        await run_in_threadpool(copy_to_store, services, upload.object_key, spooled.path)
    finally:
        spooled.remove()

    if upload.multipart_id:
        await run_in_threadpool(services.store.abort_multipart, upload.object_key, upload.multipart_id)
        upload.multipart_id = None
    metrics.count_upload_bytes(spooled.size)
    upload.sha256 = spooled.sha256
    upload.state = UploadState.COMPLETE.value
    upload.completed_at = utcnow()
    await run_in_threadpool(session.commit)
    logger.info("upload %s complete: %d bytes", upload.id, spooled.size)
    return _describe(upload, services, with_urls=False)


@router.post("/{upload_id}/complete", response_model=UploadOut, summary="Finish an S3 multipart upload with the parts' ETags")
def complete_upload(
    upload_id: str, body: CompleteUpload, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep
) -> UploadOut:
    upload = _owned_upload(session, upload_id, api_key)
    _require_pending(upload)
    if not upload.multipart_id:
        raise ApiError(409, "not_multipart", f"upload {upload_id} takes its body through PUT /uploads/{upload_id}")
    numbers = [part.part_number for part in body.parts]
    if len(set(numbers)) != len(numbers):
        raise ApiError(422, "invalid_request", "parts lists a part number twice; list each part once", field="parts")

    store = services.store
    parts = [MultipartPart(part.part_number, part.etag) for part in body.parts]
    try:
        stored = store.complete_multipart(upload.object_key, upload.multipart_id, parts)
    except Exception as error:
        raise ApiError(
            422, "upload_incomplete", f"the store rejected the parts of upload {upload_id} ({error}); upload missing parts and retry", field="parts"
        ) from None

    if stored.size != upload.size or stored.size > services.settings.max_upload_bytes:
        store.delete(upload.object_key)
        session.delete(upload)
        session.commit()
        if stored.size > services.settings.max_upload_bytes:
            raise too_large(services.settings.max_upload_bytes)
        raise ApiError(
            422, "size_mismatch", f"the parts add up to {stored.size} bytes but POST /uploads declared {upload.size}; start again", field="parts"
        )

    metrics.count_upload_bytes(stored.size)
    upload.multipart_id = None
    upload.state = UploadState.COMPLETE.value
    upload.completed_at = utcnow()
    session.commit()
    logger.info("upload %s complete: %d bytes in %d parts", upload.id, stored.size, len(parts))
    return _describe(upload, services, with_urls=False)


@router.delete("/{upload_id}", status_code=204, summary="Abandon an upload that no job uses")
def delete_upload(upload_id: str, session: SessionDep, api_key: ApiKeyDep, services: ServicesDep) -> Response:
    upload = _owned_upload(session, upload_id, api_key)
    if upload.state == UploadState.CONSUMED.value:
        raise ApiError(409, "upload_used", f"upload {upload_id} belongs to a job; delete the job instead")
    if upload.multipart_id:
        services.store.abort_multipart(upload.object_key, upload.multipart_id)
    try:
        services.store.delete(upload.object_key)
    except ObjectNotFound:
        pass
    session.delete(upload)
    session.commit()
    return Response(status_code=204)
