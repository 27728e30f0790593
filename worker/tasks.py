"""The Celery task `sealer.run_job`: its only argument is the job id."""

from core.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.context import get_context
from worker.runner import JobRunner


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one delivery of a job; the database lease decides whether it actually runs."""
    return JobRunner(get_context(), job_id).run()
