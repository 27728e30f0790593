"""Requests generated from the app's own OpenAPI schema by schemathesis: the API returns no 5xx.

Schemathesis builds valid and invalid requests (positive and negative generation modes)
for every operation and sends them to uvicorn on a loopback port with a valid API key.
Every response status must be below 500, and every 4xx must use the error shape
`{"error": {"code", "message", "field"}}`. The number of examples per operation is
bounded, so the test finishes in about a minute on 2 cores.
"""

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation.modes import GenerationMode

from core import db
from tests.conftest import make_settings, new_api_key
from tests.servers import ServiceProcess, start_api

pytestmark = pytest.mark.services

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 20
STATUS_COUNTS: Counter[int] = Counter()


@pytest.fixture(scope="module", params=["embedded", "production"])
def api_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, str]]:
    """uvicorn on SQLite and a local store, then on PostgreSQL, Redis and S3 (NUL bytes broke only PostgreSQL)."""
    folder = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    values = {"max_upload_bytes": 1024**2}
    if request.param == "production":
        postgres, redis, s3 = (request.getfixturevalue(name) for name in ("postgres_server", "redis_server", "s3_server"))
        values.update(
            database_url=postgres.create_database(),
            broker_url=redis.url(4),
            storage="s3",
            s3_endpoint_url=s3.endpoint_url,
            s3_bucket=s3.create_bucket(),
            s3_access_key_id=s3.access_key_id,
            s3_secret_access_key=s3.secret_access_key,
        )
    api_settings = make_settings(folder / "data", **values)
    db.upgrade(api_settings.resolved_database_url)
    key = new_api_key(api_settings, "fuzzer")
    process = start_api(api_settings, folder / "logs")
    STATUS_COUNTS.clear()
    yield process, key
    logger.info(
        "schemathesis sent %d requests to the %s stack; responses by status: %s",
        STATUS_COUNTS.total(),
        request.param,
        dict(sorted(STATUS_COUNTS.items())),
    )
    _log_server_errors(process.log_path)
    process.kill_group()


def _log_server_errors(log_path: Path) -> None:
    tracebacks = log_path.read_text(errors="replace").count("Traceback")
    if tracebacks:
        logger.warning("the API logged %d tracebacks; see %s", tracebacks, log_path)


def _load_schema():
    # The schema comes from the app object itself; building the app connects to nothing.
    # NOTE: schemathesis.pytest.from_fixture (4.32.5) fails under pytest 9.2 with
    # "'Function' object has no attribute '_nodeid'", so the schema is loaded at import.
    from api.main import create_app

    loaded = schemathesis.openapi.from_dict(create_app().openapi())
    # The key is sent with every request, so that requests reach the handlers behind authentication.
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], with_security_parameters=False
    )
    return loaded


schema = _load_schema()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors(case, api_server) -> None:
    process, key = api_server
    response = case.call(base_url=process.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    STATUS_COUNTS[response.status_code] += 1

    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "field"}, error
        assert error["message"], error
