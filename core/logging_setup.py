"""Process-wide logging: one line per event, as JSON or as text, with the job id when known.

`configure_logging(settings)` is called once at process start by the API, the worker and
the CLI. A job's log lines carry its id, passed either as `extra={"job_id": ...}` on one
call, bound once with `job_logger(logger, job_id)`, or set for a whole block with
`job_context(job_id)`: every record emitted inside it, also by library modules that know
nothing of jobs (the engine, the evaluation), gets the id.
"""

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, TextIO

from core.settings import Settings

JOB_ID_FIELD = "job_id"
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Loggers that uvicorn and Celery configure with handlers of their own. Their records are
# sent to the root handler instead, so every line of a process has one format.
_TAKEN_OVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")

# Marks the handler that configure_logging installed, so a second call replaces it.
_HANDLER_MARK = "_sealer_handler"

# The job that the running thread (or task) works on, set by `job_context`.
_current_job_id: ContextVar[str | None] = ContextVar("sealer_job_id", default=None)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: timestamp, level, logger, message, job_id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }

        job_id = getattr(record, JOB_ID_FIELD, None)
        if job_id is not None:
            entry[JOB_ID_FIELD] = str(job_id)

        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)

        # json.dumps escapes the newlines of messages and tracebacks, so an event stays one line.
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Format a record as `time level logger [job=ID]: message`, with any traceback on the lines after."""

    def __init__(self) -> None:
        super().__init__(fmt="%(asctime)s %(levelname)s %(name)s%(job_suffix)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, JOB_ID_FIELD, None)
        record.job_suffix = f" [job={job_id}]" if job_id is not None else ""
        return super().format(record)


class JobLoggerAdapter(logging.LoggerAdapter):
    """Logger adapter that adds one job id to every record. A call's own `extra` wins over it."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def job_logger(logger: logging.Logger, job_id: str) -> JobLoggerAdapter:
    """Return `logger` with `job_id` attached to every record it emits."""
    return JobLoggerAdapter(logger, {JOB_ID_FIELD: job_id})


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Attach `job_id` to the records emitted in this thread or task until the block ends.

    `JobContextFilter` (on the handler that `configure_logging` installs) copies it onto
    records that carry no job id of their own. `None` leaves records as they are.
    """
    token = _current_job_id.set(job_id)
    try:
        yield
    finally:
        _current_job_id.reset(token)


class JobContextFilter(logging.Filter):
    """Give a record without a job id the id of the enclosing `job_context`, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = _current_job_id.get()
        if job_id is not None and getattr(record, JOB_ID_FIELD, None) is None:
            setattr(record, JOB_ID_FIELD, job_id)
        return True


def parse_log_level(name: str) -> int:
    """Return the numeric level for a level name such as `INFO` or `debug`, or a number."""
    cleaned = name.strip().upper()
    if cleaned.isdigit():
        return int(cleaned)
    level = logging.getLevelName(cleaned)  # an int for known names, a "Level X" string otherwise
    if not isinstance(level, int):
        raise ValueError(f"invalid SEALER_LOG_LEVEL {name!r}; use one of {', '.join(LEVEL_NAMES)} or a number")
    return level


def build_formatter(log_format: str) -> logging.Formatter:
    """Return the formatter for SEALER_LOG_FORMAT: `json` or `text`."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"invalid SEALER_LOG_FORMAT {log_format!r}; use json or text")


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Send every log record of this process to one handler on `stream` (stderr by default).

    Calling it again replaces the handler it installed before. Handlers that uvicorn and
    Celery attached to their own loggers are removed and those loggers propagate to the
    root, so access logs and task logs come out in the same format.
    """
    level = parse_log_level(settings.log_level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(build_formatter(settings.log_format))
    handler.addFilter(JobContextFilter())
    setattr(handler, _HANDLER_MARK, True)

    # Replace our previous handler and plain stream handlers such as logging.basicConfig's.
    # Subclasses (pytest's capture handler, for one) stay.
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

    for name in _TAKEN_OVER_LOGGERS:
        taken_over = logging.getLogger(name)
        for old in list(taken_over.handlers):
            taken_over.removeHandler(old)
        taken_over.propagate = True
