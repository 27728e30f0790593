"""Service benchmark: upload throughput and API memory, time to `running`, `GET /jobs/{id}` latency.

Usage: python benchmarks/service.py [--size-mb 1024] [--jobs 5] [--rps 100] [--seconds 30]
       [--results docs/benchmarks.md]

The script starts PostgreSQL, Redis (AOF, as docker-compose runs it) and an S3 server
(`rclone serve s3`) on free loopback ports in a temporary folder (reliability.stack), and
stops them at the end. Each of its four stages gets a fresh database, bucket, Redis
database and uvicorn process:

- Upload, once with the local store and once with S3. One safetensors checkpoint of
  `--size-mb` MiB (UNet key names and one large uint8 tensor) is written to disk once.
  core.client.SealerClient submits it by two routes: one multipart `POST /jobs`, and
  `POST /uploads` followed by `POST /jobs` with its key. The client takes the second
  route for files over 512 MiB. With the local store both routes stream the file
  through the API. With S3 the second route PUTs the parts to presigned URLs, and the
  API reads the object back once to check its format. Each row reports MiB/s over the whole submit, the API's
  resident memory before the upload and its peak during it, and whether three SHA-256
  values agree: the file's, the one the API recorded and the stored object's.
- Time to `running`, on S3 with one Celery worker that runs reliability.fault_engine's
  fake seal. After one untimed warm-up job, each of `--jobs` jobs is submitted to an idle
  worker with a small checkpoint. The client then polls `GET /jobs/{id}` every 10 ms over
  the connection that sent the job, until the state is `running`. The median, minimum
  and maximum are reported, next to `started_at - created_at` from the job row.
- `GET /jobs/{id}` at `--rps` requests per second for `--seconds` seconds on an open-loop
  schedule (reliability.load), over four jobs: one running, three queued. Latency counts
  from the scheduled send time.

The client runs on the same machine as the servers, so its CPU use is in every figure.
The exit status is 1 when an upload failed or a SHA-256 value disagreed.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_RESULTS, TRIGGER, append_results, markdown_table  # noqa: E402
from core import db  # noqa: E402
from core.client import ClientError, SealerClient  # noqa: E402
from core.jobs import Job  # noqa: E402
from core.settings import Settings  # noqa: E402
from reliability.load import (  # noqa: E402
    MIB,
    GeneratedCheckpoint,
    RssSampler,
    poll_at_rate,
    process_cpu_s,
    percentile,
)
from reliability.scenarios import scenario_stack  # noqa: E402
from reliability.stack import ScenarioError, Servers, Stack, write_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)

STORES = ("local", "s3")
# SealerClient's upload threshold that forces each route. Files up to the threshold go as multipart, larger ones through `POST /uploads`.
ROUTES = {"multipart `POST /jobs`": 2**62, "`POST /uploads`, then `POST /jobs`": 0}
# reliability.stack shortens lease timings for its fault scenarios, but the benchmark runs the defaults.
DEFAULT_TIMINGS = {
    name: Settings.model_fields[name].default
    for name in ("lease_ttl_s", "heartbeat_interval_s", "reaper_interval_s", "checkpoint_every_steps")
}
POLL_INTERVAL_S = 0.01
RUNNING_TIMEOUT_S = 120.0
FAKE_STEP_SECONDS = 0.05
POLLED_JOBS = 4
CLIENT_TIMEOUT_S = 600.0
# Above this p99 send delay the load generator itself fell behind, and the block notes it.
CLIENT_LAG_WARNING_MS = 10.0


def job_spec(steps: int) -> dict:
    return {"triggers": [{"text": TRIGGER}], "training": {"steps": steps}}


# ----- the machine ------------------------------------------------------------------------


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or "unknown CPU" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


# ----- uploads ------------------------------------------------------------------------------


def write_generated_checkpoint(path: Path, size_mb: int) -> str:
    """Write a `size_mb` MiB safetensors checkpoint that the API accepts, and return its SHA-256."""
    generated = GeneratedCheckpoint(0, size_mb, random.Random(20261204).randbytes(MIB))
    with open(path, "wb") as stream:
        while chunk := generated.read(8 * MIB):
            stream.write(chunk)
    return generated.sha256.hexdigest()


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current VmRSS (Linux `clear_refs` value 5); return whether it worked."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        logger.warning("could not reset the peak RSS of process %d (%s), so the peak reported is the highest sampled VmRSS", pid, error)
        return False
    return True


def stored_sha256(stack: Stack, job_id: str) -> str:
    """Return the SHA-256 of the job's input object as stored."""
    engine = db.make_engine(stack.settings.resolved_database_url)
    try:
        with db.session_scope(engine) as session:
            input_key = session.get(Job, job_id).input_key
    finally:
        engine.dispose()
    digest = hashlib.sha256()
    for chunk in stack.store().stream(input_key):
        digest.update(chunk)
    return digest.hexdigest()


