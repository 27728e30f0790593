"""Job, API-key and upload records; the job state machine; leases and the reaper.

Job states: `queued -> running -> succeeded | failed | cancelled`, and `running -> queued`
when the reaper finds an expired lease. The database, not the broker, decides who runs a
job. A worker claims a job with one conditional UPDATE and checks its row count, then
renews the lease (`lease_owner`, `heartbeat_at`) from a heartbeat thread. Every later
write by that worker is conditioned on it still owning the lease, so a worker whose job
was reaped can no longer change it.

Lease times come from the workers' clocks, which must agree to well within the lease
TTL (NTP-synchronised hosts do). This module must not import torch.
"""

import enum
import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from core import metrics
from core.db import Base, UTCDateTime, utcnow

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "slr_"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value})

# Phases in the order a job goes through them. The middle ones come from the engine.
PHASES = (
    "downloading",
    "validating",
    "evaluating_before",
    "unlearning",
    "evaluating_after",
    "writing",
    "uploading",
)


class UploadState(str, enum.Enum):
    PENDING = "pending"
    COMPLETE = "complete"
    CONSUMED = "consumed"


def new_id() -> str:
    return uuid.uuid4().hex


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Upload(Base):
    """A checkpoint uploaded ahead of `POST /jobs`, in one request or as S3 multipart parts."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("object_key", name="uq_uploads_object_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    object_key: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default=UploadState.PENDING.value)
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    multipart_id: Mapped[str | None] = mapped_column(String(1024), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key", name="uq_jobs_api_key_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)

    input_key: Mapped[str] = mapped_column(String(512))
    input_filename: Mapped[str] = mapped_column(String(255))
    input_size: Mapped[int] = mapped_column(BigInteger)
    input_sha256: Mapped[str | None] = mapped_column(String(64), default=None)

    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def prefix(self) -> str:
        """Object-store folder of everything this job writes."""
        return job_prefix(self.id)


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def artifacts_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/artifacts/"


def state_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/state/"


# --- API keys ---------------------------------------------------------------------------


def hash_api_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough: nothing to brute-force.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key named `name`; return the record and the plaintext key (shown once)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError(f"key name {name!r} must be 1 to 100 characters; choose another name")
    existing_id = session.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if existing_id is not None:
        raise ValueError(f"an active key named {name!r} already exists (id {existing_id}); choose another name")

    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(name=name, key_hash=hash_api_key(plaintext), prefix=plaintext[:10])
    session.add(record)
    session.flush()
    return record, plaintext


def find_api_key(session: Session, plaintext: str) -> ApiKey | None:
    """Return the active key whose hash matches `plaintext`, or None."""
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext)))
    if record is None or not record.active:
        return None
    return record


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_api_key(session: Session, id_or_name: str) -> ApiKey:
    """Revoke the active key with this id or name; raise LookupError when none or several match."""
    matches = list(
        session.scalars(
            select(ApiKey).where(
                or_(ApiKey.id == id_or_name, ApiKey.name == id_or_name), ApiKey.revoked_at.is_(None)
            )
        )
    )
    if not matches:
        raise LookupError(f"no active API key with id or name {id_or_name!r}; list keys with `sealer keys list`")
    if len(matches) > 1:
        ids = ", ".join(key.id for key in matches)
        raise LookupError(f"{len(matches)} active keys match {id_or_name!r} ({ids}); revoke by id")
    key = matches[0]
    key.revoked_at = utcnow()
    session.flush()
    return key


# --- Job queries used by the API --------------------------------------------------------


def get_job(session: Session, job_id: str, api_key_id: str) -> Job | None:
    """Return the job if it exists and belongs to `api_key_id`; another key's job is None."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id))


