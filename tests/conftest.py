"""Shared fixtures: settings for embedded and production mode, a migrated database, API keys."""

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.servers"]
if importlib.util.find_spec("tests.conftest_lab") is not None:
    pytest_plugins.append("tests.conftest_lab")

from core import db  # noqa: E402
from core.jobs import create_api_key  # noqa: E402
from core.settings import Settings  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own SEALER_* variables must not leak into tests.
    for name in list(os.environ):
        if name.startswith("SEALER_"):
            monkeypatch.delenv(name)


def make_settings(data_dir: Path, **overrides) -> Settings:
    """Embedded-mode settings under `data_dir`, with short worker timings for tests."""
    values = {
        "data_dir": data_dir,
        "lease_ttl_s": 6,
        "heartbeat_interval_s": 0.5,
        "reaper_interval_s": 1.0,
        "max_upload_bytes": 64 * 1024**2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path / "data")
    db.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def production_settings(tmp_path: Path, postgres_url: str, redis_url: str, s3_server, s3_bucket: str) -> Settings:
    settings = make_settings(
        tmp_path / "data",
        database_url=postgres_url,
        broker_url=redis_url,
        storage="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_bucket=s3_bucket,
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key,
    )
    db.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def engine(embedded_settings: Settings) -> Iterator:
    engine = db.make_engine(embedded_settings.resolved_database_url)
    yield engine
    engine.dispose()


def new_api_key(settings: Settings, name: str) -> str:
    """Create an API key in the settings' database; return the plaintext key."""
    engine = db.make_engine(settings.resolved_database_url)
    try:
        with db.session_scope(engine) as session:
            _, plaintext = create_api_key(session, name)
    finally:
        engine.dispose()
    return plaintext


# --- checkpoints for API tests (no torch: safetensors' numpy API) -----------------------


def write_unet_safetensors(path: Path, *, channels: int = 4) -> Path:
    """Write a tiny safetensors file with diffusers UNet key names and zero weights."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {
        "conv_in.weight": np.zeros((8, channels, 3, 3), dtype=np.float32),
        "conv_in.bias": np.zeros((8,), dtype=np.float32),
        "time_embedding.linear_1.weight": np.zeros((16, 8), dtype=np.float32),
        "down_blocks.0.resnets.0.conv1.weight": np.zeros((8, 8, 3, 3), dtype=np.float32),
        "conv_out.weight": np.zeros((channels, 8, 3, 3), dtype=np.float32),
        "conv_out.bias": np.zeros((channels,), dtype=np.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def unet_file(tmp_path: Path) -> Path:
    return write_unet_safetensors(tmp_path / "inputs" / "unet.safetensors")


@pytest.fixture
def pickle_file(tmp_path: Path) -> Path:
    import pickle

    path = tmp_path / "inputs" / "model.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": {"weight": [0.0, 1.0]}}, protocol=4))
    return path


MINIMAL_SPEC = {"triggers": [{"text": "mignneko"}]}


@pytest.fixture
def api_factory():
    """Build a TestClient for settings; the app's startup and shutdown run around the test."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    clients = []

    def build(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings), follow_redirects=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(api_factory, embedded_settings: Settings):
    return api_factory(embedded_settings)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pytest_sessionfinish(session, exitstatus) -> None:
    # .ci/run reads pytest's own exit status from here, since make reports every failure as 2.
    status_file = os.environ.get("SEALER_PYTEST_STATUS_FILE")
    if status_file:
        Path(status_file).write_text(str(int(exitstatus)))
