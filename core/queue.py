"""The Celery app object, configured from settings; the API sends tasks by name.

The API never imports the worker's task code: it sends `sealer.run_job` with the job id
only, and the worker (`worker.celery_app`) registers that name. This module must not
import torch.
"""

import logging

from celery import Celery

from core.settings import Settings

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "sealer.run_job"
QUEUE_NAME = "sealer"


def broker_transport_options(settings: Settings) -> dict:
    """Transport options for the configured broker.

    Redis redelivers an unacknowledged message after `visibility_timeout`; kombu then
    restores it only when its periodic scan runs, which with defaults (interval 10 s,
    throttle 10) added about 100 s, so the scan runs every second here. The SQLAlchemy
    transport passes its options to `create_engine`, which rejects unknown keywords, so
    it gets none.
    """
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        return {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    return {}


def make_celery(settings: Settings) -> Celery:
    """Create a Celery app for `settings` (the same configuration in the API and the worker)."""
    app = Celery("sealer", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE_NAME,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # Safety net only: the worker enforces settings.job_time_limit_s itself between
        # engine steps, so the job ends with a clear error instead of a killed process.
        task_soft_time_limit=settings.job_time_limit_s + 300,
        task_time_limit=settings.job_time_limit_s + 600,
    )
    return app


def send_job(app: Celery, job_id: str) -> None:
    """Queue one run of `job_id`; the worker's lease logic drops duplicate deliveries."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE_NAME)


def check_broker(app: Celery, timeout_s: float = 3.0) -> None:
    """Raise when the broker cannot be reached within `timeout_s` seconds."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
