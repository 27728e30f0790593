"""The `sealer` service commands and SealerClient against a real API and worker (fake engine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import db
from core.client import ClientError, SealerClient
from tests.conftest import make_settings
from tests.servers import REPO_ROOT, settings_env, start_api, start_worker

pytestmark = pytest.mark.services

SPEC = {"triggers": [{"text": "mignneko"}], "training": {"steps": 6}}


def sealer(settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `sealer` command with `settings` in its environment."""
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=REPO_ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def stack(tmp_path, service_processes):
    settings = make_settings(tmp_path / "data")
    db.upgrade(settings.resolved_database_url)
    env = {"FAKE_ENGINE_STEP_SECONDS": "0.02"}
    service_processes.append(start_worker(settings, tmp_path / "logs", fake_engine=True, extra_env=env))
    api = start_api(settings, tmp_path / "logs")
    service_processes.append(api)
    return settings, api.url


@pytest.fixture
def tiny_pipeline(tmp_path) -> Path:
    from tests.engine_models import make_tiny_pipeline_dir

    return make_tiny_pipeline_dir(tmp_path / "tiny-pipeline")


def test_cli_submit_wait_download(stack, tiny_pipeline, tmp_path):
    settings, url = stack
    key = sealer(settings, "keys", "create", "--name", "alice").stdout.strip()
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    out = tmp_path / "out"

    submitted = sealer(
        settings, "submit", "--url", url, "--api-key", key, "--model", str(tiny_pipeline), "--spec", str(spec_path), "--download", str(out)
    )
    job_id = submitted.stdout.split()[2]
    status = json.loads(sealer(settings, "status", job_id, "--url", url, "--api-key", key, "--json").stdout)
    listing = sealer(settings, "status", "--url", url, "--api-key", key).stdout

    assert key.startswith("slr_")
    assert "succeeded" in submitted.stdout
    assert sorted(path.name for path in out.iterdir()) == ["log.txt", "report.json", "sanitized.safetensors"]
    assert status["state"] == "succeeded"
    assert status["input"]["filename"] == "tiny-pipeline.zip"
    assert job_id in listing


def test_cli_keys_list_and_revoke(stack, tmp_path):
    settings, url = stack
    key = sealer(settings, "keys", "create", "--name", "bob").stdout.strip()
    duplicate = sealer(settings, "keys", "create", "--name", "bob", check=False)

    listed = sealer(settings, "keys", "list").stdout
    sealer(settings, "keys", "revoke", "bob")
    rejected = sealer(settings, "status", "--url", url, "--api-key", key, check=False)

    assert duplicate.returncode == 2
    assert "already exists" in duplicate.stderr
    assert "bob" in listed
    assert key not in listed
    assert key[:10] in listed
    assert rejected.returncode == 2
    assert "revoked" in rejected.stderr


def test_client_upload_path_and_isolation(stack, tiny_pipeline, tmp_path):
    settings, url = stack
    alice = sealer(settings, "keys", "create", "--name", "alice").stdout.strip()
    bob = sealer(settings, "keys", "create", "--name", "bob").stdout.strip()

    with SealerClient(url, alice, upload_threshold_bytes=1) as client:
        job = client.submit(tiny_pipeline, SPEC)
        finished = client.wait(job["id"], poll_interval_s=0.2, timeout_s=120)
        files = client.download(job["id"], tmp_path / "downloads", names=["report.json"])
    with SealerClient(url, bob) as other, pytest.raises(ClientError) as missing:
        other.job(job["id"])

    assert finished["state"] == "succeeded"
    assert [path.name for path in files] == ["report.json"]
    assert json.loads(files[0].read_text())["removal_rate"] == 1.0
    assert missing.value.status == 404


def test_client_rejects_invalid_spec_locally(tiny_pipeline):
    with SealerClient("http://127.0.0.1:9", "slr_unused") as client, pytest.raises(ValueError):
        client.submit(tiny_pipeline, {"triggers": []})


def test_cli_migrate_fresh_database(tmp_path):
    settings = make_settings(tmp_path / "fresh")

    result = sealer(settings, "migrate")
    down = sealer(settings, "migrate", "--downgrade", "--revision", "base")

    assert "empty -> 0001" in result.stdout
    assert "0001 -> empty" in down.stdout


def test_cli_keys_need_migrated_database(tmp_path):
    settings = make_settings(tmp_path / "fresh")

    result = sealer(settings, "keys", "create", "--name", "alice", check=False)

    assert result.returncode == 2
    assert "sealer migrate" in result.stderr
    assert os.path.exists(tmp_path / "fresh" / "sealer.db")
