"""Request latency middleware and the `GET /metrics` endpoint in the Prometheus text format."""

import logging
import time
from collections.abc import Mapping

from fastapi import FastAPI, Response
from sqlalchemy import Engine, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import metrics
from core.jobs import Job

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


def route_template(scope: Scope) -> str:
    """Return the template of the route that served a request (`/jobs/{job_id}`), not its path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template or metrics.UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Observe each HTTP request's latency, until its last response byte, by method, route and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        # When the app raises before it starts a response, Starlette's outermost middleware
        # sends a 500.
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            # The router writes the matched route into the same scope dict on its way in.
            elapsed = time.perf_counter() - started
            metrics.observe_http_request(scope["method"], route_template(scope), status, elapsed)


def metrics_endpoint() -> Response:
    # A plain function: FastAPI runs it in a worker thread, where the job-count callback may
    # block on the database.
    body, content_type = metrics.render_metrics()
    return Response(content=body, media_type=content_type)


def install_metrics(app: FastAPI, job_counts: metrics.JobCountsReader | None = None) -> None:
    """Add the latency middleware and `GET /metrics` to `app`. Call it before the app starts.

    `job_counts` returns `{state: number of jobs}` and runs on every scrape (see
    `database_job_counts`). The endpoint needs no API key, like `/healthz`, so block it at
    the reverse proxy when the API is reachable from the internet.
    """
    app.add_middleware(RequestMetricsMiddleware)
    app.add_api_route(METRICS_PATH, metrics_endpoint, methods=["GET"], include_in_schema=False)
    if job_counts is not None:
        metrics.register_job_counts(job_counts)


def database_job_counts(engine: Engine) -> metrics.JobCountsReader:
    """Return a callback that counts the jobs in each state with one GROUP BY query."""

    def read_counts() -> Mapping[str, int]:
        with engine.connect() as connection:
            rows = connection.execute(select(Job.state, func.count()).group_by(Job.state))
            return {state: count for state, count in rows}

    return read_counts
