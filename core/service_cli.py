"""Service commands: `sealer serve`, `submit`, `status`, `download`, `cancel`, `keys`, `migrate`."""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.errors import SealerError

DEFAULT_URL = "http://127.0.0.1:8000"
STOP_GRACE_S = 10.0


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="Run the API and one worker on this machine (embedded defaults).")
    serve.add_argument("--host", default="127.0.0.1", help="Address the API listens on (default: 127.0.0.1).")
    serve.add_argument("--port", type=int, default=8000, help="API port (default: 8000).")
    serve.add_argument("--data-dir", type=Path, help="Folder for the database, queue and objects (default: SEALER_DATA_DIR or .data).")
    serve.set_defaults(handler=run_serve)

    submit = subparsers.add_parser("submit", help="Upload a model with a job spec to a Sealer server.")
    _add_client_arguments(submit)
    submit.add_argument("--model", required=True, type=Path, help="A .safetensors file, an archive, or a diffusers folder (zipped on the fly).")
    submit.add_argument("--spec", required=True, type=Path, help="Job spec JSON file.")
    submit.add_argument("--wait", action="store_true", help="Follow the job until it ends.")
    submit.add_argument("--download", type=Path, metavar="DIR", help="After success, download the artifacts into DIR (implies --wait).")
    submit.add_argument("--idempotency-key", help="Reuse a key to retry a submission without creating a second job.")
    submit.set_defaults(handler=run_submit)

    status = subparsers.add_parser("status", help="Show one job, or list jobs.")
    _add_client_arguments(status)
    status.add_argument("job_id", nargs="?", help="Job id; omit it to list your jobs.")
    status.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"], help="List only jobs in this state.")
    status.add_argument("--wait", action="store_true", help="Follow the job until it ends.")
    status.add_argument("--json", action="store_true", help="Print the raw JSON.")
    status.set_defaults(handler=run_status)

    download = subparsers.add_parser("download", help="Download a job's artifacts.")
    _add_client_arguments(download)
    download.add_argument("job_id", help="Job id.")
    download.add_argument("--out", required=True, type=Path, help="Folder to write the artifacts to.")
    download.add_argument("--name", action="append", help="Download only this artifact (repeatable).")
    download.set_defaults(handler=run_download)

    cancel = subparsers.add_parser("cancel", help="Cancel a queued or running job.")
    _add_client_arguments(cancel)
    cancel.add_argument("job_id", help="Job id.")
    cancel.set_defaults(handler=run_cancel)

    keys = subparsers.add_parser("keys", help="Create, list and revoke API keys (in the configured database).")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="Create a key; it is printed once and stored hashed.")
    create.add_argument("--name", required=True, help="A name for the key's owner.")
    create.set_defaults(handler=run_keys_create)
    listing = key_commands.add_parser("list", help="List keys (never the keys themselves).")
    listing.set_defaults(handler=run_keys_list)
    revoke = key_commands.add_parser("revoke", help="Revoke a key by id or name.")
    revoke.add_argument("key", help="Key id or name.")
    revoke.set_defaults(handler=run_keys_revoke)

    migrate = subparsers.add_parser("migrate", help="Upgrade the database schema to the latest version.")
    migrate.add_argument("--revision", default="head", help="Target revision (default: head).")
    migrate.add_argument("--downgrade", action="store_true", help="Downgrade to --revision instead (`base` drops every table).")
    migrate.set_defaults(handler=run_migrate)


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("SEALER_URL", DEFAULT_URL), help=f"API base URL (default: SEALER_URL or {DEFAULT_URL}).")
    parser.add_argument("--api-key", default=os.environ.get("SEALER_API_KEY"), help="API key (default: SEALER_API_KEY).")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# --- client commands -----------------------------------------------------------------------


def _client(args):
    import logging

    from core.client import SealerClient

    # One INFO line per poll from httpx would bury the progress display.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.api_key:
        raise SealerError("no API key; pass --api-key or set SEALER_API_KEY (create one with `sealer keys create --name NAME`)")
    return SealerClient(args.url, args.api_key)


