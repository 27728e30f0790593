import io
import json
import logging
import threading

import pytest

from core.logging_setup import configure_logging, job_context, job_logger, parse_log_level
from core.settings import Settings


@pytest.fixture
def restore_logging():
    """Put back the root logger and the taken-over loggers after a test reconfigures them."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved_others = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in ("uvicorn", "uvicorn.access", "celery")
    }
    yield
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, (handlers, propagate) in saved_others.items():
        other = logging.getLogger(name)
        other.handlers[:] = handlers
        other.propagate = propagate


def configure(**settings) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(**settings), stream=stream)
    return stream


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_line_fields(restore_logging):
    stream = configure(log_format="json")
    logging.getLogger("sealer.test").info("claimed %s", "job")

    lines = lines_of(stream)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "INFO"
    assert entry["logger"] == "sealer.test"
    assert entry["message"] == "claimed job"
    assert entry["timestamp"].endswith("+00:00")
    assert "job_id" not in entry


def test_json_job_id_from_extra(restore_logging):
    stream = configure(log_format="json")
    logging.getLogger("sealer.test").warning("slow step", extra={"job_id": "abc123"})

    entry = json.loads(lines_of(stream)[0])
    assert entry["job_id"] == "abc123"
    assert entry["level"] == "WARNING"


def test_json_job_logger_adapter(restore_logging):
    stream = configure(log_format="json")
    log = job_logger(logging.getLogger("sealer.test"), "job-7")
    log.info("phase %s", "unlearning")
    log.info("overridden", extra={"job_id": "job-8"})

    first, second = (json.loads(line) for line in lines_of(stream))
    assert first["job_id"] == "job-7"
    assert first["message"] == "phase unlearning"
    assert second["job_id"] == "job-8"


def test_job_context_tags_library_lines(restore_logging):
    stream = configure(log_format="json")
    engine_logger = logging.getLogger("core.engine.unlearner")
    with job_context("job-9"):
        engine_logger.warning("trigger fits 3 of 4 prompts")
        engine_logger.info("own id wins", extra={"job_id": "job-10"})
        with job_context(None):
            engine_logger.info("nested block without a job")

        # Another thread has its own context, so its lines do not get this job's id.
        other = threading.Thread(target=lambda: engine_logger.info("other thread"))
        other.start()
        other.join()
    engine_logger.info("after the block")

    entries = [json.loads(line) for line in lines_of(stream)]
    assert [entry.get("job_id") for entry in entries] == ["job-9", "job-10", None, None, None]
    assert entries[0]["logger"] == "core.engine.unlearner"


def test_json_exception_one_line(restore_logging):
    stream = configure(log_format="json")
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError:
        logging.getLogger("sealer.test").exception("upload failed", extra={"job_id": "j1"})

    lines = lines_of(stream)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR"
    assert "RuntimeError: first line\nsecond line" in entry["exception"]
    assert entry["job_id"] == "j1"


def test_text_format_with_job(restore_logging):
    stream = configure(log_format="text")
    logger = logging.getLogger("sealer.test")
    job_logger(logger, "j42").info("running")
    logger.info("idle")

    with_job, without_job = lines_of(stream)
    assert with_job.endswith("INFO sealer.test [job=j42]: running")
    assert without_job.endswith("INFO sealer.test: idle")
    assert not with_job.startswith("{")


def test_level_filters(restore_logging):
    stream = configure(log_format="text", log_level="warning")
    logger = logging.getLogger("sealer.test")
    logger.info("hidden")
    logger.warning("shown")

    lines = lines_of(stream)
    assert len(lines) == 1
    assert lines[0].endswith("shown")


def test_reconfigure_replaces_handler(restore_logging):
    first = configure(log_format="text")
    second = configure(log_format="json")
    logging.getLogger("sealer.test").info("once")

    assert first.getvalue() == ""
    assert len(lines_of(second)) == 1


def test_uvicorn_access_taken_over(restore_logging):
    access = logging.getLogger("uvicorn.access")
    access.propagate = False
    access.addHandler(logging.StreamHandler(io.StringIO()))

    stream = configure(log_format="json")
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/healthz", "1.1", 200)

    assert access.handlers == []
    entry = json.loads(lines_of(stream)[0])
    assert entry["logger"] == "uvicorn.access"
    assert entry["message"] == '127.0.0.1:5000 - "GET /healthz HTTP/1.1" 200'


def test_parse_log_level_names():
    assert parse_log_level("debug") == logging.DEBUG
    assert parse_log_level(" INFO ") == logging.INFO
    assert parse_log_level("15") == 15


def test_parse_log_level_invalid():
    with pytest.raises(ValueError, match="SEALER_LOG_LEVEL 'loud'"):
        parse_log_level("loud")