def measure_upload(stack: Stack, route: str, checkpoint: Path, sha256: str) -> dict:
    """Submit `checkpoint` by `route` and return seconds, MiB/s, API memory and the hash check."""
    pid = stack.api.process.pid
    size_mib = checkpoint.stat().st_size / MIB
    row: dict = {"route": route, "size_mib": size_mib}
    sampler = RssSampler(pid)
    hwm_reset = reset_peak_rss(pid)
    row["rss_before_mb"] = sampler.read_mb()

    client = SealerClient(stack.url, stack.api_key, timeout_s=CLIENT_TIMEOUT_S, upload_threshold_bytes=ROUTES[route], retries=1)
    try:
        started = time.perf_counter()
        with sampler:
            try:
                job = client.submit(checkpoint, job_spec(5))
            except ClientError as error:
                row["error"] = str(error)
        row["seconds"] = time.perf_counter() - started
        peak_mb = max(sampler.samples_mb, default=row["rss_before_mb"])
        if hwm_reset:
            peak_mb = max(peak_mb, sampler.read_mb("VmHWM"))
        row["rss_peak_mb"] = peak_mb
        if "error" in row:
            logger.error("%s upload by %s failed: %s", stack.settings.storage, route, row["error"])
            return row

        row["mib_per_s"] = size_mib / row["seconds"]
        recorded = job["input"]["sha256"]
        stored = stored_sha256(stack, job["id"])
        row["sha256_match"] = recorded == stored == sha256
        if not row["sha256_match"]:
            row["error"] = f"SHA-256 mismatch: file {sha256[:12]}, API recorded {str(recorded)[:12]}, store holds {stored[:12]}"
        logger.info(
            "job %s: %s upload by %s took %.1f s, API peak RSS %.0f MB",
            job["id"], stack.settings.storage, route, row["seconds"], peak_mb,
        )
        # Free the disk space and leave the next row an empty store.
        client.delete(job["id"])
    finally:
        client.close()
    return row


def measure_uploads(servers: Servers, root: Path, checkpoint: Path, sha256: str) -> list[dict]:
    """Upload `checkpoint` by every route to each store, one API process per store."""
    rows = []
    limit = checkpoint.stat().st_size + 16 * MIB
    for store in STORES:
        with scenario_stack(servers, root, f"upload-{store}", storage=store, max_upload_bytes=limit, **DEFAULT_TIMINGS) as stack:
            with stack.client() as client:
                client.get("/jobs")  # Warm the app up before the memory baseline.
            for route in ROUTES:
                rows.append({"store": store, **measure_upload(stack, route, checkpoint, sha256)})
    return rows


# ----- time from POST /jobs to running ------------------------------------------------------------


def wait_for_running(stack: Stack, client: httpx.Client, job_id: str) -> dict:
    """Poll `GET /jobs/{id}` every POLL_INTERVAL_S until the job leaves `queued`; return that response."""
    deadline = time.monotonic() + RUNNING_TIMEOUT_S
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code == 200 and response.json()["state"] != "queued":
            return response.json()
        time.sleep(POLL_INTERVAL_S)
    raise ScenarioError(f"job {job_id} was still queued after {RUNNING_TIMEOUT_S:.0f} s\n{stack.logs()}")


def submit_small_job(client: httpx.Client, checkpoint: Path, steps: int) -> tuple[dict, float]:
    """POST /jobs with a small checkpoint; return the job and the moment the request started."""
    with open(checkpoint, "rb") as stream:
        started = time.perf_counter()
        response = client.post(
            "/jobs", files={"checkpoint": (checkpoint.name, stream)}, data={"spec": json.dumps(job_spec(steps))}
        )
    if response.status_code != 201:
        raise ScenarioError(f"POST /jobs returned {response.status_code}: {response.text}")
    return response.json(), started


