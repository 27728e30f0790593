"""Audits of what a job left behind after a fault: its final state, steps, artifacts and leftovers.

A job is *lost* when it did not end as it should (a job that survives the fault must
succeed with every artifact intact). A job *ran twice* in any of three cases. A process
ran more than the one step it had in flight after another process took the job over. The
job reached a final state more than once. Or it redid more steps than its saved engine
states allow, which is at most `checkpoint_every_steps` per extra attempt.
"""

import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from reliability.stack import RunStep, Stack, sha256_file

# The fake engine's outputs plus the job log that the worker adds.
SUCCESS_ARTIFACTS = ["log.txt", "report.json", "sanitized.safetensors"]


@dataclass
class JobAudit:
    job_id: str
    state: str
    attempts: int
    lost: bool = False
    run_twice: bool = False
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(f"job {self.job_id[:8]}: {text}")


def audit_steps(audit: JobAudit, steps: list[RunStep], total: int, checkpoint_every: int) -> None:
    """Check that the steps cover 1..total and that no two processes ran them at the same time."""
    by_pid: dict[int, list[RunStep]] = {}
    for row in steps:
        by_pid.setdefault(row.pid, []).append(row)
    starts = sorted((min(row.time for row in rows), pid) for pid, rows in by_pid.items())
    for (_, earlier), (later_start, later) in itertools.pairwise(starts):
        # A step already running when the lease moved (a frozen worker) may still end; it
        # writes nothing. A second step after the takeover means two runs at once.
        overlapping = [row.step for row in by_pid[earlier] if row.time > later_start]
        if len(overlapping) > 1:
            audit.run_twice = True
            audit.problem(f"process {earlier} ran steps {overlapping} after process {later} took over")

    done = {row.step for row in steps}
    missing = sorted(set(range(1, total + 1)) - done)
    if audit.state == "succeeded" and missing:
        audit.lost = True
        audit.problem(f"succeeded without running steps {missing[:10]}")
    redone = len(steps) - len(done)
    allowed = checkpoint_every * max(0, audit.attempts - 1)
    if redone > allowed:
        audit.run_twice = True
        audit.problem(f"redid {redone} steps, more than the {allowed} that its saved states allow")


def audit_objects(audit: JobAudit, stack: Stack, *, required: list[str], allowed: list[str]) -> None:
    """Check the job's objects: its input and artifacts between `required` and `allowed`, each one whole."""
    keys = stack.object_keys(audit.job_id)
    artifacts = sorted(key.removeprefix("artifacts/") for key in keys if key.startswith("artifacts/"))
    others = [key for key in keys if not key.startswith(("artifacts/", "input/"))]
    if not set(required) <= set(artifacts) or not set(artifacts) <= set(allowed):
        if audit.state == "succeeded":
            audit.lost = True
        audit.problem(f"artifacts {artifacts}, expected {sorted(required)} (at most {sorted(allowed)})")
    if others:
        audit.problem(f"objects left behind: {others}")
    audit.problems += [f"job {audit.job_id[:8]}: {text}" for text in check_artifact_bytes(stack, audit.job_id, artifacts)]


def check_artifact_bytes(stack: Stack, job_id: str, names: list[str]) -> list[str]:
    """Download each named artifact and check it is whole; return what is wrong."""
    problems = []
    store = stack.store()
    with tempfile.TemporaryDirectory(prefix="sealer-audit-") as folder:
        for name in names:
            local = Path(folder) / name
            store.get_to_file(f"jobs/{job_id}/artifacts/{name}", local)
            if name == "sanitized.safetensors" and sha256_file(local) != stack.checkpoints.get(job_id):
                problems.append("sanitized.safetensors differs from the uploaded checkpoint (half-written?)")
            if name == "report.json":
                try:
                    json.loads(local.read_text())
                except ValueError as error:
                    problems.append(f"report.json is not whole JSON ({error})")
    return problems


def audit_job(
    stack: Stack,
    job: dict,
    *,
    total_steps: int,
    expect_state: str = "succeeded",
    expect_attempts: int | None = None,
    expect_error: str | None = None,
) -> JobAudit:
    """Audit one finished job against what the scenario expects of it."""
    job_id = job["id"]
    audit = JobAudit(job_id, job["state"], job["attempts"])

    if job["state"] != expect_state:
        audit.lost = expect_state == "succeeded"
        audit.problem(f"ended {job['state']} ({job.get('error')}), expected {expect_state}")
    if expect_attempts is not None and job["attempts"] != expect_attempts:
        audit.problem(f"took {job['attempts']} attempts, expected {expect_attempts}")
    error_code = (job.get("error") or {}).get("code")
    if expect_error is not None and error_code != expect_error:
        audit.problem(f"error code {error_code!r}, expected {expect_error!r}")

    # The worker logs the outcome after its last cleanup; audit what it left only then.
    final_line = f"[job={job_id}]: job {job['state']}"
    if not stack.wait_for_worker_log(final_line, timeout_s=60):
        audit.problem(f"no worker logged {final_line!r}")
    finals = stack.worker_log_count(final_line)
    if finals > 1:
        audit.run_twice = True
        audit.problem(f"reached {job['state']} {finals} times")

    checkpoint_every = stack.settings.checkpoint_every_steps
    audit_steps(audit, stack.run_steps(job_id), total_steps, checkpoint_every)
    if expect_state == "succeeded":
        audit_objects(audit, stack, required=SUCCESS_ARTIFACTS, allowed=SUCCESS_ARTIFACTS)
    else:
        # A job that did not succeed keeps at most its log; the log itself may be missing
        # when the store was down until the end.
        audit_objects(audit, stack, required=[], allowed=["log.txt"])
    return audit
