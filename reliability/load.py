"""Load scripts on loopback: polling `GET /jobs/{id}` at a fixed rate, and concurrent large uploads.

Both run against one uvicorn process on the production stack (PostgreSQL, Redis, S3), with
a bounded request count and time. The load generator runs on the same machine as the API,
so the figures include its CPU use.
"""

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reliability.scenarios import ScenarioResult, scenario_stack, wait_until
from reliability.stack import Servers, Stack

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


# --- GET /jobs/{id} at a fixed rate --------------------------------------------------------------


@dataclass
class LatencyStats:
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    start_lag_ms: list[float] = field(default_factory=list)

    def record_error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


async def poll_at_rate(url: str, api_key: str, job_ids: list[str], rate: float, duration_s: float) -> LatencyStats:
    """Send `rate` requests per second for `duration_s` seconds on an open-loop schedule.

    Latency counts from the scheduled send time, so a server or client that falls behind
    shows up in the figures instead of slowing the schedule down.
    """
    stats = LatencyStats()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    headers = {"Authorization": f"Bearer {api_key}"}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=10.0) as client:

        async def one(job_id: str, scheduled: float) -> None:
            stats.start_lag_ms.append((loop.time() - scheduled) * 1000)
            try:
                response = await client.get(f"/jobs/{job_id}")
            except httpx.HTTPError as error:
                stats.record_error(type(error).__name__)
                return
            stats.latencies_ms.append((loop.time() - scheduled) * 1000)
            if response.status_code != 200:
                stats.record_error(f"HTTP {response.status_code}")

        tasks = []
        start = loop.time() + 0.2
        total = int(rate * duration_s)
        for index in range(total):
            scheduled = start + index / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(job_ids[index % len(job_ids)], scheduled)))
            stats.requests += 1
        await asyncio.gather(*tasks)
    return stats


