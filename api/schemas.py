"""Request and response bodies of the HTTP API (the job spec itself is core.spec.JobSpec)."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.jobs import Job, Upload
from core.spec import JobSpec

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobErrorOut(BaseModel):
    code: str
    message: str


class JobInputOut(BaseModel):
    filename: str
    size: int
    sha256: str | None


class JobOut(BaseModel):
    """A job as `GET /jobs/{id}` returns it."""

    id: str
    state: JobStateName
    phase: str | None = Field(description="downloading, validating, evaluating_before, unlearning, evaluating_after, writing or uploading")
    step: int = Field(description="Step within the phase (unlearning steps while unlearning).")
    total: int = Field(description="Steps in the phase; 0 when the phase has no steps.")
    attempts: int = Field(description="How many times a worker started the job.")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    error: JobErrorOut | None
    metrics: dict[str, Any] | None = Field(
        description="Metric summary from the report (ASR before/after, removal rate, clean fidelity) once known."
    )
    input: JobInputOut
    spec: dict[str, Any]
    links: dict[str, str]

    @classmethod
    def from_job(cls, job: Job) -> "JobOut":
        error = None
        if job.error_code:
            error = JobErrorOut(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            state=job.state,
            phase=job.phase,
            step=job.step,
            total=job.total,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            error=error,
            metrics=job.summary,
            input=JobInputOut(filename=job.input_filename, size=job.input_size, sha256=job.input_sha256),
            spec=job.spec,
            links={
                "self": f"/jobs/{job.id}",
                "artifacts": f"/jobs/{job.id}/artifacts",
                "cancel": f"/jobs/{job.id}/cancel",
            },
        )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class CreateJobFromUpload(BaseModel):
    """`POST /jobs` with JSON: a checkpoint uploaded earlier through `POST /uploads`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_key: str = Field(min_length=1, max_length=512, description="`checkpoint_key` returned by POST /uploads.")
    spec: JobSpec


class ArtifactOut(BaseModel):
    name: str
    size: int
    url: str


class ArtifactList(BaseModel):
    job_id: str
    items: list[ArtifactOut]


class CreateUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=255, description="The checkpoint's file name, extension included.")
    size: int = Field(gt=0, description="Exact size in bytes.")


class UploadPart(BaseModel):
    part_number: int = Field(ge=1, le=10_000)
    url: str


class UploadOut(BaseModel):
    id: str
    checkpoint_key: str = Field(description="Pass this as `checkpoint_key` to POST /jobs once the upload is complete.")
    filename: str
    state: Literal["pending", "complete", "consumed"]
    size: int | None
    sha256: str | None
    method: Literal["put", "s3_multipart"]
    upload_url: str | None = Field(default=None, description="method `put`: PUT the whole file body here.")
    part_size: int | None = Field(default=None, description="method `s3_multipart`: bytes per part (the last may be smaller).")
    parts: list[UploadPart] = Field(default_factory=list, description="method `s3_multipart`: PUT each part to its URL.")
    complete_url: str | None = Field(default=None, description="method `s3_multipart`: POST the parts' ETags here.")
    expires_in_s: int | None = None

    @classmethod
    def from_upload(cls, upload: Upload, method: str, **extra: Any) -> "UploadOut":
        return cls(
            id=upload.id,
            checkpoint_key=upload.object_key,
            filename=upload.filename,
            state=upload.state,
            size=upload.size,
            sha256=upload.sha256,
            method=method,
            **extra,
        )


class CompletedPart(BaseModel):
    part_number: int = Field(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=200)


class CompleteUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)
