"""Collect one job's log lines into `log.txt`, the job id on each line."""

import logging
import threading
from pathlib import Path

from core.logging_setup import JOB_ID_FIELD


class JobLogHandler(logging.FileHandler):
    """Write the records that belong to one job: those tagged with its id, or logged by its thread.

    The engine tags its own lines with the job id; library lines (diffusers, the unlearner)
    come from the thread that runs the job and are tagged here.
    """

    def __init__(self, path: Path, job_id: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, encoding="utf-8")
        self.job_id = job_id
        self.thread_id = threading.get_ident()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [job=%(job_tag)s]: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        tagged = getattr(record, JOB_ID_FIELD, None)
        if tagged is not None and tagged != self.job_id:
            return False
        if tagged is None and record.thread != self.thread_id:
            return False
        record.job_tag = self.job_id
        return super().filter(record)


class capture_job_log:
    """Attach a JobLogHandler to the root logger for the duration of a `with` block."""

    def __init__(self, path: Path, job_id: str):
        self.handler = JobLogHandler(path, job_id)

    def __enter__(self) -> JobLogHandler:
        root = logging.getLogger()
        root.addHandler(self.handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self.handler

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
