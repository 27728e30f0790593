"""A stand-in for `core.sealing.seal` in worker tests, and a Celery launcher that installs it.

Worker tests check the service machinery (leases, redelivery, resume, cancel), not the
engine, so this `seal` only sleeps through its steps, saves a tiny resumable state like
the engine does and writes the artifact files. Every step is appended to the file named
by FAKE_ENGINE_RUN_LOG as `job_id pid step time`, so a test can tell which process ran
which step. FAKE_ENGINE_STEP_SECONDS sets the time per step.

Run a worker with it: `python -m tests.fake_engine -A worker.celery_app worker ...`.
"""

import json
import logging
import os
import sys
import time
from pathlib import Path

from core import sealing
from core.errors import InputError, JobCancelled
from core.sealing import Progress, SealResult

logger = logging.getLogger("tests.fake_engine")

STATE_FILE = "fake_state.json"


def _record(job_id: str | None, step: int) -> None:
    path = os.environ.get("FAKE_ENGINE_RUN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{job_id} {os.getpid()} {step} {time.time():.6f}\n")


def seal(
    model_path: Path,
    spec,
    out_dir: Path,
    *,
    device: str = "auto",
    on_progress=None,
    should_cancel=None,
    state_dir: Path | None = None,
    on_state_saved=None,
    checkpoint_every: int = 50,
    job_id: str | None = None,
) -> SealResult:
    log = logging.LoggerAdapter(logger, {"job_id": job_id})
    report = on_progress or (lambda progress: None)
    step_seconds = float(os.environ.get("FAKE_ENGINE_STEP_SECONDS", "0.05"))
    total = spec.training.steps

    report(Progress("validating"))
    if Path(model_path).stat().st_size == 0:
        raise InputError("fake engine: empty checkpoint", field="checkpoint")
    if spec.triggers[0].text == "invalid-trigger":
        raise InputError("trigger 'invalid-trigger' encodes to 0 tokens; choose another trigger", field="triggers")

    start = 0
    if state_dir is not None and (state_dir / STATE_FILE).exists():
        start = json.loads((state_dir / STATE_FILE).read_text())["step"]
        log.info("resuming from step %d of %d", start, total)

    report(Progress("evaluating_before"))
    for step in range(start + 1, total + 1):
        if should_cancel is not None and should_cancel():
            raise JobCancelled(f"job cancelled at step {step - 1} of {total}")
        time.sleep(step_seconds)
        _record(job_id, step)
        report(Progress("unlearning", step, total, {"loss": 1.0 / step}))
        if state_dir is not None and (step % checkpoint_every == 0 or step == total):
            state_dir.mkdir(parents=True, exist_ok=True)
            (state_dir / STATE_FILE).write_text(json.dumps({"step": step}))
            if on_state_saved is not None:
                on_state_saved(state_dir)

    report(Progress("evaluating_after"))
    report(Progress("writing"))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "sanitized.safetensors"
    weights.write_bytes(Path(model_path).read_bytes())
    summary = {
        "verdict": "fake engine",
        "removal_rate": 1.0,
        "steps": total,
        "before": {"attack_success_rate": 1.0},
        "after": {"attack_success_rate": 0.0},
    }
    (out_dir / "report.json").write_text(json.dumps(summary))
    log.info("fake seal finished %d steps", total)
    return SealResult(summary=summary, artifacts=[weights, out_dir / "report.json"])


def main() -> None:
    sealing.seal = seal
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