class JobProgress:
    """Show a job's state while waiting: one redrawn line on a terminal, else a line per change."""

    def __init__(self, stream=sys.stderr, width: int = 24):
        self.stream = stream
        self.width = width
        self.interactive = stream.isatty()
        self.last = None
        self.started = time.monotonic()

    def __call__(self, job: dict) -> None:
        state, phase, step, total = job["state"], job.get("phase") or "", job.get("step", 0), job.get("total", 0)
        counter = f" {step}/{total}" if total else ""
        elapsed = time.monotonic() - self.started
        if self.interactive:
            filled = int(self.width * step / total) if total else 0
            bar = f" [{'#' * filled}{'.' * (self.width - filled)}]" if total else ""
            self.stream.write(f"\r{job['id'][:8]} {state:<9} {phase:<18}{bar}{counter:>12} {elapsed:7.0f} s")
            self.stream.flush()
            return
        # Not a terminal (a log, CI): one line when the state or phase changes, or every tenth of the steps.
        decile = int(10 * step / total) if total else 0
        key = (state, phase, decile)
        if key != self.last:
            self.stream.write(f"{job['id'][:8]} {state} {phase}{counter} ({elapsed:.0f} s)\n")
            self.stream.flush()
            self.last = key

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


def _describe_job(job: dict) -> str:
    lines = [f"job {job['id']}: {job['state']}"]
    if job.get("phase"):
        progress = f" {job['step']}/{job['total']}" if job.get("total") else ""
        lines.append(f"  phase: {job['phase']}{progress}")
    lines.append(f"  input: {job['input']['filename']} ({job['input']['size']} bytes)")
    for name in ("created_at", "started_at", "finished_at"):
        if job.get(name):
            lines.append(f"  {name.replace('_at', '')}: {job[name]}")
    if job.get("error"):
        lines.append(f"  error: {job['error']['code']}: {job['error']['message']}")
    metrics = job.get("metrics") or {}
    if metrics:
        shown = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
        for key, value in shown.items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _wait(client, job_id: str) -> dict:
    progress = JobProgress()
    try:
        return client.wait(job_id, on_update=progress)
    finally:
        progress.close()


def run_submit(args) -> int:
    try:
        with _client(args) as client:
            job = client.submit(args.model, args.spec, idempotency_key=args.idempotency_key)
            print(f"submitted job {job['id']} ({job['state']})")
            if not (args.wait or args.download):
                print(job["id"])
                return 0
            job = _wait(client, job["id"])
            print(_describe_job(job))
            if job["state"] != "succeeded":
                return 1
            if args.download:
                paths = client.download(job["id"], args.download)
                for path in paths:
                    print(f"downloaded {path}")
            return 0
    except (SealerError, OSError, ValueError) as error:
        return _fail(getattr(error, "message", str(error)))


def run_status(args) -> int:
    try:
        with _client(args) as client:
            if args.job_id is None:
                page = client.jobs(state=args.state)
                if args.json:
                    print(json.dumps(page, indent=2))
                    return 0
                for job in page["items"]:
                    progress = f"{job['phase'] or ''} {job['step']}/{job['total']}" if job["total"] else (job["phase"] or "")
                    print(f"{job['id']}  {job['state']:<9}  {progress:<24}  {job['created_at']}")
                print(f"{page['total']} job(s)")
                return 0
            job = _wait(client, args.job_id) if args.wait else client.job(args.job_id)
            print(json.dumps(job, indent=2) if args.json else _describe_job(job))
            return 0
    except SealerError as error:
        return _fail(error.message)


def run_download(args) -> int:
    try:
        with _client(args) as client:
            for path in client.download(args.job_id, args.out, names=args.name):
                print(f"downloaded {path}")
            return 0
    except (SealerError, OSError) as error:
        return _fail(getattr(error, "message", str(error)))


def run_cancel(args) -> int:
    try:
        with _client(args) as client:
            job = client.cancel(args.job_id)
            print(f"job {job['id']}: {job['state']}{' (stopping at the next step)' if job['state'] == 'running' else ''}")
            return 0
    except SealerError as error:
        return _fail(error.message)


# --- database commands ----------------------------------------------------------------------


def _engine():
    from core import db
    from core.settings import get_settings

    return db.make_engine(get_settings().resolved_database_url)


def run_keys_create(args) -> int:
    from core import db
    from core.jobs import create_api_key

    engine = _engine()
    try:
        db.check_schema(engine)
        with db.session_scope(engine) as session:
            record, plaintext = create_api_key(session, args.name)
    except (db.SchemaOutOfDate, ValueError) as error:
        return _fail(str(error))
    finally:
        engine.dispose()
    print(f"created key {record.id} for {record.name!r}; it is shown only this once:", file=sys.stderr)
    print(plaintext)
    return 0


