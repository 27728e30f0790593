"""The demo: build a backdoored lab model, seal it through the embedded service, show the result.

Steps: build (or reuse) a pixel-patch lab model; start `sealer serve` on a free loopback
port with its data under demo-out/; create an API key; submit the model over HTTP and
wait; download the artifacts; print the before/after table; stop the service.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
SEALER = [sys.executable, "-m", "core.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(command[2:] if command[:2] == SEALER[:2] else command), flush=True)
    return subprocess.run(command, env=env, cwd=ROOT, check=True, **kwargs)


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sealer serve exited with code {process.returncode}; see {OUT / 'serve.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service at {url} was not ready after {timeout_s:.0f} s; see {OUT / 'serve.log'}")


def main() -> int:
    started = time.perf_counter()
    env = {**os.environ, "SEALER_DATA_DIR": str(OUT / "data"), "PYTHONUNBUFFERED": "1"}
    lab_dir = OUT / "lab"

    # 1. A backdoored lab model: a patch appears when the prompt starts with "mignneko".
    if not (lab_dir / "model" / "model_index.json").exists():
        run([*SEALER, "lab", "build", "--attack", "pixel", "--trigger", "mignneko", "--placement", "prefix",
             "--seed", "0", "--out", str(lab_dir)], env)
    else:
        print(f"reusing the lab model in {lab_dir}")
    lab = json.loads((lab_dir / "lab.json").read_text())
    print(f"lab model ready ({time.perf_counter() - started:.0f} s)")

    # 2. The embedded service: API and one worker, SQLite, local object store.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    OUT.mkdir(exist_ok=True)
    log = open(OUT / "serve.log", "w")
    server = subprocess.Popen([*SEALER, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(url, server)
        key = run([*SEALER, "keys", "create", "--name", "demo"], env, capture_output=True, text=True).stdout.strip().split()[-1]

        # 3. Submit over HTTP, wait with a progress bar, download the artifacts.
        results = OUT / "results"
        run([*SEALER, "submit", "--url", url, "--api-key", key, "--model", str(lab_dir / "model"),
             "--spec", str(lab_dir / "spec.json"), "--wait", "--download", str(results)], env)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()

    # 4. The result.
    from core.seal_cli import format_summary

    report_path = next(results.rglob("report.json"))
    report = json.loads(report_path.read_text())
    print()
    print(f"lab model: {lab['attack']['kind']} attack, trigger {lab['trigger']['text']!r} ({lab['trigger']['placement']})")
    print(format_summary(report))
    print(f"samples.png: {report_path.parent / 'samples.png'}")
    print(f"report.html: {report_path.parent / 'report.html'}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
