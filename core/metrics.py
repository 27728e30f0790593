"""Prometheus metrics of the API and the worker.

Counters and histograms are module-level objects that any code path updates. Job counts
by state and the queue depth are read from the database at scrape time through a
callback that the API registers with `register_job_counts`, so no process has to keep
them up to date.

Multi-process mode: the API runs several uvicorn processes and the Celery worker runs its
tasks in a pool child, so one process's counters are not the whole story. When
PROMETHEUS_MULTIPROC_DIR is set (the Docker images set it, and their entrypoint empties
the folder at start), prometheus-client keeps every process's values in files there and
`scrape_registry()` adds them up. prometheus-client reads the variable when it is first
imported, so it must be set before the process starts.

This module must not import torch: the API image has none.
"""

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Job states in the order of a job's life. They equal the values of core.jobs.JobState.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

# Route label of requests that matched no route, so that scans of random paths add one
# series instead of one per path.
UNMATCHED_ROUTE = "<unmatched>"

# Bucket bounds in seconds. HTTP requests include multi-GB uploads and streamed downloads.
# A job runs for minutes to hours, and a phase for seconds to hours.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
JOB_BUCKETS = (30, 60, 120, 300, 600, 1200, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600)
PHASE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600)

JOB_STATE_CHANGES = Counter(
    "sealer_job_state_changes",
    "Jobs that entered each state (a job re-queued by the reaper counts again).",
    ["state"],
)
JOB_DURATION = Histogram(
    "sealer_job_duration_seconds",
    "Time from a job's start on a worker to its end, by outcome.",
    ["outcome"],
    buckets=JOB_BUCKETS,
)
PHASE_DURATION = Histogram(
    "sealer_job_phase_duration_seconds",
    "Time a job spent in each phase (downloading, validating, evaluating_before, ...).",
    ["phase"],
    buckets=PHASE_BUCKETS,
)
UPLOAD_BYTES = Counter(
    "sealer_upload_bytes",
    "Bytes of checkpoints received by the API or completed as presigned uploads.",
)
HTTP_REQUEST_DURATION = Histogram(
    "sealer_http_request_duration_seconds",
    "HTTP request latency until the last byte of the response, by route template.",
    ["method", "route", "status"],
    buckets=HTTP_BUCKETS,
)

JobCountsReader = Callable[[], Mapping[str, int]]


class JobCountsCollector(Collector):
    """Gauges read at scrape time: jobs per state, the queue depth, and whether the read worked."""

    def __init__(self) -> None:
        self._read_counts: JobCountsReader | None = None
        self._failing = False
        self._lock = threading.Lock()

    def set_reader(self, read_counts: JobCountsReader | None) -> None:
        self._read_counts = read_counts

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        if self._read_counts is None:
            return iter(())
        counts = self._read()
        return self._families(counts)

    def _read(self) -> Mapping[str, int] | None:
        # Any failure of the reader (most often the database being unreachable) must not
        # fail the rest of the scrape, so it is caught broadly and reported as a gauge.
        try:
            counts = dict(self._read_counts())
        except Exception as error:  # noqa: BLE001
            with self._lock:
                first_failure = not self._failing
                self._failing = True
            if first_failure:
                logger.warning("reading job counts for /metrics failed: %s (repeats are not logged until a read works)", error)
            return None

        with self._lock:
            recovered = self._failing
            self._failing = False
        if recovered:
            logger.info("reading job counts for /metrics works again")
        return counts

    def _families(self, counts: Mapping[str, int] | None = None) -> Iterator[Metric]:
        up = GaugeMetricFamily("sealer_job_counts_up", "1 when the last read of job counts from the database worked.")
        jobs = GaugeMetricFamily("sealer_jobs", "Jobs in each state, read from the database.", labels=["state"])
        queue_depth = GaugeMetricFamily("sealer_queue_depth", "Jobs waiting for a worker (state queued).")

        if counts is None:
            up.add_metric([], 0)
            yield up
            return

        up.add_metric([], 1)
        states = list(JOB_STATES) + sorted(set(counts) - set(JOB_STATES))
        for state in states:
            jobs.add_metric([state], counts.get(state, 0))
        queue_depth.add_metric([], counts.get("queued", 0))
        yield up
        yield jobs
        yield queue_depth


JOB_COUNTS = JobCountsCollector()
REGISTRY.register(JOB_COUNTS)


def register_job_counts(read_counts: JobCountsReader | None) -> None:
    """Set the callback that returns `{state: number of jobs}`, or remove it with None.

    It runs on every scrape, in the thread that serves `/metrics`.
    """
    JOB_COUNTS.set_reader(read_counts)


def multiprocess_dir() -> str | None:
    """Return the folder of multi-process metric files, or None in single-process mode."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or None


def scrape_registry() -> CollectorRegistry:
    """Return the registry to expose: every process's values in multi-process mode, else this process's."""
    if multiprocess_dir() is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(JOB_COUNTS)
    return registry


def render_metrics() -> tuple[bytes, str]:
    """Return the metrics in the Prometheus text format, with their content type."""
    return generate_latest(scrape_registry()), CONTENT_TYPE_LATEST


def record_job_state(state: str) -> None:
    """Count one job entering `state`."""
    JOB_STATE_CHANGES.labels(state=state).inc()


def observe_job_duration(outcome: str, seconds: float) -> None:
    """Record a finished job's run time; `outcome` is its final state."""
    JOB_DURATION.labels(outcome=outcome).observe(seconds)


def observe_phase_duration(phase: str, seconds: float) -> None:
    """Record the time a job spent in one phase."""
    PHASE_DURATION.labels(phase=phase).observe(seconds)


def count_upload_bytes(size: int) -> None:
    """Add the size of a received checkpoint, in bytes."""
    UPLOAD_BYTES.inc(size)


def observe_http_request(method: str, route: str, status: int, seconds: float) -> None:
    """Record one HTTP request; `route` is the route template, not the raw path."""
    HTTP_REQUEST_DURATION.labels(method=method, route=route, status=str(status)).observe(seconds)


def start_worker_metrics_server(port: int, addr: str = "0.0.0.0") -> WSGIServer | None:
    """Serve the worker's metrics on `addr:port` from a daemon thread; port 0 disables it.

    Start it in the Celery main process (for example from the `worker_init` signal). With
    PROMETHEUS_MULTIPROC_DIR set it also exports what the pool children recorded. Returns
    the server, whose `shutdown()` stops it, or None when disabled.
    """
    if port == 0:
        logger.info("worker metrics exporter disabled; set SEALER_WORKER_METRICS_PORT to enable it")
        return None

    try:
        server, _thread = start_http_server(port, addr=addr, registry=scrape_registry())
    except OSError as error:
        raise OSError(
            f"cannot serve worker metrics on {addr}:{port}: {error}; set SEALER_WORKER_METRICS_PORT "
            "to a free port, or to 0 to disable the exporter"
        ) from error

    logger.info("worker metrics exporter listening on %s:%d", addr, port)
    return server
