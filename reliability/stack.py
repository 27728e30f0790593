"""Servers and Sealer processes for fault scenarios, each one restartable on its own port.

`Servers` starts Redis with AOF persistence (as docker-compose runs it), PostgreSQL and
an S3 server (`rclone serve s3`) on free loopback ports, and can stop, kill or restart
each of them in place. `Stack` is one scenario's slice of them: a fresh database, bucket
and Redis database, an API process (uvicorn) and Celery workers that run
reliability.fault_engine. Nothing here is aimed at anything but 127.0.0.1.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core import db
from core.jobs import create_api_key
from core.queue import make_celery, send_job
from core.settings import Settings
from core.storage import make_store
from tests.servers import (
    REPO_ROOT,
    PostgresServer,
    S3Server,
    ServiceProcess,
    free_port,
    rclone_binary,
    require_binary,
    settings_env,
    start_postgres,
    stop_postgres,
    stop_process,
    wait_for_port,
)

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_TRIGGER = "mignneko"


class ScenarioError(AssertionError):
    """A scenario could not reach the state it waits for; the message carries the process logs."""


# --- servers ---------------------------------------------------------------------------------


class RedisAof:
    """redis-server with `--appendonly yes` on a fixed port and folder, so a restart keeps its data."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.binary = require_binary("redis-server", "apt-get install -y redis-server")
        self.process: subprocess.Popen | None = None
        self.start()

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.folder)]
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes its AOF and exits; SIGKILL: a crash that may lose the last second of writes."""
        if self.process is not None:
            stop_process(self.process, sig)
            self.process = None

    def restart(self, down_s: float = 0.0, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        time.sleep(down_s)
        self.start()


class Postgres:
    """A throwaway PostgreSQL cluster that can be restarted on the same port and data folder.

    The cluster lives in a folder of its own under the system temporary folder, because the
    `postgres` account that runs the server must be able to reach it. `close()` removes it.
    """

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="sealer-faults-pg-"))
        try:
            self.server: PostgresServer = start_postgres(self.folder)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    @property
    def port(self) -> int:
        return self.server.port

    def create_database(self) -> str:
        return self.server.create_database()

    def stop(self) -> None:
        stop_postgres(self.server)

    def start(self) -> None:
        data_dir = self.server.data_dir
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {data_dir} -c fsync=off"
        command = [str(self.server.binaries / "pg_ctl"), "start", "-D", str(data_dir), "-o", options]
        command += ["-l", str(self.folder / "postgres-restart.log"), "-w"]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root.
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class S3:
    """`rclone serve s3` on a fixed port, folder and key pair, so that it can be stopped and started again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data_dir = folder / "buckets"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_key_id = "sealer-faults"
        self.secret_access_key = uuid.uuid4().hex
        self.binary = rclone_binary()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        command = [self.binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--config", "/dev/null"]
        command += ["--auth-key", f"{self.access_key_id},{self.secret_access_key}", str(self.data_dir)]
        with open(self.folder / "rclone.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)
            self.process = None

    def create_bucket(self) -> str:
        server = S3Server(self.port, self.access_key_id, self.secret_access_key, self.data_dir, self.process)
        return server.create_bucket()


@dataclass
class Servers:
    """Redis (AOF), PostgreSQL and S3 for a run of scenarios, under one folder."""

    root: Path
    redis: RedisAof
    postgres: Postgres
    s3: S3
    next_redis_database: int = 0

    @classmethod
    def start(cls, root: Path) -> "Servers":
        root.mkdir(parents=True, exist_ok=True)
        started = []
        try:
            for name in ("redis", "s3"):
                (root / name).mkdir(exist_ok=True)
            redis = RedisAof(root / "redis")
            started.append(redis)
            postgres = Postgres()
            started.append(postgres)
            s3 = S3(root / "s3")
        except BaseException:
            for server in reversed(started):
                server.close() if isinstance(server, Postgres) else server.stop()
            raise
        return cls(root, redis, postgres, s3)

    def ensure_running(self) -> None:
        """Start again whatever a failed scenario left stopped."""
        if self.redis.process is None:
            self.redis.start()
        if not (self.postgres.server.data_dir / "postmaster.pid").exists():
            self.postgres.start()
        if not self.s3.running:
            self.s3.start()

    def close(self) -> None:
        self.s3.stop()
        self.postgres.close()
        self.redis.stop()

    def new_redis_url(self) -> str:
        """Return the URL of a Redis database for one stack, flushed first (Redis has 16 by default)."""
        import redis

        database = self.next_redis_database % 16
        self.next_redis_database += 1
        client = redis.Redis(host="127.0.0.1", port=self.redis.port, db=database)
        try:
            client.flushdb()
        finally:
            client.close()
        return self.redis.url(database)


# --- one scenario's services ------------------------------------------------------------------


def fault_settings(servers: Servers, data_dir: Path, **overrides) -> Settings:
    """Production-mode settings on `servers` with a fresh database and bucket and short lease timings."""
    values = {
        "data_dir": data_dir,
        "database_url": servers.postgres.create_database(),
        "broker_url": servers.new_redis_url(),
        "storage": "s3",
        "s3_endpoint_url": servers.s3.endpoint_url,
        "s3_bucket": servers.s3.create_bucket(),
        "s3_access_key_id": servers.s3.access_key_id,
        "s3_secret_access_key": servers.s3.secret_access_key,
        "lease_ttl_s": 4,
        "heartbeat_interval_s": 0.5,
        "reaper_interval_s": 1.0,
        "checkpoint_every_steps": 5,
        "max_upload_bytes": 512 * 1024**2,
    }
    values.update(overrides)
    settings = Settings(**values)
    db.upgrade(settings.resolved_database_url)
    return settings


def write_checkpoint(path: Path, seed: int) -> Path:
    """Write a small safetensors file with diffusers UNet key names; `seed` makes its bytes unique."""
    import numpy as np
    from safetensors.numpy import save_file

    generator = np.random.default_rng(seed)
    shapes = {
        "conv_in.weight": (8, 4, 3, 3),
        "conv_in.bias": (8,),
        "time_embedding.linear_1.weight": (16, 8),
        "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
        "conv_out.weight": (4, 8, 3, 3),
        "conv_out.bias": (4,),
    }
    tensors = {name: generator.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RunStep:
    """One fake-engine step as the run log records it."""

    job_id: str
    pid: int
    step: int
    time: float


@dataclass
class Stack:
    """One scenario's API, workers and client on `servers`; `close()` stops every process it started."""

    servers: Servers
    root: Path
    settings: Settings
    api_key: str = ""
    api: ServiceProcess | None = None
    api_port: int = 0
    workers: dict[str, ServiceProcess] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, servers: Servers, root: Path, *, api: bool = True, **overrides) -> "Stack":
        root.mkdir(parents=True, exist_ok=True)
        settings = fault_settings(servers, root / "data", **overrides)
        stack = cls(servers, root, settings, api_port=free_port())
        stack.api_key = stack.new_api_key("faults")
        if api:
            stack.start_api()
        return stack

    # ----- paths and direct access ----------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_log(self) -> Path:
        return self.root / "fake-engine-runs.txt"

    @property
    def spool_dir(self) -> Path:
        return self.settings.resolved_scratch_dir / "api-spool"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def store(self):
        return make_store(self.settings)

    def new_api_key(self, name: str) -> str:
        engine = db.make_engine(self.settings.resolved_database_url)
        try:
            with db.session_scope(engine) as session:
                _, plaintext = create_api_key(session, name)
        finally:
            engine.dispose()
        return plaintext

    def count_rows(self, table: str) -> int:
        from sqlalchemy import text

        engine = db.make_engine(self.settings.resolved_database_url)
        try:
            with engine.connect() as connection:
                return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
        finally:
            engine.dispose()

    def queued_messages(self) -> int:
        import redis

        from core.queue import QUEUE_NAME

        client = redis.Redis.from_url(self.settings.resolved_broker_url)
        try:
            return int(client.llen(QUEUE_NAME))
        finally:
            client.close()

    def send_task(self, job_id: str) -> None:
        """Send one more `sealer.run_job` message for `job_id`, as a broker redelivery would."""
        celery = make_celery(self.settings)
        try:
            send_job(celery, job_id)
        finally:
            celery.close()

    # ----- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str], port: int | None = None) -> ServiceProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return ServiceProcess(name, process, log_path, port)

    def start_api(self) -> ServiceProcess:
        """Start uvicorn on this stack's port (the same port after every restart)."""
        command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.api_port)]
        self.api = self._spawn("api", command, settings_env(self.settings), self.api_port)
        try:
            wait_for_port(self.api_port, self.api.process, timeout_s=90)
        except RuntimeError as error:
            raise ScenarioError(f"{error}\n{self.api.output()[-4000:]}") from None
        return self.api

    def kill_api(self) -> None:
        if self.api is not None:
            self.api.kill_group()

    def start_worker(
        self,
        name: str,
        *,
        step_seconds: float = 0.05,
        phase_seconds: dict[str, float] | None = None,
        store_delay_s: float = 0.0,
        wait: bool = True,
    ) -> ServiceProcess:
        """Start a Celery worker (one pool process) that runs reliability.fault_engine's seal."""
        command = [sys.executable, "-m", "reliability.fault_engine", "-A", "worker.celery_app", "worker"]
        command += ["--concurrency", "1", "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle"]
        command += ["--loglevel", "INFO"]
        pauses = ",".join(f"{phase}={seconds}" for phase, seconds in (phase_seconds or {}).items())
        env = {
            **settings_env(self.settings),
            "SEALER_WORKER_ID": name,
            "FAKE_ENGINE_RUN_LOG": str(self.run_log),
            "FAKE_ENGINE_STEP_SECONDS": str(step_seconds),
            "FAULT_PHASE_SECONDS": pauses,
            "FAULT_STORE_DELAY_S": str(store_delay_s),
        }
        worker = self._spawn(name, command, env)
        self.workers[name] = worker
        if wait:
            try:
                worker.wait_for_output("worker ready", timeout_s=120)
            except RuntimeError as error:
                raise ScenarioError(str(error)) from None
        return worker

    def worker_pids(self, name: str) -> set[int]:
        """The worker's main process and its pool children."""
        worker = self.workers[name]
        pids = {worker.process.pid}
        children = Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children")
        if children.exists():
            pids |= {int(pid) for pid in children.read_text().split()}
        return pids

    def logs(self) -> str:
        """Return the tail of every process log, for failure messages."""
        services = [*self.workers.values(), *([self.api] if self.api else [])]
        return "\n".join(f"--- {service.name}\n{service.output()[-3000:]}" for service in services)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.kill_group()
        self.kill_api()

    # ----- the HTTP API -----------------------------------------------------------------------

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=timeout_s)

    def submit(self, steps: int, *, seed: int = 0, idempotency_key: str | None = None, trigger: str = DEFAULT_TRIGGER) -> str:
        """Submit a job with a fresh small checkpoint; return its id."""
        checkpoint = write_checkpoint(self.root / "inputs" / f"unet-{seed}.safetensors", seed)
        spec = {"triggers": [{"text": trigger}], "training": {"steps": steps}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with self.client() as client, open(checkpoint, "rb") as stream:
            response = client.post(
                "/jobs", headers=headers, files={"checkpoint": (checkpoint.name, stream)}, data={"spec": json.dumps(spec)}
            )
        if response.status_code != 201:
            raise ScenarioError(f"POST /jobs returned {response.status_code}: {response.text}")
        job_id = response.json()["id"]
        self.checkpoints[job_id] = sha256_file(checkpoint)
        return job_id

    def job(self, job_id: str) -> dict | None:
        """Return GET /jobs/{id}, or None while the API or its database is unreachable."""
        try:
            with self.client(timeout_s=10) as client:
                response = client.get(f"/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def wait_for_job(self, job_id: str, condition: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            job = self.job(job_id) or job
            if job is not None and condition(job):
                return job
            time.sleep(0.1)
        raise ScenarioError(f"job {job_id} did not reach {what} within {timeout_s:.0f} s; last seen: {job}\n{self.logs()}")

    def wait_finished(self, job_id: str, timeout_s: float = 180.0) -> dict:
        return self.wait_for_job(job_id, lambda job: job["state"] in FINAL_STATES, timeout_s, "a final state")

    # ----- what the workers left ------------------------------------------------------------

    def run_steps(self, job_id: str | None = None) -> list[RunStep]:
        if not self.run_log.exists():
            return []
        rows = []
        for line in self.run_log.read_text().splitlines():
            recorded_job, pid, step, stamp = line.split()
            if job_id is None or recorded_job == job_id:
                rows.append(RunStep(recorded_job, int(pid), int(step), float(stamp)))
        return rows

    def object_keys(self, job_id: str) -> list[str]:
        """Return the key of every object under `jobs/<id>/`, relative to that prefix."""
        prefix = f"jobs/{job_id}/"
        return [stored.key[len(prefix) :] for stored in self.store().list_prefix(prefix)]

    def scratch_leftovers(self) -> list[str]:
        """Job folders and spool files left in the scratch folder, relative to it."""
        scratch = self.settings.resolved_scratch_dir
        if not scratch.is_dir():
            return []
        found = [path for path in scratch.iterdir() if path.name != "api-spool"]
        if self.spool_dir.is_dir():
            found += list(self.spool_dir.iterdir())
        return sorted(str(path.relative_to(scratch)) for path in found)

    def worker_log_count(self, text: str) -> int:
        return sum(worker.output().count(text) for worker in self.workers.values())

    def wait_for_worker_log(self, text: str, timeout_s: float) -> bool:
        """Wait until some worker logged `text`; return whether one did."""
        deadline = time.monotonic() + timeout_s
        while not self.worker_log_count(text):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
