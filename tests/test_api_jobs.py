"""`/jobs` in embedded mode: a real SQLite database, SQLAlchemy broker and local store."""

import base64
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core import db
from core.jobs import Job, JobState, claim_job, finish_job
from core.storage import LocalStore
from tests.conftest import MINIMAL_SPEC, auth, make_settings, new_api_key


@pytest.fixture
def alice(embedded_settings) -> str:
    return new_api_key(embedded_settings, "alice")


@pytest.fixture
def bob(embedded_settings) -> str:
    return new_api_key(embedded_settings, "bob")


def submit(api, key: str, path: Path, spec: dict | str = MINIMAL_SPEC, headers: dict | None = None):
    spec_text = spec if isinstance(spec, str) else json.dumps(spec)
    with open(path, "rb") as stream:
        return api.post(
            "/jobs",
            headers={**auth(key), **(headers or {})},
            files={"checkpoint": (path.name, stream, "application/octet-stream")},
            data={"spec": spec_text},
        )


def stored_keys(settings) -> list[str]:
    return [item.key for item in LocalStore(settings.local_store_dir).list_prefix("")]


def job_count(settings) -> int:
    engine = db.make_engine(settings.resolved_database_url)
    with db.session_scope(engine) as session:
        count = session.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return count


def queued_messages(settings) -> list[dict]:
    path = Path(settings.resolved_broker_url.split("///", 1)[1])
    if not path.exists():
        return []
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "kombu_message" not in tables:
            return []
        rows = connection.execute("SELECT payload FROM kombu_message").fetchall()
    return [json.loads(row[0]) for row in rows]


def test_submit_multipart_queues_job(api, alice, unet_file, embedded_settings):
    response = submit(api, alice, unet_file)

    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued"
    assert job["input"]["size"] == unet_file.stat().st_size
    assert job["input"]["sha256"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert job["spec"]["triggers"][0]["text"] == "mignneko"
    assert stored_keys(embedded_settings) == [f"jobs/{job['id']}/input/unet.safetensors"]

    messages = queued_messages(embedded_settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "sealer.run_job"
    args, kwargs, _ = json.loads(base64.b64decode(messages[0]["body"]))
    assert args == [job["id"]]
    assert kwargs == {}


def test_submit_idempotent_replay(api, alice, unet_file, embedded_settings):
    first = submit(api, alice, unet_file, headers={"Idempotency-Key": "abc"})
    second = submit(api, alice, unet_file, headers={"Idempotency-Key": "abc"})
    changed = submit(
        api, alice, unet_file, spec={"triggers": [{"text": "other"}]}, headers={"Idempotency-Key": "abc"}
    )

    assert first.status_code == 201
    assert second.status_code == 201
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    assert job_count(embedded_settings) == 1
    assert len(stored_keys(embedded_settings)) == 1
    assert len(queued_messages(embedded_settings)) == 1


def test_idempotency_key_scoped_per_api_key(api, alice, bob, unet_file):
    mine = submit(api, alice, unet_file, headers={"Idempotency-Key": "same"})
    theirs = submit(api, bob, unet_file, headers={"Idempotency-Key": "same"})

    assert mine.status_code == 201
    assert theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"triggers": [{"text": "x"}], "training": {"steps": 0}}, "spec.training.steps"),
        ({"triggers": []}, "spec.triggers"),
        ({"triggers": [{"text": "x"}], "trainng": {}}, "spec.trainng"),
        ("{not json", "spec"),
    ],
)
def test_invalid_spec_leaves_nothing(api, alice, unet_file, embedded_settings, spec, field):
    response = submit(api, alice, unet_file, spec=spec)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field
    assert error["code"] == "invalid_spec"
    assert error["message"]
    assert job_count(embedded_settings) == 0
    assert stored_keys(embedded_settings) == []
    assert queued_messages(embedded_settings) == []


def test_pickle_rejected_415(api, alice, pickle_file, embedded_settings):
    response = submit(api, alice, pickle_file)

    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_format"
    assert error["field"] == "checkpoint"
    assert "safetensors" in error["message"]
    assert job_count(embedded_settings) == 0
    assert stored_keys(embedded_settings) == []