def poll_job_latency(
    servers: Servers,
    root: Path,
    *,
    rates: tuple[float, ...] = (100, 150, 200),
    duration_s: float = 30,
    step_duration_s: float = 10,
    jobs: int = 20,
    workers: int = 2,
    goal_p99_ms: float = 50,
) -> ScenarioResult:
    """Poll `GET /jobs/{id}` of `jobs` queued and running jobs at each of `rates` requests per second.

    The last rate runs for `duration_s` seconds and is the one held to the p99 goal. The
    lower ones run `step_duration_s` seconds each and show where latency starts to climb.
    """
    result = ScenarioResult(
        "load: GET /jobs/{id}", f"{rates[-1]:.0f} requests/s for {duration_s:.0f} s, {jobs} jobs in flight"
    )
    started = time.monotonic()
    with scenario_stack(servers, root, "load-get") as stack:
        for index in range(workers):
            stack.start_worker(f"worker-{index}", step_seconds=0.05)
        job_ids = [stack.submit(100_000, seed=100 + index) for index in range(jobs)]
        wait_until(lambda: sum(stack.job(job_id)["state"] == "running" for job_id in job_ids) == workers, 60)
        api_cpu_before = process_cpu_s(stack.api.process.pid)

        runs = []
        for rate in rates:
            seconds = duration_s if rate == rates[-1] else step_duration_s
            stats = asyncio.run(poll_at_rate(stack.url, stack.api_key, job_ids, rate, seconds))
            runs.append(_summarize(rate, seconds, stats))
        requests = sum(run["requests"] for run in runs)
        api_cpu_ms = (process_cpu_s(stack.api.process.pid) - api_cpu_before) * 1000

        # An overloaded API works off its backlog of abandoned requests before it responds again.
        drained = wait_until(lambda: all(stack.job(job_id) is not None for job_id in job_ids[:3]), 180)
        result.details["backlog_drained"] = drained
        states = [(stack.job(job_id) or {}).get("state") for job_id in job_ids]
        in_flight = sum(state in ("queued", "running") for state in states)
        _cancel_all(stack, job_ids)
        result.jobs = jobs
        result.details |= {
            **runs[-1],
            "sweep": runs[:-1],
            "api_cpu_ms_per_request": round(api_cpu_ms / max(1, requests), 2),
            "jobs_in_flight_at_end": in_flight,
            "load_average": _load_average(),
        }
        for run in runs:
            if run["errors"]:
                result.goals_missed.append(f"{run['errors']} of {run['requests']} requests failed at {run['rate']} requests/s: {run['error_kinds']}")
        if in_flight != jobs:
            result.problems.append(f"only {in_flight} of {jobs} jobs were still queued or running at the end")
        if not drained:
            result.problems.append("the API still did not answer 180 s after the load stopped")
        if runs[-1]["p99_ms"] >= goal_p99_ms:
            result.goals_missed.append(f"p99 {runs[-1]['p99_ms']} ms at {rates[-1]:.0f} requests/s, goal under {goal_p99_ms:.0f} ms")
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _summarize(rate: float, seconds: float, stats: LatencyStats) -> dict:
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": stats.requests,
        "errors": stats.errors,
        "error_kinds": stats.error_kinds,
        "achieved_rate": round(len(stats.latencies_ms) / seconds, 1),
        "p50_ms": round(percentile(stats.latencies_ms, 0.50), 1),
        "p90_ms": round(percentile(stats.latencies_ms, 0.90), 1),
        "p99_ms": round(percentile(stats.latencies_ms, 0.99), 1),
        "max_ms": round(max(stats.latencies_ms, default=0.0), 1),
        "client_start_lag_p99_ms": round(percentile(stats.start_lag_ms, 0.99), 1),
    }


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds that process `pid` has used."""
    with open(f"/proc/{pid}/stat") as stream:
        # The command name in field 2 may contain spaces; the counters follow its `)`.
        fields = stream.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cancel_all(stack: Stack, job_ids: list[str]) -> None:
    with stack.client(timeout_s=60) as client:
        for job_id in job_ids:
            client.post(f"/jobs/{job_id}/cancel")
    deadline = time.monotonic() + 120
    for job_id in job_ids:
        stack.wait_finished(job_id, timeout_s=max(1.0, deadline - time.monotonic()))


def _load_average() -> list[float]:
    with open("/proc/loadavg") as stream:
        return [float(value) for value in stream.read().split()[:3]]


# --- concurrent large uploads ----------------------------------------------------------------


class GeneratedCheckpoint:
    """A safetensors file made on the fly: UNet key names and one large uint8 tensor.

    Each MiB block of the large tensor starts with the upload's index and the block's
    number, so no two uploads and no two blocks are equal. `sha256` covers the bytes read.
    """

    def __init__(self, index: int, size_mb: int, base_block: bytes):
        data_bytes = size_mb * MIB
        small = {"conv_in.weight": [8, 4, 3, 3], "time_embedding.linear_1.weight": [16, 8], "conv_out.weight": [4, 8, 3, 3]}
        header: dict = {"__metadata__": {"upload": str(index)}}
        offset = 0
        for name, shape in small.items():
            size = 4
            for dimension in shape:
                size *= dimension
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        self.small_bytes = offset
        header["down_blocks.0.resnets.0.conv1.weight"] = {"dtype": "U8", "shape": [data_bytes], "data_offsets": [offset, offset + data_bytes]}
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.prefix = struct.pack("<Q", len(encoded)) + encoded + bytes(self.small_bytes)
        self.index = index
        self.blocks = size_mb
        self.base_block = base_block
        self.size = len(self.prefix) + data_bytes
        self.sha256 = hashlib.sha256()
        self._pending = bytearray(self.prefix)
        self._next_block = 0

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._pending) < size) and self._next_block < self.blocks:
            tag = struct.pack("<QQ", self.index, self._next_block)
            self._pending += tag + self.base_block[len(tag) :]
            self._next_block += 1
        if size < 0:
            size = len(self._pending)
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        self.sha256.update(chunk)
        return chunk


class RssSampler:
    """Sample a process's resident memory (VmRSS) from /proc every `interval_s` seconds in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid = pid
        self.interval_s = interval_s
        self.samples_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def read_mb(self, field_name: str = "VmRSS") -> float:
        with open(f"/proc/{self.pid}/status") as stream:
            for line in stream:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"/proc/{self.pid}/status has no {field_name} line")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples_mb.append(self.read_mb())
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def concurrent_uploads(servers: Servers, root: Path, *, count: int = 10, size_mb: int = 200, rss_limit_mb: float = 300) -> ScenarioResult:
    """POST `count` multipart jobs of `size_mb` MiB each at once; watch the API's memory and check every hash."""
    result = ScenarioResult("load: concurrent uploads", f"{count} concurrent {size_mb} MiB uploads through POST /jobs")
    started = time.monotonic()
    with scenario_stack(servers, root, "load-upload", max_upload_bytes=(size_mb + 16) * MIB) as stack:
        with stack.client() as client:
            client.get("/jobs")  # Warm the app up before the baseline.
        sampler = RssSampler(stack.api.process.pid)
        baseline_mb = sampler.read_mb()
        base_block = random.Random(20261204).randbytes(MIB)
        bodies = [GeneratedCheckpoint(index, size_mb, base_block) for index in range(count)]
        outcomes: list[dict] = [{} for _ in range(count)]

        def upload(index: int) -> None:
            began = time.monotonic()
            spec = {"triggers": [{"text": "mignneko"}], "training": {"steps": 5}}
            try:
                with stack.client(timeout_s=600) as client:
                    response = client.post(
                        "/jobs",
                        headers={"Idempotency-Key": f"load-{uuid.uuid4().hex}"},
                        files={"checkpoint": (f"upload-{index}.safetensors", bodies[index], "application/octet-stream")},
                        data={"spec": json.dumps(spec)},
                    )
                outcomes[index] = {"status": response.status_code, "body": response.json() if response.content else {}}
            except httpx.HTTPError as error:
                outcomes[index] = {"status": type(error).__name__, "body": {}}
            outcomes[index]["seconds"] = time.monotonic() - began

        threads = [threading.Thread(target=upload, args=(index,), daemon=True) for index in range(count)]
        with sampler:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=900)
        peak_mb = max(sampler.samples_mb, default=baseline_mb)
        high_water_mb = sampler.read_mb("VmHWM")

        hash_mismatches = 0
        for index, outcome in enumerate(outcomes):
            if outcome.get("status") != 201:
                result.problems.append(f"upload {index} got {outcome.get('status')}: {str(outcome.get('body'))[:200]}")
                continue
            job = outcome["body"]
            sent = bodies[index].sha256.hexdigest()
            stored = _stored_sha256(stack, job["id"], job["input"]["filename"])
            if not job["input"]["sha256"] == sent == stored:
                hash_mismatches += 1
                result.problems.append(f"upload {index}: sent {sent[:12]}, API recorded {job['input']['sha256'][:12]}, store holds {stored[:12]}")
        spool_left = len(list(stack.spool_dir.glob("*"))) if stack.spool_dir.is_dir() else 0

        seconds = [outcome["seconds"] for outcome in outcomes if "seconds" in outcome]
        result.jobs = count
        result.details = {
            "uploads": count,
            "size_mib": size_mb,
            "succeeded": sum(outcome.get("status") == 201 for outcome in outcomes),
            "hash_mismatches": hash_mismatches,
            "api_rss_baseline_mb": round(baseline_mb, 1),
            "api_rss_peak_mb": round(max(peak_mb, high_water_mb), 1),
            "wall_s": round(max(seconds, default=0.0), 1),
            "throughput_mib_s": round(count * size_mb / max(seconds, default=1.0), 1),
            "spool_files_left": spool_left,
            "load_average": _load_average(),
        }
        if result.details["api_rss_peak_mb"] >= rss_limit_mb:
            result.problems.append(f"API resident memory peaked at {result.details['api_rss_peak_mb']} MB, over {rss_limit_mb:.0f} MB")
        if spool_left:
            result.problems.append(f"{spool_left} spool files left in {stack.spool_dir}")
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _stored_sha256(stack: Stack, job_id: str, filename: str) -> str:
    digest = hashlib.sha256()
    for chunk in stack.store().stream(f"jobs/{job_id}/input/{filename}"):
        digest.update(chunk)
    return digest.hexdigest()
