"""Run one delivery of a job: claim its lease, download, seal, upload, record the outcome.

A delivery for a job that another worker holds a fresh lease on, or that already ended,
is dropped. Everything a run writes to the job row is conditioned on still holding the
lease, so a worker that lost its lease can no longer change the job.
"""

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from core import sealing
from core.db import utcnow
from core.errors import (
    InputError,
    JobCancelled,
    JobTimedOut,
    SealerError,
    StoreUnavailable,
)
from core.jobs import (
    Claim,
    ClaimOutcome,
    Job,
    JobState,
    artifacts_prefix,
    claim_job,
    finish_job,
    is_cancel_requested,
    job_prefix,
    state_prefix,
    update_progress,
)
from core.logging_setup import job_context
from core.scratch import remove_orphans, scratch_name
from core.spec import JobSpec
from core.storage import ObjectNotFound, remove_tree
from worker.context import WorkerContext
from worker.heartbeat import LeaseHeartbeat
from worker.joblog import capture_job_log
from worker.retry import call_store, call_with_retries, is_transient_database_error

T = TypeVar("T")

logger = logging.getLogger(__name__)

LATEST_STATE = "LATEST"
PROGRESS_WRITE_INTERVAL_S = 1.0
SUMMARY_KEYS = (
    "verdict",
    "attack_kind",
    "removal_rate",
    "removal_rate_unguided",
    "trigger_influence_reduction",
    "clean_fidelity",
    "steps",
)


class LeaseLost(Exception):
    """The job's lease moved to another worker or expired; this run must stop writing."""


def summarize_report(report: dict) -> dict:
    """Pick the figures that `GET /jobs/{id}` shows from a report.json dict."""
    summary = {key: report.get(key) for key in SUMMARY_KEYS if key in report}
    before, after = report.get("before") or {}, report.get("after") or {}
    for name in ("attack_success_rate", "attack_success_rate_unguided", "trigger_influence", "clean_false_positive_rate", "clean_accuracy"):
        if name in before or name in after:
            summary[f"{name}_before"] = before.get(name)
            summary[f"{name}_after"] = after.get(name)
    return summary