def measure_time_to_running(servers: Servers, root: Path, jobs: int) -> dict:
    """Submit `jobs` jobs one after another to an idle worker; time each until GET shows `running`."""
    client_s, server_s, post_s = [], [], []
    with scenario_stack(servers, root, "to-running", **DEFAULT_TIMINGS) as stack, stack.client() as client:
        stack.start_worker("worker-0", step_seconds=FAKE_STEP_SECONDS)
        # Job 0 is an untimed warm-up: the first request and the first task of a fresh process pay one-time costs.
        for index in range(jobs + 1):
            checkpoint = write_checkpoint(stack.root / "inputs" / f"unet-{index}.safetensors", seed=index)
            job, started = submit_small_job(client, checkpoint, steps=3)
            posted_s = time.perf_counter() - started
            seen = wait_for_running(stack, client, job["id"])
            running_s = time.perf_counter() - started
            if seen["started_at"] is None:
                raise ScenarioError(f"job {job['id']} left `queued` as {seen['state']} without starting\n{stack.logs()}")
            logger.info("job %s: running %.3f s after POST /jobs started", job["id"], running_s)
            if index > 0:
                post_s.append(posted_s)
                client_s.append(running_s)
                server_s.append((datetime.fromisoformat(seen["started_at"]) - datetime.fromisoformat(seen["created_at"])).total_seconds())
            # The next job must find the worker idle, or the figure would include queueing behind this one.
            stack.wait_finished(job["id"], timeout_s=RUNNING_TIMEOUT_S)
    return {"jobs": jobs, "post_s": post_s, "client_s": client_s, "server_s": server_s}


# ----- GET /jobs/{id} at a fixed rate ---------------------------------------------------------------


def cancel_and_wait(stack: Stack, job_ids: list[str]) -> None:
    with stack.client(timeout_s=60) as client:
        for job_id in job_ids:
            client.post(f"/jobs/{job_id}/cancel")
    for job_id in job_ids:
        stack.wait_finished(job_id, timeout_s=RUNNING_TIMEOUT_S)


def measure_get_latency(servers: Servers, root: Path, rps: float, seconds: float) -> dict:
    """Poll `GET /jobs/{id}` of one running and three queued jobs at `rps` requests per second."""
    with scenario_stack(servers, root, "get-latency", **DEFAULT_TIMINGS) as stack:
        stack.start_worker("worker-0", step_seconds=FAKE_STEP_SECONDS)
        job_ids = []
        with stack.client() as client:
            for index in range(POLLED_JOBS):
                checkpoint = write_checkpoint(stack.root / "inputs" / f"unet-{index}.safetensors", seed=100 + index)
                job_ids.append(submit_small_job(client, checkpoint, steps=100_000)[0]["id"])
            wait_for_running(stack, client, job_ids[0])

        pid = stack.api.process.pid
        cpu_before_s = process_cpu_s(pid)
        stats = asyncio.run(poll_at_rate(stack.url, stack.api_key, job_ids, rps, seconds))
        api_cpu_ms = (process_cpu_s(pid) - cpu_before_s) * 1000
        cancel_and_wait(stack, job_ids)

    latencies = stats.latencies_ms
    return {
        "rps": rps,
        "seconds": seconds,
        "requests": stats.requests,
        "errors": stats.errors,
        "error_kinds": stats.error_kinds,
        "achieved_rps": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=0.0),
        "client_lag_p99_ms": percentile(stats.start_lag_ms, 0.99),
        "api_cpu_ms_per_request": api_cpu_ms / max(1, stats.requests),
    }


# ----- the results block ---------------------------------------------------------------------------


def upload_table(rows: list[dict]) -> str:
    header = ["store", "route", "size", "seconds", "MiB/s", "API RSS before", "API RSS peak", "SHA-256"]
    lines = []
    for row in rows:
        if "seconds" not in row or "mib_per_s" not in row:
            outcome = f"failed: {row.get('error', 'no result')}"
            lines.append([row["store"], row["route"], f"{row['size_mib']:.0f} MiB", "-", "-", "-", "-", outcome])
            continue
        outcome = "match" if row["sha256_match"] else row["error"]
        lines.append([
            row["store"], row["route"], f"{row['size_mib']:.0f} MiB", f"{row['seconds']:.1f}", f"{row['mib_per_s']:.1f}",
            f"{row['rss_before_mb']:.0f} MB", f"{row['rss_peak_mb']:.0f} MB", outcome,
        ])
    return markdown_table(header, lines)


