"""Run the long fault scenarios and the load scripts; print a table and write the results as JSON.

    python -m reliability.run [--quick] [--only NAME ...] [--results FILE] [--budget-s SECONDS]

Every server and process listens on 127.0.0.1 and is stopped before the command returns.
Each scenario bounds its own waits, and no scenario starts once `--budget-s` is spent.
The exit status is 1 when any scenario found a problem or did not run.
"""

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from reliability import load, scenarios
from reliability.scenarios import ScenarioResult
from reliability.stack import ScenarioError, Servers

logger = logging.getLogger("reliability.run")

Plan = list[tuple[str, Callable[[Servers, Path], ScenarioResult]]]


def build_plan(quick: bool) -> Plan:
    """Return the scenarios in run order; `quick` shortens outages and loads for a smoke run."""
    outage_s = 5 if quick else 30
    plan: Plan = [
        (f"kill-{phase}", lambda servers, root, phase=phase: scenarios.kill_worker_in_phase(servers, root, phase, pause_s=2.0))
        for phase in scenarios.KILL_PHASES
    ]
    plan += [
        ("redis-restart", lambda servers, root: scenarios.restart_redis(servers, root, down_s=5)),
        ("redis-crash", lambda servers, root: scenarios.restart_redis(servers, root, down_s=5, crash=True)),
        (
            "s3-state",
            lambda servers, root: scenarios.s3_outage(servers, root, during="state", outage_s=outage_s, retry_window_s=120),
        ),
        (
            "s3-artifacts",
            lambda servers, root: scenarios.s3_outage(servers, root, during="artifacts", outage_s=outage_s, retry_window_s=120),
        ),
        (
            "s3-long",
            lambda servers, root: scenarios.s3_outage(servers, root, during="artifacts", outage_s=45, retry_window_s=15),
        ),
        ("postgres-restart", lambda servers, root: scenarios.restart_postgres(servers, root, down_s=5)),
        ("api-upload", lambda servers, root: scenarios.kill_api_during_upload(servers, root, size_mb=64, upload_s=8)),
        ("duplicates", lambda servers, root: scenarios.duplicate_deliveries(servers, root)),
        ("frozen-worker", lambda servers, root: scenarios.frozen_worker(servers, root)),
        ("time-limit", lambda servers, root: scenarios.time_limit(servers, root, limit_s=3)),
        (
            "load-get",
            lambda servers, root: load.poll_job_latency(servers, root, duration_s=10 if quick else 30, jobs=20),
        ),
        (
            "load-upload",
            lambda servers, root: load.concurrent_uploads(servers, root, count=10, size_mb=50 if quick else 200),
        ),
    ]
    return plan


def run_plan(plan: Plan, root: Path, budget_s: float) -> list[ScenarioResult]:
    started = time.monotonic()
    results = []
    servers = Servers.start(root / "servers")
    try:
        for name, scenario in plan:
            if time.monotonic() - started > budget_s:
                results.append(ScenarioResult(name, "not run", problems=[f"not run: the {budget_s:.0f} s budget was spent"]))
                continue
            logger.info("scenario %s", name)
            try:
                result = scenario(servers, root / "scenarios")
            except ScenarioError as error:
                result = ScenarioResult(name, "aborted", problems=[f"aborted: {str(error)[:4000]}"])
            except Exception as error:  # A bug or an unreachable server in one scenario must not stop the rest.
                logger.exception("scenario %s raised", name)
                result = ScenarioResult(name, "aborted", problems=[f"aborted: {type(error).__name__}: {error}"])
            results.append(result)
            status = "passed" if result.passed else "FAILED: " + "; ".join(result.problems)[:2000]
            logger.info("scenario %s %s", name, status)
    finally:
        servers.close()
    return results


def format_table(results: list[ScenarioResult]) -> str:
    lines = [
        "| scenario | fault injected | jobs | lost | run twice | seconds | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        verdict = "passed" if result.passed else "FAILED"
        if result.passed and result.goals_missed:
            verdict = "passed, goal missed"
        lines.append(
            f"| {result.name} | {result.fault} | {result.jobs} | {result.lost} | {result.run_twice} | {result.seconds} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s outages and smaller loads, for a smoke run")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios (names as in the table)")
    parser.add_argument("--results", type=Path, default=Path("reliability-results.json"), help="JSON output file")
    parser.add_argument("--budget-s", type=float, default=1200, help="start no scenario after this many seconds")
    parser.add_argument("--work-dir", type=Path, help="folder for servers, logs and data (default: a temporary folder)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Each scenario polls the API several times a second; its request lines would drown the report.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    plan = build_plan(arguments.quick)
    if arguments.only:
        known = {name for name, _ in plan}
        unknown = sorted(set(arguments.only) - known)
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {sorted(known)}")
        plan = [(name, scenario) for name, scenario in plan if name in arguments.only]

    started = time.monotonic()
    if arguments.work_dir:
        results = run_plan(plan, arguments.work_dir, arguments.budget_s)
    else:
        with tempfile.TemporaryDirectory(prefix="sealer-reliability-") as folder:
            results = run_plan(plan, Path(folder), arguments.budget_s)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": _cpu_count(),
        "quick": arguments.quick,
        "wall_s": round(time.monotonic() - started, 1),
        "results": [result.__dict__ | {"passed": result.passed} for result in results],
    }
    arguments.results.write_text(json.dumps(report, indent=2, default=str))
    print(format_table(results))
    for result in results:
        if result.details:
            print(f"\n{result.name}: {json.dumps(result.details, default=str)}")
        for problem in result.problems:
            print(f"  problem: {problem[:1000]}")
        for goal in result.goals_missed:
            print(f"  goal missed: {goal}")
    print(f"\n{sum(result.passed for result in results)} of {len(results)} passed in {report['wall_s']} s; details in {arguments.results}")
    return 0 if all(result.passed for result in results) else 1


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