def test_garbage_checkpoint_rejected(api, alice, tmp_path, embedded_settings):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")

    response = submit(api, alice, path)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "checkpoint"
    assert job_count(embedded_settings) == 0


def test_oversize_upload_413(api_factory, tmp_path, unet_file):
    settings = make_settings(tmp_path / "small", max_upload_bytes=1024)
    db.upgrade(settings.resolved_database_url)
    key = new_api_key(settings, "alice")
    client = api_factory(settings)
    big = tmp_path / "big.safetensors"
    big.write_bytes(unet_file.read_bytes() + b"\x00" * 4096)

    response = submit(client, key, big)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "1024" in response.json()["error"]["message"]
    assert job_count(settings) == 0
    assert stored_keys(settings) == []
    spool = settings.resolved_scratch_dir / "api-spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def test_oversize_by_content_length_413(api_factory, tmp_path):
    settings = make_settings(tmp_path / "small", max_upload_bytes=1024)
    db.upgrade(settings.resolved_database_url)
    key = new_api_key(settings, "alice")
    client = api_factory(settings)

    response = client.post(
        "/jobs",
        headers={**auth(key), "Content-Type": "multipart/form-data; boundary=x"},
        content=b"x" * (3 * 1024 * 1024),
    )

    assert response.status_code == 413


def test_missing_checkpoint_422(api, alice):
    response = api.post("/jobs", headers=auth(alice), files={"spec": (None, json.dumps(MINIMAL_SPEC))})

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "checkpoint"


def test_unknown_form_field_422(api, alice, unet_file):
    with open(unet_file, "rb") as stream:
        response = api.post(
            "/jobs",
            headers=auth(alice),
            files={"model": ("unet.safetensors", stream)},
            data={"spec": json.dumps(MINIMAL_SPEC)},
        )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "model"


def test_wrong_content_type_415(api, alice):
    response = api.post("/jobs", headers={**auth(alice), "Content-Type": "text/plain"}, content=b"hello")

    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_list_jobs_paginates_and_filters(api, alice, bob, unet_file):
    ids = [submit(api, alice, unet_file).json()["id"] for _ in range(3)]
    submit(api, bob, unet_file)
    api.post(f"/jobs/{ids[0]}/cancel", headers=auth(alice))

    page = api.get("/jobs", params={"limit": 2}, headers=auth(alice)).json()
    rest = api.get("/jobs", params={"limit": 2, "offset": 2}, headers=auth(alice)).json()
    cancelled = api.get("/jobs", params={"state": "cancelled"}, headers=auth(alice)).json()
    invalid = api.get("/jobs", params={"state": "sleeping"}, headers=auth(alice))

    assert page["total"] == 3
    assert len(page["items"]) == 2
    assert {item["id"] for item in page["items"] + rest["items"]} == set(ids)
    assert [item["id"] for item in cancelled["items"]] == [ids[0]]
    assert invalid.status_code == 422
    assert invalid.json()["error"]["field"] == "state"


def test_other_key_gets_404(api, alice, bob, unet_file):
    job_id = submit(api, alice, unet_file).json()["id"]

    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("DELETE", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/artifacts"),
        ("GET", f"/jobs/{job_id}/artifacts/report.json"),
    ]:
        response = api.request(method, path, headers=auth(bob))
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"
    assert api.get(f"/jobs/{job_id}", headers=auth(alice)).json()["state"] == "queued"


def test_cancel_queued_job(api, alice, unet_file):
    job_id = submit(api, alice, unet_file).json()["id"]

    cancelled = api.post(f"/jobs/{job_id}/cancel", headers=auth(alice))
    again = api.post(f"/jobs/{job_id}/cancel", headers=auth(alice))

    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert again.status_code == 409


def _claim(settings, job_id: str, worker: str = "worker-a") -> None:
    engine = db.make_engine(settings.resolved_database_url)
    with db.session_scope(engine) as session:
        claim = claim_job(session, job_id, worker, lease_ttl_s=60, max_attempts=3)
        assert claim.outcome.value == "claimed"
    engine.dispose()


