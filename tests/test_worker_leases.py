"""Lease claim, renewal, finish and the reaper, on SQLite and PostgreSQL."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from core import db
from core.jobs import (
    ClaimOutcome,
    Job,
    JobState,
    claim_job,
    create_api_key,
    finish_job,
    reap_expired,
    renew_lease,
    request_cancel,
    update_progress,
)

TTL = 30


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'leases.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def add_job(engine) -> str:
    with db.session_scope(engine) as session:
        key, _ = create_api_key(session, f"key-{db.utcnow().timestamp()}")
        job = Job(
            api_key_id=key.id,
            spec={"triggers": [{"text": "x"}]},
            input_key="jobs/x/input/model.safetensors",
            input_filename="model.safetensors",
            input_size=1,
        )
        session.add(job)
        session.flush()
        return job.id


def claim(engine, job_id: str, worker: str, max_attempts: int = 3):
    with db.session_scope(engine) as session:
        return claim_job(session, job_id, worker, lease_ttl_s=TTL, max_attempts=max_attempts)


def expire_lease(engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=db.utcnow() - timedelta(seconds=TTL + 5)))


def reap(engine, max_attempts: int = 3):
    with db.session_scope(engine) as session:
        return reap_expired(session, lease_ttl_s=TTL, max_attempts=max_attempts)


def load(engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return session.get(Job, job_id)


def test_claim_once(database):
    job_id = add_job(database)

    first = claim(database, job_id, "a")
    second = claim(database, job_id, "b")

    assert first.outcome == ClaimOutcome.CLAIMED
    assert first.job.attempts == 1
    assert first.job.started_at is not None
    assert second.outcome == ClaimOutcome.LEASE_HELD
    assert second.holder == "a"
    assert load(database, job_id).lease_owner == "a"


def test_concurrent_claims_one_winner(database):
    job_id = add_job(database)
    outcomes = []
    barrier = threading.Barrier(6)

    def contend(name: str) -> None:
        barrier.wait()
        outcomes.append(claim(database, job_id, name).outcome)

    threads = [threading.Thread(target=contend, args=(f"w{index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.LEASE_HELD) == 5
    assert load(database, job_id).attempts == 1


def test_claim_missing_and_finished(database):
    job_id = add_job(database)
    claim(database, job_id, "a")
    with db.session_scope(database) as session:
        assert finish_job(session, job_id, "a", JobState.SUCCEEDED, summary={"removal_rate": 1.0})

    assert claim(database, "0" * 32, "a").outcome == ClaimOutcome.NOT_FOUND
    assert claim(database, job_id, "b").outcome == ClaimOutcome.FINISHED
    assert load(database, job_id).summary == {"removal_rate": 1.0}


def test_only_owner_writes(database):
    job_id = add_job(database)
    claim(database, job_id, "a")

    with db.session_scope(database) as session:
        assert renew_lease(session, job_id, "a")
        assert not renew_lease(session, job_id, "b")
        assert not update_progress(session, job_id, "b", phase="unlearning", step=3, total=10)
        assert update_progress(session, job_id, "a", phase="unlearning", step=4, total=10)
        assert not finish_job(session, job_id, "b", JobState.FAILED, error_code="x")

    job = load(database, job_id)
    assert (job.phase, job.step, job.total, job.state) == ("unlearning", 4, 10, "running")


def test_expired_lease_requeued_then_reclaimed(database):
    job_id = add_job(database)
    claim(database, job_id, "a")
    expire_lease(database, job_id)

    result = reap(database)
    again = claim(database, job_id, "b")

    assert result.requeued == [job_id]
    assert again.outcome == ClaimOutcome.CLAIMED
    assert again.job.attempts == 2
    with db.session_scope(database) as session:
        assert not renew_lease(session, job_id, "a")


def test_fresh_lease_not_reaped(database):
    job_id = add_job(database)
    claim(database, job_id, "a")

    result = reap(database)

    assert result.requeued == []
    assert load(database, job_id).state == "running"


def test_expired_lease_claimed_by_redelivery(database):
    job_id = add_job(database)
    claim(database, job_id, "a")
    expire_lease(database, job_id)

    stolen = claim(database, job_id, "b")

    assert stolen.outcome == ClaimOutcome.CLAIMED
    assert stolen.job.lease_owner == "b"


def test_attempts_exhausted_fail_worker_lost(database):
    job_id = add_job(database)
    for worker in ("a", "b"):
        assert claim(database, job_id, worker, max_attempts=2).outcome == ClaimOutcome.CLAIMED
        expire_lease(database, job_id)
        reap(database, max_attempts=2)

    job = load(database, job_id)
    assert job.state == "failed"
    assert job.error_code == "worker_lost"
    assert "2 times" in job.error_message
    assert job.finished_at is not None


def test_cancelled_job_with_dead_worker(database):
    job_id = add_job(database)
    claim(database, job_id, "a")
    with db.session_scope(database) as session:
        request_cancel(session, session.get(Job, job_id))
    expire_lease(database, job_id)

    result = reap(database)

    assert result.cancelled == [job_id]
    assert load(database, job_id).state == "cancelled"


def test_two_reapers_requeue_once(database):
    job_id = add_job(database)
    claim(database, job_id, "a")
    expire_lease(database, job_id)

    first = reap(database)
    second = reap(database)

    assert first.requeued == [job_id]
    assert second.requeued == []


def test_cancel_queued_blocks_claim(database):
    job_id = add_job(database)
    with db.session_scope(database) as session:
        request_cancel(session, session.get(Job, job_id))

    assert claim(database, job_id, "a").outcome == ClaimOutcome.FINISHED
    assert load(database, job_id).state == "cancelled"


def test_stale_queued_job_resent_once(database):
    job_id = add_job(database)
    with db.session_scope(database) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=db.utcnow() - timedelta(seconds=120)))

    first = reap_stale(database)
    second = reap_stale(database)

    assert first.resent == [job_id]
    assert second.resent == []
    assert load(database, job_id).state == "queued"


def test_recent_queued_job_not_resent(database):
    add_job(database)

    assert reap_stale(database).resent == []


def reap_stale(engine):
    with db.session_scope(engine) as session:
        return reap_expired(session, lease_ttl_s=TTL, max_attempts=3, resend_queued_after_s=60)
