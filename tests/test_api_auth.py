"""API keys: required on every route but health, stored hashed, revocable."""

import pytest
from sqlalchemy import select

from core import db
from core.jobs import ApiKey, hash_api_key, revoke_api_key
from tests.conftest import auth, new_api_key


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/x"), ("POST", "/uploads"), ("DELETE", "/jobs/x")],
)
def test_routes_need_key(api, method, path):
    response = api.request(method, path)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert "sealer keys create" in error["message"]


def test_wrong_key_rejected(api, embedded_settings):
    new_api_key(embedded_settings, "alice")

    response = api.get("/jobs", headers=auth("slr_not-a-real-key"))

    assert response.status_code == 401


def test_key_stored_hashed(api, embedded_settings):
    key = new_api_key(embedded_settings, "alice")

    engine = db.make_engine(embedded_settings.resolved_database_url)
    with db.session_scope(engine) as session:
        record = session.scalar(select(ApiKey).where(ApiKey.name == "alice"))
        assert record.key_hash == hash_api_key(key)
        assert key not in (record.key_hash, record.prefix, record.name)
    engine.dispose()
    assert api.get("/jobs", headers=auth(key)).status_code == 200


def test_revoked_key_rejected(api, embedded_settings):
    key = new_api_key(embedded_settings, "alice")
    engine = db.make_engine(embedded_settings.resolved_database_url)
    with db.session_scope(engine) as session:
        revoke_api_key(session, "alice")
    engine.dispose()

    response = api.get("/jobs", headers=auth(key))

    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_health_needs_no_key(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
