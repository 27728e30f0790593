"""`/uploads`: a streamed PUT with the local store; presigned multipart parts with S3."""

import hashlib
import json

import httpx
import pytest

from core.storage import make_store
from tests.conftest import MINIMAL_SPEC, auth, new_api_key


def start_upload(api, key: str, filename: str, size: int):
    return api.post("/uploads", headers=auth(key), json={"filename": filename, "size": size})


def submit_upload(api, key: str, checkpoint_key: str, spec: dict = MINIMAL_SPEC, headers: dict | None = None):
    return api.post(
        "/jobs", headers={**auth(key), **(headers or {})}, json={"checkpoint_key": checkpoint_key, "spec": spec}
    )


def test_local_put_upload_then_job(api, embedded_settings, unet_file):
    key = new_api_key(embedded_settings, "alice")
    data = unet_file.read_bytes()

    created = start_upload(api, key, "my model.safetensors", len(data))
    upload = created.json()
    put = api.put(upload["upload_url"], headers=auth(key), content=data)
    job = submit_upload(api, key, upload["checkpoint_key"])
    reused = submit_upload(api, key, upload["checkpoint_key"])

    assert created.status_code == 201
    assert upload["method"] == "put"
    assert upload["checkpoint_key"] == f"uploads/{upload['id']}/my_model.safetensors"
    assert put.status_code == 200
    assert put.json()["state"] == "complete"
    assert put.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert job.status_code == 201, job.text
    assert job.json()["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert job.json()["input"]["filename"] == "my_model.safetensors"
    assert reused.status_code == 409
    assert api.get(f"/uploads/{upload['id']}", headers=auth(key)).json()["state"] == "consumed"


def test_upload_job_idempotent(api, embedded_settings, unet_file):
    key = new_api_key(embedded_settings, "alice")
    data = unet_file.read_bytes()
    upload = start_upload(api, key, "unet.safetensors", len(data)).json()
    api.put(upload["upload_url"], headers=auth(key), content=data)

    first = submit_upload(api, key, upload["checkpoint_key"], headers={"Idempotency-Key": "k1"})
    retry = submit_upload(api, key, upload["checkpoint_key"], headers={"Idempotency-Key": "k1"})

    assert first.status_code == 201
    assert retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"]


def test_incomplete_upload_409(api, embedded_settings):
    key = new_api_key(embedded_settings, "alice")
    upload = start_upload(api, key, "unet.safetensors", 100).json()

    response = submit_upload(api, key, upload["checkpoint_key"])

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "upload_incomplete"


def test_upload_size_mismatch_422(api, embedded_settings, unet_file):
    key = new_api_key(embedded_settings, "alice")
    data = unet_file.read_bytes()
    upload = start_upload(api, key, "unet.safetensors", len(data) + 10).json()

    response = api.put(upload["upload_url"], headers=auth(key), content=data)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "size_mismatch"
    assert make_store(embedded_settings).list_prefix("uploads/") == []


def test_upload_over_limit_413(api, embedded_settings):
    key = new_api_key(embedded_settings, "alice")

    response = start_upload(api, key, "huge.safetensors", embedded_settings.max_upload_bytes + 1)

    assert response.status_code == 413
    assert response.json()["error"]["field"] == "checkpoint"


def test_pickle_upload_rejected_at_job(api, embedded_settings, pickle_file):
    key = new_api_key(embedded_settings, "alice")
    data = pickle_file.read_bytes()
    upload = start_upload(api, key, "model.ckpt", len(data)).json()
    api.put(upload["upload_url"], headers=auth(key), content=data)

    response = submit_upload(api, key, upload["checkpoint_key"])

    assert response.status_code == 415
    assert api.get("/jobs", headers=auth(key)).json()["total"] == 0
    assert api.get(f"/uploads/{upload['id']}", headers=auth(key)).json()["state"] == "complete"


def test_upload_of_other_key_404(api, embedded_settings, unet_file):
    alice = new_api_key(embedded_settings, "alice")
    bob = new_api_key(embedded_settings, "bob")
    data = unet_file.read_bytes()
    upload = start_upload(api, alice, "unet.safetensors", len(data)).json()
    api.put(upload["upload_url"], headers=auth(alice), content=data)

    assert api.get(f"/uploads/{upload['id']}", headers=auth(bob)).status_code == 404
    assert api.put(upload["upload_url"], headers=auth(bob), content=data).status_code == 404
    assert submit_upload(api, bob, upload["checkpoint_key"]).status_code == 404


def test_delete_unused_upload(api, embedded_settings, unet_file):
    key = new_api_key(embedded_settings, "alice")
    data = unet_file.read_bytes()
    upload = start_upload(api, key, "unet.safetensors", len(data)).json()
    api.put(upload["upload_url"], headers=auth(key), content=data)

    response = api.delete(f"/uploads/{upload['id']}", headers=auth(key))

    assert response.status_code == 204
    assert make_store(embedded_settings).list_prefix("uploads/") == []


@pytest.mark.services
def test_s3_presigned_multipart_job(api_factory, production_settings, unet_file):
    api = api_factory(production_settings)
    key = new_api_key(production_settings, "alice")
    other = new_api_key(production_settings, "bob")
    data = unet_file.read_bytes()

    upload = start_upload(api, key, "unet.safetensors", len(data)).json()
    assert upload["method"] == "s3_multipart"
    assert len(upload["parts"]) == 1
    etags = []
    for part in upload["parts"]:
        start = (part["part_number"] - 1) * upload["part_size"]
        response = httpx.put(part["url"], content=data[start : start + upload["part_size"]])
        assert response.status_code == 200
        etags.append({"part_number": part["part_number"], "etag": response.headers["etag"]})
    completed = api.post(upload["complete_url"], headers=auth(key), json={"parts": etags})
    job = submit_upload(api, key, upload["checkpoint_key"])

    assert completed.status_code == 200, completed.text
    assert completed.json()["state"] == "complete"
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert job.json()["input"]["sha256"] == hashlib.sha256(data).hexdigest()

    store = make_store(production_settings)
    store.put_bytes(f"jobs/{job_id}/artifacts/report.json", json.dumps({"ok": True}).encode())
    redirect = api.get(f"/jobs/{job_id}/artifacts/report.json", headers=auth(key))
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).json() == {"ok": True}
    assert api.get(f"/jobs/{job_id}/artifacts/report.json", headers=auth(other)).status_code == 404


@pytest.mark.services
def test_s3_put_fallback_and_readyz(api_factory, production_settings, unet_file):
    api = api_factory(production_settings)
    key = new_api_key(production_settings, "alice")
    data = unet_file.read_bytes()

    upload = start_upload(api, key, "unet.safetensors", len(data)).json()
    put = api.put(f"/uploads/{upload['id']}", headers=auth(key), content=data)
    ready = api.get("/readyz")

    assert put.status_code == 200
    assert put.json()["state"] == "complete"
    assert make_store(production_settings).list_prefix("uploads/")[0].size == len(data)
    assert ready.status_code == 200, ready.text
