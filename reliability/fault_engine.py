"""A Celery worker launcher for fault scenarios: tests.fake_engine's seal with slow phases and a slow store.

A fault has to land in a known phase, but the fake engine passes every phase except
unlearning in microseconds. This launcher stretches them:

- FAULT_PHASE_SECONDS, such as `validating=2,evaluating_after=2`, pauses that many
  seconds when the engine enters each named phase, after the phase reached the job row.
- FAULT_STORE_DELAY_S pauses before each input download and each artifact upload and
  move (the runner's `downloading` and `uploading` phases). Engine states are not delayed.

FAKE_ENGINE_RUN_LOG and FAKE_ENGINE_STEP_SECONDS work as in tests.fake_engine.
Run it as `python -m reliability.fault_engine -A worker.celery_app worker ...`.
"""

import os
import time
from pathlib import Path

from tests import fake_engine

PHASE_SECONDS_VARIABLE = "FAULT_PHASE_SECONDS"
STORE_DELAY_VARIABLE = "FAULT_STORE_DELAY_S"


def parse_phase_seconds(text: str) -> dict[str, float]:
    """Parse `phase=seconds,phase=seconds` into a dict; raise ValueError naming a bad item."""
    pauses: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        phase, separator, seconds = item.partition("=")
        if not separator:
            raise ValueError(f"{PHASE_SECONDS_VARIABLE} item {item!r} is not `phase=seconds`")
        pauses[phase.strip()] = float(seconds)
    return pauses


def seal(*args, on_progress=None, **kwargs):
    """Run tests.fake_engine.seal, pausing at the start of each phase named in FAULT_PHASE_SECONDS."""
    pauses = parse_phase_seconds(os.environ.get(PHASE_SECONDS_VARIABLE, ""))
    entered: set[str] = set()

    def report(progress) -> None:
        if on_progress is not None:
            on_progress(progress)
        if progress.phase not in entered:
            entered.add(progress.phase)
            time.sleep(pauses.get(progress.phase, 0.0))

    return fake_engine.seal(*args, on_progress=report, **kwargs)


class SlowStore:
    """An object store that waits `delay_s` before each whole-file download, upload and move."""

    def __init__(self, inner, delay_s: float):
        self.inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get_to_file(self, key: str, path: Path):
        time.sleep(self.delay_s)
        return self.inner.get_to_file(key, path)

    def put_file(self, key: str, path: Path):
        time.sleep(self.delay_s)
        return self.inner.put_file(key, path)

    def move(self, source: str, destination: str) -> None:
        time.sleep(self.delay_s)
        self.inner.move(source, destination)


def install() -> None:
    """Replace the engine and, when FAULT_STORE_DELAY_S is set, the worker's store, before the pool forks."""
    from core import sealing
    from worker import context

    sealing.seal = seal
    delay_s = float(os.environ.get(STORE_DELAY_VARIABLE, "0") or 0)
    if delay_s > 0:
        make_store = context.make_store
        context.make_store = lambda settings: SlowStore(make_store(settings), delay_s)


def main() -> None:
    import sys

    from celery.bin.celery import main as celery_main

    install()
    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