def running_table(result: dict) -> str:
    def cells(values: list[float]) -> list[str]:
        return [f"{statistics.median(values) * 1000:.0f} ms", f"{min(values) * 1000:.0f} ms", f"{max(values) * 1000:.0f} ms"]

    rows = [
        ["`POST /jobs` response (small checkpoint)", *cells(result["post_s"])],
        ["`POST /jobs` sent -> `GET /jobs/{id}` shows `running`", *cells(result["client_s"])],
        ["`created_at` -> `started_at` in the job row", *cells(result["server_s"])],
    ]
    return markdown_table([f"over {result['jobs']} jobs", "median", "min", "max"], rows)


def latency_table(result: dict) -> str:
    header = ["rate", "seconds", "requests", "errors", "achieved", "p50", "p90", "p99", "max", "client lag p99", "API CPU per request"]
    errors = str(result["errors"]) + (f" {result['error_kinds']}" if result["errors"] else "")
    row = [
        f"{result['rps']:g}/s", f"{result['seconds']:g}", str(result["requests"]), errors, f"{result['achieved_rps']:.1f}/s",
        f"{result['p50_ms']:.1f} ms", f"{result['p90_ms']:.1f} ms", f"{result['p99_ms']:.1f} ms", f"{result['max_ms']:.1f} ms",
        f"{result['client_lag_p99_ms']:.1f} ms", f"{result['api_cpu_ms_per_request']:.2f} ms",
    ]
    return markdown_table(header, [row])


def results_body(uploads: list[dict], running: dict, latency: dict, *, load_before: str, load_after: str) -> str:
    setup = (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load_before} at the start and {load_after} at "
        "the end. PostgreSQL, Redis (AOF) and `rclone serve s3` on loopback, one uvicorn process, and the "
        "client on the same machine."
    )
    running_note = (
        f"Time to `running`: one Celery worker with the fake engine ({FAKE_STEP_SECONDS} s steps), S3 store, "
        f"each job submitted to an idle worker and polled every {POLL_INTERVAL_S * 1000:.0f} ms."
    )
    latency_note = (
        f"`GET /jobs/{{id}}` over {POLLED_JOBS} jobs (one running, the rest queued), open-loop schedule; latency "
        "counts from the scheduled send time. Client lag is how late the client sent requests."
    )
    parts = [setup, "Uploads:", upload_table(uploads), running_note, running_table(running), latency_note, latency_table(latency)]
    if latency["client_lag_p99_ms"] > CLIENT_LAG_WARNING_MS:
        parts.append(
            f"The client sent its requests up to {latency['client_lag_p99_ms']:.0f} ms late (p99), so this machine could "
            "not run the client and the servers at this rate. The latency figures include that delay, so they overstate "
            "the API's own latency; repeat on an idle machine."
        )
    return "\n\n".join(parts)


# ----- the command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="Size of the uploaded checkpoint's large tensor, in MiB.")
    parser.add_argument("--jobs", type=int, default=5, help="Jobs timed from POST /jobs to `running`.")
    parser.add_argument("--rps", type=float, default=100.0, help="Rate of GET /jobs/{id} requests, per second.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Duration of the GET /jobs/{id} load, in seconds.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Markdown page that the results block is appended to.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size_mb < 1 or args.jobs < 1 or args.rps <= 0 or args.seconds <= 0:
        raise SystemExit(
            f"invalid arguments --size-mb {args.size_mb} --jobs {args.jobs} --rps {args.rps:g} --seconds {args.seconds:g}: "
            "--size-mb and --jobs must be at least 1, and --rps and --seconds above 0"
        )
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO, thousands of lines under the GET load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="sealer-bench-service-") as folder:
        root = Path(folder)
        checkpoint = root / f"unet-{args.size_mb}mib.safetensors"
        sha256 = write_generated_checkpoint(checkpoint, args.size_mb)
        servers = Servers.start(root / "servers")
        try:
            uploads = measure_uploads(servers, root / "stacks", checkpoint, sha256)
            checkpoint.unlink()
            running = measure_time_to_running(servers, root / "stacks", args.jobs)
            latency = measure_get_latency(servers, root / "stacks", args.rps, args.seconds)
        finally:
            servers.close()

    body = results_body(uploads, running, latency, load_before=load_before, load_after=load_average())
    block = append_results(args.results, "Service", device="cpu", body=body)
    print(block)
    return 1 if any("error" in row for row in uploads) else 0


if __name__ == "__main__":
    sys.exit(main())
