"""Faults injected while jobs run: killed and frozen workers, restarted servers, a store outage.

The `services` tests run short versions of the scenarios in reliability.scenarios on real
Redis (AOF on), PostgreSQL and S3 servers, with real API and Celery worker processes that
run the fake engine. `make reliability` runs the long versions (30 s outages, a kill in
every phase) and the load scripts. The other tests check the retry and cleanup helpers
that the scenarios rely on.
"""

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import StoreUnavailable
from core.scratch import remove_orphans, scratch_name
from core.storage import is_transient_error
from reliability import scenarios
from reliability.stack import Servers
from worker import retry


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    started = Servers.start(tmp_path_factory.mktemp("fault-servers"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.services
def test_kill_in_uploading_resumes(servers, root):
    result = scenarios.kill_worker_in_phase(servers, root, "uploading", pause_s=1.0)

    assert result.details["artifacts_visible_at_kill"]
    assert result.details["resumed_from"] == 20
    assert result.lost == 0
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_kill_in_unlearning_resumes(servers, root):
    result = scenarios.kill_worker_in_phase(servers, root, "unlearning", pause_s=0.5)

    assert result.details["resumed_from"] >= 5
    assert result.lost == 0
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_redis_restart_keeps_jobs(servers, root):
    result = scenarios.restart_redis(servers, root, down_s=1.0, jobs=3, steps=20)

    assert result.jobs == 3
    assert result.lost == 0
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_s3_outage_retried(servers, root):
    result = scenarios.s3_outage(servers, root, during="artifacts", outage_s=4, retry_window_s=30, s3_max_attempts=1)

    assert result.details["retries_logged"] > 0
    assert result.lost == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_s3_outage_state_retried(servers, root):
    result = scenarios.s3_outage(servers, root, during="state", outage_s=4, retry_window_s=30, s3_max_attempts=1)

    assert result.details["retries_logged"] > 0
    assert result.lost == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_long_s3_outage_fails_job(servers, root):
    result = scenarios.s3_outage(servers, root, during="state", outage_s=8, retry_window_s=3, s3_max_attempts=1)

    assert "object store" in result.details["error_message"]
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_postgres_restart_keeps_jobs(servers, root):
    result = scenarios.restart_postgres(servers, root, down_s=1.0, steps=20)

    assert result.jobs == 2
    assert result.lost == 0
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_api_kill_during_upload(servers, root):
    result = scenarios.kill_api_during_upload(servers, root, size_mb=32, upload_s=6.0)

    assert result.details["spooled_bytes_at_kill"] > 0
    assert result.details["retry_status"] == 201
    assert result.details["replay_status"] == 201
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_duplicate_deliveries_run_once(servers, root):
    result = scenarios.duplicate_deliveries(servers, root, extra_messages=2, steps=20)

    assert result.details["processes_that_ran_steps"] == 1
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_frozen_worker_yields_job(servers, root):
    result = scenarios.frozen_worker(servers, root, steps=30)

    assert len(result.details["steps_after_thaw"]) <= 1
    assert result.run_twice == 0
    assert result.problems == [], "\n".join(result.problems)


@pytest.mark.services
def test_time_limit_frees_worker(servers, root):
    result = scenarios.time_limit(servers, root, limit_s=2)

    assert result.jobs == 2
    assert result.problems == [], "\n".join(result.problems)


def test_orphans_removed_by_owner_state(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    own = tmp_path / scratch_name("job")
    dead = tmp_path / own.name.replace(f"_{os.getpid()}_", f"_{dead_pid}_")
    alive = tmp_path / own.name.replace(f"_{os.getpid()}_", f"_{os.getppid()}_")
    foreign = tmp_path / f"job_otherhost_{dead_pid}_0123abcd"
    unrelated = tmp_path / "api-spool"
    for folder in (own, dead, alive, foreign, unrelated):
        folder.mkdir()
    spool = tmp_path / scratch_name("upload")
    spool.write_bytes(b"partial")

    removed = remove_orphans(tmp_path)

    assert sorted(removed) == sorted([own, dead, spool])
    assert alive.is_dir()
    assert foreign.is_dir()
    assert unrelated.is_dir()


def test_transient_store_errors():
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient_error(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient_error(client_error(503, "ServiceUnavailable"))
    assert is_transient_error(client_error(400, "SlowDown"))
    assert not is_transient_error(client_error(404, "NoSuchKey"))
    assert not is_transient_error(client_error(403, "AccessDenied"))
    assert not is_transient_error(ValueError("bad key"))


def test_store_retries_until_success(monkeypatch):
    waits = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    failures = iter([ConnectionError("refused"), ConnectionError("refused")])

    def operation() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "stored"

    result = retry.call_store(operation, what="saving", window_s=60, log=logging.getLogger("test"))

    assert result == "stored"
    assert len(waits) == 2
    assert waits[1] > waits[0]


def test_store_outage_past_window():
    def operation() -> None:
        raise ConnectionError("refused")

    with pytest.raises(StoreUnavailable) as raised:
        retry.call_store(operation, what="saving the engine state", window_s=0, log=logging.getLogger("test"))

    assert raised.value.code == "storage_unavailable"
    assert "saving the engine state" in raised.value.message
    assert "SEALER_STORE_RETRY_WINDOW_S" in raised.value.message


def test_store_error_not_retried():
    calls = []

    def operation() -> None:
        calls.append(1)
        raise KeyError("missing")

    with pytest.raises(KeyError):
        retry.call_store(operation, what="reading", window_s=60, log=logging.getLogger("test"))

    assert len(calls) == 1
