"""Real Celery workers on real brokers run jobs: success, cancel, failure, kill -9, redelivery.

The workers run tests.fake_engine's `seal` (sleeping steps with a resumable state), so
these tests exercise leases, the reaper and the broker without training a model. The
end-to-end tests run the real engine.
"""

import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from core import db
from core.storage import make_store
from tests.conftest import auth, make_settings, new_api_key
from tests.servers import start_worker

pytestmark = pytest.mark.services

FINAL_STATES = {"succeeded", "failed", "cancelled"}


def submit(api, key: str, checkpoint: Path, steps: int, trigger: str = "mignneko") -> str:
    spec = {"triggers": [{"text": trigger}], "training": {"steps": steps}}
    with open(checkpoint, "rb") as stream:
        response = api.post(
            "/jobs",
            headers=auth(key),
            files={"checkpoint": (checkpoint.name, stream)},
            data={"spec": json.dumps(spec)},
        )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for_job(api, key: str, job_id: str, condition, timeout_s: float = 120.0, workers=()) -> dict:
    deadline = time.monotonic() + timeout_s
    job = {}
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}", headers=auth(key)).json()
        if condition(job):
            return job
        time.sleep(0.2)
    logs = "\n".join(worker.output()[-3000:] for worker in workers)
    raise AssertionError(f"job {job_id} never reached the expected condition; last: {job}\n{logs}")


def finished(job: dict) -> bool:
    return job["state"] in FINAL_STATES


