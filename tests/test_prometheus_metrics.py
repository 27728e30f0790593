import logging
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import database_job_counts, install_metrics
from core import metrics

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_job_counts_reader():
    metrics.register_job_counts(None)
    yield
    metrics.register_job_counts(None)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request_count(route: str, status: str, method: str = "GET") -> float:
    return sample("sealer_http_request_duration_seconds_count", method=method, route=route, status=status)


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """Return {sample name: {sorted label items: value}} from GET /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for item in family.samples:
            samples.setdefault(item.name, {})[tuple(sorted(item.labels.items()))] = item.value
    return samples


def make_app(job_counts=None) -> FastAPI:
    app = FastAPI()

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return {"id": job_id}

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("handler failed")

    install_metrics(app, job_counts=job_counts)
    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_latency_by_route_template():
    client = TestClient(make_app())
    before = request_count("/jobs/{job_id}", "200")

    client.get("/jobs/abc")
    client.get("/jobs/def")

    assert request_count("/jobs/{job_id}", "200") == before + 2
    assert sample("sealer_http_request_duration_seconds_count", method="GET", route="/jobs/abc", status="200") == 0


def test_latency_unmatched_route():
    client = TestClient(make_app())
    before = request_count(metrics.UNMATCHED_ROUTE, "404")

    response = client.get("/no/such/path")

    assert response.status_code == 404
    assert request_count(metrics.UNMATCHED_ROUTE, "404") == before + 1


def test_latency_handler_error_is_500():
    client = TestClient(make_app(), raise_server_exceptions=False)
    before = request_count("/boom", "500")

    response = client.get("/boom")

    assert response.status_code == 500
    assert request_count("/boom", "500") == before + 1


def test_metrics_endpoint_text_format():
    client = TestClient(make_app())
    client.get("/jobs/x")

    samples = scrape(client)

    key = (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "200"))
    assert samples["sealer_http_request_duration_seconds_count"][key] >= 1
    assert "sealer_upload_bytes_total" in samples
    assert "/metrics" not in make_app().openapi()["paths"]


def test_job_counts_on_scrape():
    calls = []

    def read_counts():
        calls.append(1)
        return {"queued": 3, "running": 1}

    client = TestClient(make_app(job_counts=read_counts))
    samples = scrape(client)

    assert samples["sealer_queue_depth"][()] == 3
    assert samples["sealer_jobs"][(("state", "running"),)] == 1
    assert samples["sealer_jobs"][(("state", "succeeded"),)] == 0
    assert samples["sealer_job_counts_up"][()] == 1

    scrape(client)
    assert len(calls) == 2


def test_job_counts_failure_keeps_scrape(caplog):
    def read_counts():
        raise ConnectionError("database unreachable")

    client = TestClient(make_app(job_counts=read_counts))
    with caplog.at_level(logging.WARNING, logger="core.metrics"):
        first = scrape(client)
        scrape(client)

    assert first["sealer_job_counts_up"][()] == 0
    assert "sealer_queue_depth" not in first
    assert "sealer_http_request_duration_seconds_count" in first
    warnings = [record for record in caplog.records if "job counts" in record.getMessage()]
    assert len(warnings) == 1
    assert "database unreachable" in warnings[0].getMessage()


def test_no_job_counts_without_reader():
    samples = scrape(TestClient(make_app()))

    assert "sealer_queue_depth" not in samples
    assert "sealer_job_counts_up" not in samples


def test_database_job_counts(tmp_path):
    from core.db import Base, make_engine, session_scope
    from core.jobs import Job, create_api_key

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    with session_scope(engine) as session:
        key, _plaintext = create_api_key(session, "metrics-test")
        session.flush()
        for state in ("queued", "queued", "running", "failed"):
            job = Job(
                api_key_id=key.id,
                state=state,
                spec={},
                input_key="uploads/model.safetensors",
                input_filename="model.safetensors",
                input_size=1,
            )
            session.add(job)

    counts = database_job_counts(engine)()

    assert counts == {"queued": 2, "running": 1, "failed": 1}


def test_job_states_match_records():
    from core.jobs import JobState

    assert metrics.JOB_STATES == tuple(state.value for state in JobState)


def test_state_change_hook_counts():
    from core.jobs import record_state_change

    before = sample("sealer_job_state_changes_total", state="succeeded")
    record_state_change("succeeded")
    metrics.record_job_state("succeeded")

    assert sample("sealer_job_state_changes_total", state="succeeded") == before + 2


def test_job_and_phase_histograms():
    before_job = sample("sealer_job_duration_seconds_count", outcome="failed")
    before_phase = sample("sealer_job_phase_duration_seconds_bucket", phase="unlearning", le="60.0")

    metrics.observe_job_duration("failed", 90.0)
    metrics.observe_phase_duration("unlearning", 42.0)

    assert sample("sealer_job_duration_seconds_count", outcome="failed") == before_job + 1
    assert sample("sealer_job_phase_duration_seconds_bucket", phase="unlearning", le="60.0") == before_phase + 1


def test_upload_bytes_counter():
    before = sample("sealer_upload_bytes_total")
    metrics.count_upload_bytes(4096)
    assert sample("sealer_upload_bytes_total") == before + 4096


def test_worker_server_serves_metrics():
    port = free_port()
    server = metrics.start_worker_metrics_server(port, addr="127.0.0.1")
    try:
        metrics.record_job_state("running")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    assert 'sealer_job_state_changes_total{state="running"}' in body


def test_worker_server_port_zero_disabled():
    assert metrics.start_worker_metrics_server(0) is None


def test_worker_server_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match="SEALER_WORKER_METRICS_PORT"):
            metrics.start_worker_metrics_server(port, addr="127.0.0.1")


def test_multiprocess_values_add_up(tmp_path):
    env = {**os.environ, metrics.MULTIPROC_DIR_VARIABLE: str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    record = "from core import metrics; metrics.count_upload_bytes(100); metrics.record_job_state('queued')"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", record], env=env, check=True, timeout=60)

    render = textwrap.dedent(
        """
        from core import metrics
        body, _content_type = metrics.render_metrics()
        print(body.decode())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", render], env=env, check=True, timeout=60, capture_output=True, text=True
    )

    assert "sealer_upload_bytes_total 200.0" in result.stdout
    assert 'sealer_job_state_changes_total{state="queued"} 2.0' in result.stdout
