"""The lease heartbeat: a thread that renews a running job's lease until the job ends."""

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from core.jobs import renew_lease

logger = logging.getLogger(__name__)


class LeaseHeartbeat:
    """Renew `job_id`'s lease every `interval_s` seconds from a daemon thread.

    `lost` is set when the lease is gone. Either the row no longer names this worker
    (the reaper gave the job to another one), or renewals failed for longer than the lease
    TTL, so another worker may rightly take the job. The job must then stop without
    writing anything more.
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker_id: str, *, interval_s: float, lease_ttl_s: float):
        self.sessions = sessions
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.lease_ttl_s = lease_ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)
        self._last_renewed = time.monotonic()

    def start(self) -> "LeaseHeartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 30)

    def _run(self) -> None:
        extra = {"job_id": self.job_id}
        failures = 0
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions.begin() as session:
                    renewed = renew_lease(session, self.job_id, self.worker_id)
            except Exception as error:  # A database blip: retry until the lease would expire.
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("lease renewal failed (%d in a row): %s", failures, error, extra=extra)
                if time.monotonic() - self._last_renewed > self.lease_ttl_s:
                    logger.error("lease not renewed for %.0f s; stopping the job", self.lease_ttl_s, extra=extra)
                    self.lost.set()
                    return
                continue

            if failures:
                logger.info("lease renewal works again after %d failures", failures, extra=extra)
                failures = 0
            if not renewed:
                logger.warning("lease lost: another worker took the job or it ended; stopping", extra=extra)
                self.lost.set()
                return
            self._last_renewed = time.monotonic()