def read_run_log(path: Path) -> list[tuple[str, int, int, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        job_id, pid, step, stamp = line.split()
        rows.append((job_id, int(pid), int(step), float(stamp)))
    return rows


def artifact_text(api, key: str, job_id: str, name: str) -> str:
    response = api.get(f"/jobs/{job_id}/artifacts/{name}", headers=auth(key))
    if response.status_code == 307:
        return httpx.get(response.headers["location"]).text
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture(params=["embedded", "production"])
def mode_settings(request, tmp_path):
    overrides = {"checkpoint_every_steps": 5, "lease_ttl_s": 4, "heartbeat_interval_s": 0.5, "reaper_interval_s": 1.0}
    if request.param == "embedded":
        settings = make_settings(tmp_path / "data", **overrides)
        db.upgrade(settings.resolved_database_url)
        return settings
    production = request.getfixturevalue("production_settings")
    return production.model_copy(update=overrides)


@pytest.fixture
def run_log(tmp_path) -> Path:
    return tmp_path / "fake-engine-runs.txt"


def worker_env(run_log: Path, step_seconds: float) -> dict:
    return {"FAKE_ENGINE_RUN_LOG": str(run_log), "FAKE_ENGINE_STEP_SECONDS": str(step_seconds)}


def test_job_succeeds(api_factory, embedded_settings, unet_file, tmp_path, run_log, service_processes):
    api = api_factory(embedded_settings)
    key = new_api_key(embedded_settings, "alice")
    worker = start_worker(embedded_settings, tmp_path / "logs", fake_engine=True, extra_env=worker_env(run_log, 0.02))
    service_processes.append(worker)

    job_id = submit(api, key, unet_file, steps=12)
    job = wait_for_job(api, key, job_id, finished, workers=[worker])

    assert job["state"] == "succeeded", job
    assert job["phase"] == "uploading"
    assert job["attempts"] == 1
    assert job["metrics"]["removal_rate"] == 1.0
    assert job["metrics"]["attack_success_rate_before"] == 1.0
    assert job["metrics"]["attack_success_rate_after"] == 0.0
    assert job["finished_at"] >= job["started_at"]
    names = [item["name"] for item in api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()["items"]]
    assert names == ["log.txt", "report.json", "sanitized.safetensors"]
    log_lines = artifact_text(api, key, job_id, "log.txt").splitlines()
    assert any("fake seal finished 12 steps" in line for line in log_lines)
    assert all(f"[job={job_id}]" in line for line in log_lines if line[:4].isdigit())
    store = make_store(embedded_settings)
    keys = [stored.key for stored in store.list_prefix(f"jobs/{job_id}/")]
    assert not any("/state/" in name or "/staging/" in name for name in keys)
    assert list(embedded_settings.resolved_scratch_dir.glob(f"{job_id}*")) == []

    deleted = api.delete(f"/jobs/{job_id}", headers=auth(key))

    assert deleted.status_code == 204
    assert store.list_prefix(f"jobs/{job_id}/") == []
    assert api.get(f"/jobs/{job_id}", headers=auth(key)).status_code == 404


def test_cancel_mid_run(api_factory, embedded_settings, unet_file, tmp_path, run_log, service_processes):
    api = api_factory(embedded_settings)
    key = new_api_key(embedded_settings, "alice")
    worker = start_worker(embedded_settings, tmp_path / "logs", fake_engine=True, extra_env=worker_env(run_log, 0.05))
    service_processes.append(worker)
    job_id = submit(api, key, unet_file, steps=2000)
    wait_for_job(api, key, job_id, lambda job: job["phase"] == "unlearning" and job["step"] >= 5, workers=[worker])

    response = api.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    job = wait_for_job(api, key, job_id, finished, workers=[worker])

    assert response.status_code == 200
    assert job["state"] == "cancelled"
    assert job["error"]["code"] == "cancelled"
    steps_run = max(step for _, _, step, _ in read_run_log(run_log))
    assert steps_run < 2000
    assert "cancelled" in artifact_text(api, key, job_id, "log.txt")
    assert list(embedded_settings.resolved_scratch_dir.glob(f"{job_id}*")) == []


def test_input_error_fails_job(api_factory, embedded_settings, unet_file, tmp_path, run_log, service_processes):
    api = api_factory(embedded_settings)
    key = new_api_key(embedded_settings, "alice")
    worker = start_worker(embedded_settings, tmp_path / "logs", fake_engine=True, extra_env=worker_env(run_log, 0.01))
    service_processes.append(worker)

    job_id = submit(api, key, unet_file, steps=5, trigger="invalid-trigger")
    job = wait_for_job(api, key, job_id, finished, workers=[worker])

    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_input"
    assert "encodes to 0 tokens" in job["error"]["message"]
    assert [item["name"] for item in api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()["items"]] == ["log.txt"]


def test_time_limit_fails_job(api_factory, tmp_path, unet_file, run_log, service_processes):
    settings = make_settings(tmp_path / "data", job_time_limit_s=1)
    db.upgrade(settings.resolved_database_url)
    api = api_factory(settings)
    key = new_api_key(settings, "alice")
    worker = start_worker(settings, tmp_path / "logs", fake_engine=True, extra_env=worker_env(run_log, 0.1))
    service_processes.append(worker)

    job_id = submit(api, key, unet_file, steps=200)
    job = wait_for_job(api, key, job_id, finished, workers=[worker])

    assert job["state"] == "failed"
    assert job["error"]["code"] == "timed_out"
    assert "SEALER_JOB_TIME_LIMIT_S" in job["error"]["message"]


@pytest.mark.slow
def test_killed_worker_job_resumes(api_factory, mode_settings, unet_file, tmp_path, run_log, service_processes):
    settings = mode_settings
    api = api_factory(settings)
    key = new_api_key(settings, "alice")
    env = worker_env(run_log, 0.1)
    first = start_worker(settings, tmp_path / "logs", "worker-a", fake_engine=True, extra_env=env)
    service_processes.append(first)
    job_id = submit(api, key, unet_file, steps=60)
    store = make_store(settings)
    wait_for_job(
        api,
        key,
        job_id,
        lambda job: job["step"] >= 12 and store.exists(f"jobs/{job_id}/state/LATEST"),
        workers=[first],
    )

    first.kill_group()
    second = start_worker(settings, tmp_path / "logs", "worker-b", fake_engine=True, extra_env=env)
    service_processes.append(second)
    job = wait_for_job(api, key, job_id, finished, timeout_s=180, workers=[first, second])

    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    rows = read_run_log(run_log)
    by_pid = defaultdict(list)
    for _, pid, step, stamp in rows:
        by_pid[pid].append((step, stamp))
    assert len(by_pid) == 2
    first_run, second_run = sorted(by_pid.values(), key=lambda steps: steps[0][1])
    resumed_at = min(step for step, _ in second_run)
    assert resumed_at > 1
    assert (resumed_at - 1) % settings.checkpoint_every_steps == 0
    assert max(stamp for _, stamp in first_run) < min(stamp for _, stamp in second_run)
    assert sorted(step for step, _ in second_run) == list(range(resumed_at, 61))
    assert f"resuming from step {resumed_at - 1}" in artifact_text(api, key, job_id, "log.txt")


@pytest.mark.slow
def test_long_job_runs_once_despite_redelivery(api_factory, production_settings, unet_file, tmp_path, run_log, service_processes):
    settings = production_settings.model_copy(update={"broker_visibility_timeout_s": 2})
    api = api_factory(settings)
    key = new_api_key(settings, "alice")
    env = worker_env(run_log, 0.15)
    workers = [
        start_worker(settings, tmp_path / "logs", name, fake_engine=True, extra_env=env) for name in ("worker-a", "worker-b")
    ]
    service_processes.extend(workers)

    job_id = submit(api, key, unet_file, steps=50)
    job = wait_for_job(api, key, job_id, finished, timeout_s=120, workers=workers)

    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1
    rows = read_run_log(run_log)
    assert sorted(step for _, _, step, _ in rows) == list(range(1, 51))
    assert len({pid for _, pid, _, _ in rows}) == 1
    outputs = "".join(worker.output() for worker in workers)
    assert "dropped delivery: job running, lease held by" in outputs