def list_jobs(
    session: Session, api_key_id: str, *, state: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Job], int]:
    """Return one page of the key's jobs, newest first, and the total count."""
    conditions = [Job.api_key_id == api_key_id]
    if state is not None:
        conditions.append(Job.state == state)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    query = select(Job).where(*conditions).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    return list(session.scalars(query)), total


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job now, or ask the worker of a running job to stop at its next step."""
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.QUEUED.value)
        .values(state=JobState.CANCELLED.value, finished_at=now, updated_at=now, cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    if cancelled.rowcount == 0:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING.value)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    session.flush()
    session.refresh(job)
    if cancelled.rowcount:
        record_state_change(JobState.CANCELLED.value)
    return job


def delete_job_row(session: Session, job_id: str, api_key_id: str) -> bool:
    """Delete the job unless a worker runs it; return False when it is running."""
    result = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.api_key_id == api_key_id, Job.state != JobState.RUNNING.value)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


# --- Leases ------------------------------------------------------------------------------


class ClaimOutcome(str, enum.Enum):
    CLAIMED = "claimed"
    NOT_FOUND = "not_found"
    FINISHED = "finished"
    LEASE_HELD = "lease_held"


@dataclass
class Claim:
    outcome: ClaimOutcome
    job: Job | None = None
    holder: str | None = None


def lease_cutoff(now: datetime, lease_ttl_s: float) -> datetime:
    """Heartbeats older than the returned time belong to expired leases."""
    return now - timedelta(seconds=lease_ttl_s)


def claim_job(session: Session, job_id: str, worker_id: str, *, lease_ttl_s: float, max_attempts: int) -> Claim:
    """Take the lease of a queued job (or of a running one whose lease expired).

    One conditional UPDATE decides: of two workers that try at once, exactly one sees a
    row count of 1. The caller commits before starting work.
    """
    now = utcnow()
    claimable = or_(
        Job.state == JobState.QUEUED.value,
        and_(Job.state == JobState.RUNNING.value, Job.heartbeat_at < lease_cutoff(now, lease_ttl_s)),
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False), Job.attempts < max_attempts)
        .values(
            state=JobState.RUNNING.value,
            lease_owner=worker_id,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    job = session.get(Job, job_id, populate_existing=True)
    if result.rowcount == 1:
        record_state_change(JobState.RUNNING.value)
        return Claim(ClaimOutcome.CLAIMED, job)
    if job is None:
        return Claim(ClaimOutcome.NOT_FOUND)
    if job.state in TERMINAL_STATES:
        return Claim(ClaimOutcome.FINISHED, job)
    return Claim(ClaimOutcome.LEASE_HELD, job, job.lease_owner)


def renew_lease(session: Session, job_id: str, worker_id: str) -> bool:
    """Refresh the heartbeat; False means the lease was lost (the job was reaped or finished)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.state == JobState.RUNNING.value)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def update_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    phase: str | None = None,
    step: int | None = None,
    total: int | None = None,
    summary: dict[str, Any] | None = None,
) -> bool:
    """Write phase, step/total and metrics while the worker holds the lease."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if step is not None:
        values["step"] = step
    if total is not None:
        values["total"] = total
    if summary is not None:
        values["summary"] = summary
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.state == JobState.RUNNING.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(
    session: Session,
    job_id: str,
    worker_id: str,
    state: JobState,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    summary: dict[str, Any] | None = None,
) -> bool:
    """Move a running job to a final state and drop its lease; False when the lease was lost."""
    if state.value not in TERMINAL_STATES:
        raise ValueError(f"finish_job needs a final state, got {state.value!r}")
    now = utcnow()
    values: dict[str, Any] = {
        "state": state.value,
        "finished_at": now,
        "updated_at": now,
        "lease_owner": None,
        "error_code": error_code,
        "error_message": error_message,
    }
    if summary is not None:
        values["summary"] = summary
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.state == JobState.RUNNING.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        record_state_change(state.value)
        return True
    return False


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def reap_expired(
    session: Session, *, lease_ttl_s: float, max_attempts: int, resend_queued_after_s: float | None = None
) -> ReapResult:
    """Deal with running jobs whose lease expired because their worker died.

    A job whose cancel was requested becomes `cancelled`; one that used up its attempts
    fails with `worker_lost`; the rest go back to `queued`, and the caller sends their
    task again after committing. Each transition is a conditional UPDATE, so two reapers
    never handle the same job twice.

    With `resend_queued_after_s`, jobs queued that long without a worker taking them are
    listed in `resent` too, in case their message was lost (a broker that lost its data,
    or a worker killed between fetching a message and claiming the job). A duplicate
    message is harmless: the lease drops it.
    """
    now = utcnow()
    cutoff = lease_cutoff(now, lease_ttl_s)
    expired = Job.state == JobState.RUNNING.value, Job.heartbeat_at < cutoff
    result = ReapResult()

    candidates = session.execute(select(Job.id, Job.attempts, Job.cancel_requested).where(*expired)).all()
    for job_id, attempts, cancel_requested in candidates:
        values: dict[str, Any] = {"lease_owner": None, "updated_at": now}
        if cancel_requested:
            values |= {"state": JobState.CANCELLED.value, "finished_at": now}
            bucket = result.cancelled
        elif attempts >= max_attempts:
            values |= {
                "state": JobState.FAILED.value,
                "finished_at": now,
                "error_code": "worker_lost",
                "error_message": (
                    f"the worker running this job stopped responding {attempts} times "
                    f"(limit {max_attempts}); the job may exhaust the worker's memory, so "
                    "try a smaller batch size or a larger worker"
                ),
            }
            bucket = result.failed
        else:
            values |= {"state": JobState.QUEUED.value, "phase": None}
            bucket = result.requeued

        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, *expired)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:
            bucket.append(job_id)
            record_state_change(values["state"])

    if resend_queued_after_s is not None:
        result.resent = _claim_stale_queued(session, now, resend_queued_after_s)
    return result


def _claim_stale_queued(session: Session, now: datetime, older_than_s: float) -> list[str]:
    """Mark queued jobs untouched for `older_than_s` as re-sent now; return their ids."""
    stale = Job.state == JobState.QUEUED.value, Job.updated_at < now - timedelta(seconds=older_than_s)
    claimed = []
    for job_id in session.scalars(select(Job.id).where(*stale)).all():
        changed = session.execute(
            update(Job).where(Job.id == job_id, *stale).values(updated_at=now).execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:
            claimed.append(job_id)
    return claimed


def record_state_change(state: str) -> None:
    """Count a job entering `state` in the Prometheus metrics."""
    metrics.record_job_state(state)
