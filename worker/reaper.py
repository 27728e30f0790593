"""The reaper: a periodic thread in every worker that re-queues jobs whose worker died."""

import logging
import threading

from celery import Celery

from core.jobs import reap_expired
from core.queue import make_celery, send_job
from worker.context import WorkerContext

logger = logging.getLogger(__name__)


def reap_once(context: WorkerContext, celery: Celery) -> list[str]:
    """Handle expired leases and stale queued jobs once; return the ids re-queued after a lost lease."""
    settings = context.settings
    with context.sessions.begin() as session:
        result = reap_expired(
            session,
            lease_ttl_s=settings.lease_ttl_s,
            max_attempts=settings.max_attempts,
            resend_queued_after_s=settings.broker_visibility_timeout_s,
        )

    for job_id in result.failed:
        logger.error("job failed after %d attempts: its worker stopped responding each time", settings.max_attempts, extra={"job_id": job_id})
    for job_id in result.cancelled:
        logger.info("job cancelled: its worker stopped responding after the cancel request", extra={"job_id": job_id})
    for job_id in result.requeued:
        # The row is committed as queued first, so the delivery that follows finds it claimable.
        try:
            send_job(celery, job_id)
            logger.warning("job re-queued: its worker's lease expired", extra={"job_id": job_id})
        except Exception as error:
            logger.error("could not re-queue job: %s; a later delivery or restart will pick it up", error, extra={"job_id": job_id})
    for job_id in result.resent:
        try:
            send_job(celery, job_id)
            logger.warning(
                "job re-sent: queued for over %d s without a worker taking it", settings.broker_visibility_timeout_s, extra={"job_id": job_id}
            )
        except Exception as error:
            logger.error("could not re-send job: %s; the next reaper pass tries again", error, extra={"job_id": job_id})
    return result.requeued


class Reaper:
    """Run `reap_once` every `interval_s` seconds from a daemon thread."""

    def __init__(self, context: WorkerContext, interval_s: float):
        self.context = context
        self.interval_s = interval_s
        # A Celery app of its own, so the thread never shares the task's broker connections.
        self.celery = make_celery(context.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._failures = 0

    def start(self) -> "Reaper":
        self._thread.start()
        logger.info("reaper started: every %.1f s, lease TTL %d s", self.interval_s, self.context.settings.lease_ttl_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reap_once(self.context, self.celery)
                if self._failures:
                    logger.info("reaper works again after %d failures", self._failures)
                self._failures = 0
            except Exception as error:  # The database may be briefly unreachable; try again later.
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    logger.warning("reaper pass failed (%d in a row): %s", self._failures, error)