def _finish(settings, job_id: str, worker: str = "worker-a") -> None:
    engine = db.make_engine(settings.resolved_database_url)
    with db.session_scope(engine) as session:
        assert finish_job(session, job_id, worker, JobState.SUCCEEDED, summary={"asr_after": 0.0})
    engine.dispose()


def test_cancel_running_job_sets_flag(api, alice, unet_file, embedded_settings):
    job_id = submit(api, alice, unet_file).json()["id"]
    _claim(embedded_settings, job_id)

    response = api.post(f"/jobs/{job_id}/cancel", headers=auth(alice))

    assert response.status_code == 200
    assert response.json()["state"] == "running"
    assert response.json()["cancel_requested"] is True


def test_delete_running_job_409(api, alice, unet_file, embedded_settings):
    job_id = submit(api, alice, unet_file).json()["id"]
    _claim(embedded_settings, job_id)

    response = api.delete(f"/jobs/{job_id}", headers=auth(alice))

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_running"
    assert len(stored_keys(embedded_settings)) == 1


def test_delete_finished_job_removes_objects(api, alice, unet_file, embedded_settings):
    job_id = submit(api, alice, unet_file).json()["id"]
    store = LocalStore(embedded_settings.local_store_dir)
    store.put_bytes(f"jobs/{job_id}/artifacts/report.json", b"{}")
    _claim(embedded_settings, job_id)
    _finish(embedded_settings, job_id)

    response = api.delete(f"/jobs/{job_id}", headers=auth(alice))

    assert response.status_code == 204
    assert stored_keys(embedded_settings) == []
    assert api.get(f"/jobs/{job_id}", headers=auth(alice)).status_code == 404


def test_artifacts_list_and_stream(api, alice, unet_file, embedded_settings):
    job_id = submit(api, alice, unet_file).json()["id"]
    store = LocalStore(embedded_settings.local_store_dir)
    store.put_bytes(f"jobs/{job_id}/artifacts/report.json", b'{"removal_rate": 1.0}')
    store.put_bytes(f"jobs/{job_id}/artifacts/log.txt", b"line\n")

    listing = api.get(f"/jobs/{job_id}/artifacts", headers=auth(alice)).json()
    report = api.get(f"/jobs/{job_id}/artifacts/report.json", headers=auth(alice))
    missing = api.get(f"/jobs/{job_id}/artifacts/samples.png", headers=auth(alice))

    assert [item["name"] for item in listing["items"]] == ["log.txt", "report.json"]
    assert report.status_code == 200
    assert report.json() == {"removal_rate": 1.0}
    assert report.headers["content-type"].startswith("application/json")
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "raw_path",
    ["%2e%2e/%2e%2e/sealer.db", "..%2f..%2fsealer.db", "%252e%252e/x", "a/%2E%2E/b", ".hidden", "a%5c..%5cb"],
)
def test_artifact_traversal_rejected(api, alice, unet_file, embedded_settings, raw_path):
    job_id = submit(api, alice, unet_file).json()["id"]

    response = api.get(f"/jobs/{job_id}/artifacts/{raw_path}", headers=auth(alice))

    assert response.status_code in (400, 404)
    assert b"sqlite" not in response.content.lower()


def test_error_shape_for_unknown_route(api):
    response = api.get("/nothing-here")

    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message", "field"}


def test_openapi_docs_served(api):
    schema = api.get("/openapi.json").json()

    assert api.get("/docs").status_code == 200
    assert "/jobs" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/jobs"]["post"]["requestBody"]["content"]


def test_broker_down_leaves_nothing(api_factory, tmp_path, unet_file):
    from tests.servers import free_port

    settings = make_settings(tmp_path / "nobroker", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    db.upgrade(settings.resolved_database_url)
    key = new_api_key(settings, "alice")
    client = api_factory(settings)

    response = submit(client, key, unet_file)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_unavailable"
    assert job_count(settings) == 0
    assert stored_keys(settings) == []