def run_keys_list(args) -> int:
    from core import db
    from core.jobs import list_api_keys

    engine = _engine()
    try:
        db.check_schema(engine)
        with db.session_scope(engine) as session:
            keys = list_api_keys(session)
            for key in keys:
                status = "active" if key.active else f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
                print(f"{key.id}  {key.prefix}...  {key.name:<24}  created {key.created_at:%Y-%m-%d %H:%M}  {status}")
    except db.SchemaOutOfDate as error:
        return _fail(str(error))
    finally:
        engine.dispose()
    if not keys:
        print("no keys; create one with `sealer keys create --name NAME`", file=sys.stderr)
    return 0


def run_keys_revoke(args) -> int:
    from core import db
    from core.jobs import revoke_api_key

    engine = _engine()
    try:
        db.check_schema(engine)
        with db.session_scope(engine) as session:
            key = revoke_api_key(session, args.key)
            print(f"revoked key {key.id} ({key.name})")
    except (db.SchemaOutOfDate, LookupError) as error:
        return _fail(str(error).strip("'\""))
    finally:
        engine.dispose()
    return 0


def run_migrate(args) -> int:
    from core import db
    from core.settings import get_settings

    url = get_settings().resolved_database_url
    engine = db.make_engine(url)
    try:
        before = db.current_revision(engine)
        if args.downgrade:
            db.downgrade(url, args.revision)
        else:
            db.upgrade(url, args.revision)
        after = db.current_revision(engine)
    finally:
        engine.dispose()
    display_url = engine.url.render_as_string(hide_password=True)
    print(f"database {display_url}: {before or 'empty'} -> {after or 'empty'}")
    return 0


# --- sealer serve ------------------------------------------------------------------------------


def run_serve(args) -> int:
    """Start uvicorn and one Celery worker as subprocesses; stop both on Ctrl-C or SIGTERM."""
    import logging

    from core import db
    from core.settings import Settings

    logger = logging.getLogger("sealer.serve")
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    data_dir = settings.data_dir.resolve()
    settings = settings.model_copy(update={"data_dir": data_dir})
    data_dir.mkdir(parents=True, exist_ok=True)
    # The children get the absolute folder, so they agree with this process whatever their cwd.
    env = {**os.environ, "SEALER_DATA_DIR": str(data_dir)}

    url = settings.resolved_database_url
    engine = db.make_engine(url)
    try:
        if db.is_empty(engine):
            logger.info("new database: creating the tables")
            db.upgrade(url)
        db.check_schema(engine)
        from core.jobs import list_api_keys

        with db.session_scope(engine) as session:
            has_keys = any(key.active for key in list_api_keys(session))
    except db.SchemaOutOfDate as error:
        return _fail(str(error))
    finally:
        engine.dispose()

    logger.info("data folder: %s", data_dir)
    logger.info("database: %s", engine.url.render_as_string(hide_password=True))
    logger.info("queue: %s", settings.resolved_broker_url.split("@")[-1])
    logger.info("objects: %s", settings.local_store_dir.resolve() if settings.storage == "local" else f"s3 bucket {settings.s3_bucket}")
    if not has_keys:
        logger.warning("no API keys yet; create one with `sealer keys create --name NAME` (same SEALER_DATA_DIR)")

    api_command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", args.host, "--port", str(args.port)]
    worker_command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--concurrency", "1"]
    worker_command += ["--without-gossip", "--without-mingle", "--loglevel", settings.log_level]
    processes = {
        "api": subprocess.Popen(api_command, env=env, start_new_session=True),
        "worker": subprocess.Popen(worker_command, env=env, start_new_session=True),
    }
    logger.info("API on http://%s:%d (docs at /docs); API pid %d, worker pid %d", args.host, args.port, processes["api"].pid, processes["worker"].pid)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        while not stop.wait(0.5):
            exited = [name for name, process in processes.items() if process.poll() is not None]
            if exited:
                name = exited[0]
                logger.error("%s exited with code %s; stopping", name, processes[name].returncode)
                exit_code = 1
                break
    finally:
        logger.info("stopping the API and the worker")
        _stop_processes(processes, logger)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code


def _stop_processes(processes: dict[str, subprocess.Popen], logger) -> None:
    # SIGTERM first: uvicorn drains requests, Celery finishes its warm shutdown. A running
    # job is then interrupted with SIGQUIT (Celery's cold shutdown); its lease expires and
    # the reaper resumes it from its saved state on the next start.
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s still running after %.0f s; forcing it to stop", name, STOP_GRACE_S)
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Pool children that outlived their parent.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