class JobRunner:
    """One delivery of `sealer.run_job` for `job_id` on this worker."""

    def __init__(self, context: WorkerContext, job_id: str):
        self.context = context
        self.settings = context.settings
        self.job_id = job_id
        self.worker_id = context.worker_id
        self.log = logging.LoggerAdapter(logger, {"job_id": job_id})
        self.heartbeat: LeaseHeartbeat | None = None
        self.started_at = None
        self.phase: str | None = None
        self.phase_started = time.monotonic()
        self.last_progress_write = 0.0
        self.state_versions = 0
        self.database_failures = 0

    # ----- the delivery -----------------------------------------------------------------

    def run(self) -> str:
        """Run the job if this delivery wins its lease; return what happened.

        Every log line of the delivery carries the job id, also those of core modules
        (checkpoint loading, the engine, the evaluation).
        """
        with job_context(self.job_id):
            return self._deliver()

    def _deliver(self) -> str:
        claim = call_with_retries(
            self._claim,
            what="claiming the job",
            window_s=self.settings.lease_ttl_s,
            is_transient=is_transient_database_error,
            log=self.log,
        )
        job = claim.job

        if claim.outcome == ClaimOutcome.NOT_FOUND:
            self.log.info("dropped delivery: job not found (deleted?)")
            return "not_found"
        if claim.outcome == ClaimOutcome.FINISHED:
            self.log.info("dropped delivery: job already %s", job.state)
            return "finished"
        if claim.outcome == ClaimOutcome.LEASE_HELD:
            self.log.info("dropped delivery: job %s, lease held by %s", job.state, claim.holder)
            return "lease_held"

        self.started_at = job.started_at
        self.log.info("claimed job (attempt %d of %d) as worker %s", job.attempts, self.settings.max_attempts, self.worker_id)
        # A worker killed mid-job leaves its scratch folder; the next job on this host removes it.
        remove_orphans(self.settings.resolved_scratch_dir)
        scratch = self.settings.resolved_scratch_dir / scratch_name(self.job_id)
        self.heartbeat = LeaseHeartbeat(
            self.context.sessions,
            self.job_id,
            self.worker_id,
            interval_s=self.settings.heartbeat_interval_s,
            lease_ttl_s=self.settings.lease_ttl_s,
        ).start()
        try:
            return self._run_claimed(job, scratch)
        finally:
            self.heartbeat.stop()
            remove_tree(scratch)

    def _claim(self) -> Claim:
        with self.context.sessions.begin() as session:
            claim = claim_job(
                session,
                self.job_id,
                self.worker_id,
                lease_ttl_s=self.settings.lease_ttl_s,
                max_attempts=self.settings.max_attempts,
            )
            if claim.outcome == ClaimOutcome.LEASE_HELD and claim.holder == self.worker_id:
                # The claim was committed but its response was lost, and this is the retry.
                claim = Claim(ClaimOutcome.CLAIMED, claim.job)
            if claim.outcome == ClaimOutcome.CLAIMED:
                session.expunge(claim.job)
        return claim

    def _store_call(self, what: str, operation: Callable[[], T]) -> T:
        """Run a store operation, retrying through an outage for up to SEALER_STORE_RETRY_WINDOW_S."""
        return call_store(operation, what=what, window_s=self.settings.store_retry_window_s, log=self.log)

    def _run_claimed(self, job: Job, scratch: Path) -> str:
        out_dir = scratch / "out"
        log_path = scratch / "log.txt"
        outcome = JobState.FAILED
        error_code: str | None = None
        error_message: str | None = None
        summary: dict | None = None

        with capture_job_log(log_path, self.job_id):
            self.log.info("running on worker %s, attempt %d of %d", self.worker_id, job.attempts, self.settings.max_attempts)
            try:
                summary = self._execute(job, scratch, out_dir)
                outcome = JobState.SUCCEEDED
            except LeaseLost:
                self.log.warning("stopped: the lease was lost, another worker continues the job")
                return "lease_lost"
            except JobCancelled as error:
                if self.heartbeat.lost.is_set():
                    self.log.warning("stopped: the lease was lost, another worker continues the job")
                    return "lease_lost"
                outcome, error_code, error_message = JobState.CANCELLED, error.code, error.message
                self.log.info("cancelled: %s", error.message)
            except (JobTimedOut, SoftTimeLimitExceeded):
                error_code = "timed_out"
                error_message = (
                    f"the job ran longer than its limit of {self.settings.job_time_limit_s} s (SEALER_JOB_TIME_LIMIT_S); "
                    "use fewer training steps or evaluation prompts, or ask the operator to raise the limit"
                )
                self.log.error("timed out after %d s", self.settings.job_time_limit_s)
            except InputError as error:
                error_code, error_message = error.code, error.message
                self.log.error("rejected input: %s", error.message)
            except SealerError as error:
                error_code, error_message = error.code, error.message
                self.log.error("failed: %s", error.message)
            except Exception as error:  # Any engine bug must still end the job, not leave it running.
                error_code = "internal_error"
                error_message = f"the worker failed with {type(error).__name__}: {error}; the job log has the details"
                self.log.exception("failed with an unexpected error")

            if outcome == JobState.SUCCEEDED:
                self.log.info("uploading %d artifacts and log.txt", len(_artifact_files(out_dir)))
            else:
                self.log.info("job ends as %s", outcome.value)

        # log.txt is complete only after the capture ends; it is committed last.
        try:
            self._commit_artifacts(out_dir if outcome == JobState.SUCCEEDED else None, log_path)
        except Exception as error:
            if outcome == JobState.SUCCEEDED and isinstance(error, StoreUnavailable):
                outcome, error_code, error_message = JobState.FAILED, error.code, error.message
            elif outcome == JobState.SUCCEEDED:
                outcome, error_code = JobState.FAILED, "upload_failed"
                error_message = f"uploading the artifacts failed ({type(error).__name__}: {error}); submit the job again"
            self.log.exception("uploading artifacts failed")

        return self._finish(outcome, error_code, error_message, summary)

    # ----- the work -----------------------------------------------------------------------

    def _execute(self, job: Job, scratch: Path, out_dir: Path) -> dict:
        spec = JobSpec.model_validate(job.spec)

        self._set_phase("downloading")
        if job.attempts > 1:
            self._clear_previous_attempt()
        model_path = scratch / "input" / job.input_filename
        try:
            fetched = self._store_call("downloading the checkpoint", lambda: self.context.store.get_to_file(job.input_key, model_path))
        except ObjectNotFound:
            raise InputError(f"the uploaded checkpoint {job.input_key!r} is missing from the store; submit the job again") from None
        if job.input_sha256 and fetched.sha256 != job.input_sha256:
            raise InputError(
                f"the stored checkpoint's SHA-256 {fetched.sha256} differs from the upload's {job.input_sha256}; submit the job again"
            )
        state_dir = scratch / "state"
        self._download_state(state_dir)
        self._check_lease()

        result = sealing.seal(
            model_path,
            spec,
            out_dir,
            device=self.settings.device,
            on_progress=self._on_progress,
            should_cancel=self._should_cancel,
            state_dir=state_dir,
            on_state_saved=self._upload_state,
            checkpoint_every=self.settings.checkpoint_every_steps,
            job_id=self.job_id,
        )

        self._check_lease()
        self._set_phase("uploading")
        return summarize_report(result.summary)

    def _check_lease(self) -> None:
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost()

    def _should_cancel(self) -> bool:
        """Polled by the engine between steps: lease lost, time limit, or a cancel request."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            return True
        if self.started_at is not None:
            elapsed = (utcnow() - self.started_at).total_seconds()
            if elapsed > self.settings.job_time_limit_s:
                raise JobTimedOut(f"job ran {elapsed:.0f} s, over its limit of {self.settings.job_time_limit_s} s")
        try:
            with self.context.sessions() as session:
                return is_cancel_requested(session, self.job_id)
        except Exception as error:
            if not is_transient_database_error(error):
                raise
            self._note_database_failure("reading the cancel flag", error)
            return False

    def _on_progress(self, progress: sealing.Progress) -> None:
        changed = progress.phase != self.phase
        now = time.monotonic()
        last_step = progress.total and progress.step >= progress.total
        if not changed and not last_step and now - self.last_progress_write < PROGRESS_WRITE_INTERVAL_S:
            return
        self._write_progress(progress.phase, progress.step, progress.total)

    def _set_phase(self, phase: str) -> None:
        self._write_progress(phase, 0, 0)

    def _write_progress(self, phase: str, step: int, total: int) -> None:
        if phase != self.phase:
            if self.phase is not None:
                _observe_phase(self.phase, time.monotonic() - self.phase_started)
            self.log.info("phase %s", phase)
            self.phase = phase
            self.phase_started = time.monotonic()
        self.last_progress_write = time.monotonic()
        try:
            with self.context.sessions.begin() as session:
                owned = update_progress(session, self.job_id, self.worker_id, phase=phase, step=step, total=total)
        except Exception as error:
            # Progress is advisory: the heartbeat decides whether the lease survives the outage.
            if not is_transient_database_error(error):
                raise
            self._note_database_failure("recording progress", error)
            return
        if self.database_failures:
            self.log.info("the database is reachable again after %d failed calls", self.database_failures)
            self.database_failures = 0
        if not owned and self.heartbeat is not None:
            self.heartbeat.lost.set()

    def _note_database_failure(self, what: str, error: Exception) -> None:
        self.database_failures += 1
        if self.database_failures == 1 or self.database_failures % 20 == 0:
            self.log.warning("%s failed (%d in a row), the job continues: %s", what, self.database_failures, error)

    # ----- engine state in the store ---------------------------------------------------------

    def _upload_state(self, state_dir: Path) -> None:
        """Copy a saved engine state to `jobs/<id>/state/<version>/`, then point LATEST at it.

        LATEST is written only after every file of the version is stored, so a worker that
        dies mid-upload leaves the previous complete state in place.
        """
        self._check_lease()
        self.state_versions += 1
        prefix = state_prefix(self.job_id)
        version = f"{int(time.time() * 1000):015d}-{self.state_versions:05d}"
        store = self.context.store
        self._store_call("saving the engine state", lambda: store.put_folder(f"{prefix}{version}/", state_dir))
        self._check_lease()
        self._store_call("saving the engine state", lambda: store.put_bytes(prefix + LATEST_STATE, version.encode()))

        def remove_older_versions() -> None:
            for stored in store.list_prefix(prefix):
                if stored.key != prefix + LATEST_STATE and not stored.key.startswith(f"{prefix}{version}/"):
                    store.delete(stored.key)

        self._store_call("removing older engine states", remove_older_versions)
        self.log.info("saved engine state %s", version)

    def _download_state(self, state_dir: Path) -> None:
        store = self.context.store
        prefix = state_prefix(self.job_id)
        try:
            version = self._store_call("reading the saved engine state", lambda: b"".join(store.stream(prefix + LATEST_STATE)))
        except ObjectNotFound:
            return
        version = version.decode().strip()
        fetched = self._store_call("downloading the saved engine state", lambda: store.get_folder(f"{prefix}{version}/", state_dir))
        self.log.info("downloaded saved engine state %s (%d files) to resume from", version, len(fetched))

    # ----- artifacts and the final state ------------------------------------------------------

    def _commit_artifacts(self, out_dir: Path | None, log_path: Path) -> None:
        """Upload outputs to a staging prefix, then move each into `artifacts/`, log.txt last."""
        store = self.context.store
        staging = f"{job_prefix(self.job_id)}staging/{uuid.uuid4().hex[:8]}/"
        final = artifacts_prefix(self.job_id)
        try:
            names: list[str] = []
            for path in _artifact_files(out_dir):
                name = path.relative_to(out_dir).as_posix()
                self._store_call(f"uploading {name}", lambda path=path, name=name: store.put_file(staging + name, path))
                names.append(name)
            if log_path.is_file():
                self._store_call("uploading log.txt", lambda: store.put_file(staging + "log.txt", log_path))
                names.append("log.txt")

            for name in names:
                self._check_lease()
                self._store_call(f"publishing {name}", lambda name=name: self._move(staging + name, final + name))
        finally:
            try:
                self._store_call("removing staged artifacts", lambda: store.delete_prefix(staging))
            except Exception as error:  # The job's outcome matters more; DELETE /jobs/{id} removes them later.
                self.log.warning("could not remove staged artifacts under %s: %s", staging, error)

    def _move(self, source: str, destination: str) -> None:
        store = self.context.store
        try:
            store.move(source, destination)
        except Exception:
            # A retry of a move whose first try succeeded, but lost its response, finds nothing to move.
            if not store.exists(source) and store.exists(destination):
                return
            raise

    def _clear_previous_attempt(self) -> None:
        """Remove what a dead earlier attempt left: staged uploads and part of the artifacts."""
        store = self.context.store
        for prefix in (f"{job_prefix(self.job_id)}staging/", artifacts_prefix(self.job_id)):
            removed = self._store_call("removing the previous attempt's artifacts", lambda prefix=prefix: store.delete_prefix(prefix))
            if removed:
                self.log.info("removed %d objects under %s left by the previous attempt", removed, prefix)

    def _finish(self, outcome: JobState, error_code: str | None, error_message: str | None, summary: dict | None) -> str:
        if self.phase is not None:
            _observe_phase(self.phase, time.monotonic() - self.phase_started)

        def finish() -> bool:
            with self.context.sessions.begin() as session:
                return finish_job(
                    session,
                    self.job_id,
                    self.worker_id,
                    outcome,
                    error_code=error_code,
                    error_message=error_message,
                    summary=summary,
                )

        # finish_job only changes a row whose lease is ours, so a retry cannot finish twice.
        finished = call_with_retries(
            finish,
            what=f"marking the job {outcome.value}",
            window_s=self.settings.lease_ttl_s,
            is_transient=is_transient_database_error,
            log=self.log,
        )
        if not finished:
            self.log.warning("the lease was lost before the job could be marked %s", outcome.value)
            return "lease_lost"

        # A finished job never resumes, so its saved engine states can go.
        try:
            self._store_call("removing saved engine states", lambda: self.context.store.delete_prefix(state_prefix(self.job_id)))
        except Exception as error:  # DELETE /jobs/{id} removes them with the job.
            self.log.warning("could not remove saved engine states: %s", error)
        if self.started_at is not None:
            _observe_job(outcome.value, (utcnow() - self.started_at).total_seconds())
        self.log.info("job %s", outcome.value)
        return outcome.value


def _artifact_files(out_dir: Path | None) -> list[Path]:
    if out_dir is None or not out_dir.is_dir():
        return []
    return [path for path in sorted(out_dir.rglob("*")) if path.is_file()]


def _observe_phase(phase: str, seconds: float) -> None:
    from core import metrics

    metrics.observe_phase_duration(phase, seconds)


def _observe_job(outcome: str, seconds: float) -> None:
    from core import metrics

    metrics.observe_job_duration(outcome, seconds)
