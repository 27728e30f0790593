"""One sealing job end to end: load, validate, evaluate before, unlearn, evaluate after, write artifacts.

The CLI and the worker both call `seal`. It never touches the database or the object
store: the caller passes callbacks for progress, cancellation and engine-state saving.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.spec import JobSpec

logger = logging.getLogger(__name__)

Phase = Literal["validating", "evaluating_before", "unlearning", "evaluating_after", "writing"]


@dataclass
class Progress:
    """A progress event: the phase, and step/total within it when it has steps."""

    phase: Phase
    step: int = 0
    total: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class SealResult:
    """What a finished job produced: the report's summary and the artifact files in out_dir."""

    summary: dict
    artifacts: list[Path]


def seal(
    model_path: Path,
    spec: JobSpec,
    out_dir: Path,
    *,
    device: str = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    state_dir: Path | None = None,
    on_state_saved: Callable[[Path], None] | None = None,
    checkpoint_every: int = 50,
    job_id: str | None = None,
) -> SealResult:
    """Seal `model_path` as `spec` says and write every artifact into `out_dir`.

    Artifacts: `sanitized.zip` or `sanitized.safetensors` (the input's format and dtype),
    `report.json`, `report.html`, `samples.png`, `curves.csv`. `state_dir` holds the
    resumable state: when it already contains a saved state the job resumes from it, and
    every `checkpoint_every` steps a new one is written there and `on_state_saved(state_dir)`
    is called so the caller can copy it to durable storage. `should_cancel` is polled
    between engine steps and raises `JobCancelled` when it returns True. Input problems
    raise `InputError` before any training.
    """
    raise NotImplementedError("TODO: wire the engine, evaluation and checkpoint I/O")
