"""Startup: the API refuses a database behind the latest migration; /readyz reports each part."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.main import create_app
from core import db
from tests.conftest import make_settings
from tests.servers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_unmigrated_database_refused(tmp_path):
    settings = make_settings(tmp_path / "data")

    with pytest.raises(db.SchemaOutOfDate, match="sealer migrate"):
        with TestClient(create_app(settings)):
            pass


def test_unknown_revision_refused(tmp_path):
    settings = make_settings(tmp_path / "data")
    db.upgrade(settings.resolved_database_url)
    engine = db.make_engine(settings.resolved_database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()

    with pytest.raises(db.SchemaOutOfDate, match="ffff"):
        with TestClient(create_app(settings)):
            pass


def test_uvicorn_exits_on_unmigrated_database(tmp_path):
    env = {**os.environ, "SEALER_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(free_port())]

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "sealer migrate" in result.stderr


def test_readyz_reports_broker_down(api_factory, tmp_path):
    settings = make_settings(tmp_path / "data", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    db.upgrade(settings.resolved_database_url)
    client = api_factory(settings)

    response = client.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["store"] == "ok"
    assert checks["broker"].startswith("failed")
