"""Command-line entry points besides Faust's own (``python -m app worker``).

``python -m app local [--no-demo]`` runs the whole pipeline on one machine: the embedded broker and
DynamoDB, a worker (stream jobs + web API) and demo traffic. Ctrl-C stops all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from app.embedded import EmbeddedBroker, EmbeddedDynamo, free_port


def worker_env(broker_url: str, dynamodb_endpoint: str, *, data_dir: str, web_port: int,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "METRICS_BROKER_URL": broker_url,
        "METRICS_DYNAMODB_ENDPOINT": dynamodb_endpoint,
        "METRICS_DATA_DIR": data_dir,
        "METRICS_WEB_PORT": str(web_port),
    })
    env.update(extra or {})
    return env


def start_worker(env: dict[str, str], *, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen([sys.executable, "-m", "app", "worker", "-l", "info"], env=env,
                            stdout=out or None, stderr=subprocess.STDOUT if out else None,
                            cwd=str(Path(__file__).resolve().parent.parent))


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode} before serving {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def local(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m app local", description=__doc__)
    ap.add_argument("--no-demo", action="store_true", help="start without demo traffic")
    ap.add_argument("--rate", type=int, default=2000, help="demo router requests per second")
    ap.add_argument("--apps", type=int, default=3)
    ap.add_argument("--web-port", type=int, default=int(os.environ.get("METRICS_WEB_PORT", "6066")))
    args = ap.parse_args(argv)

    broker, dynamo = EmbeddedBroker(), EmbeddedDynamo()
    worker: subprocess.Popen[bytes] | None = None
    try:
        broker.start()
        dynamo.start()
        from app.admin import ensure_topics
        from app.settings import Settings

        asyncio.run(ensure_topics(broker.address, Settings.from_env()))
        # The broker is memory-only: window state from an earlier run would not match it.
        data_dir = tempfile.mkdtemp(prefix="minutely-")
        env = worker_env(broker.url, dynamo.endpoint, data_dir=data_dir, web_port=args.web_port)
        worker = start_worker(env)
        wait_http(f"http://127.0.0.1:{args.web_port}/healthz", 120, worker)
        print(f"\nbroker      {broker.address} (Kafka protocol, tansu)")
        print(f"dynamodb    {dynamo.endpoint} ({dynamo.kind})")
        print(f"query       http://127.0.0.1:{args.web_port}/v1/apps/app-0/metrics?process_type=web")
        print(f"counters    http://127.0.0.1:{args.web_port}/v1/stats")
        print("demo        " + ("off" if args.no_demo else f"{args.rate} requests/s over {args.apps} apps"))
        print("Ctrl-C stops everything.\n", flush=True)
        asyncio.run(_serve(broker.address, args, worker))
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        dynamo.stop()
        broker.stop()
        print("stopped.", flush=True)
    return 0


async def _serve(bootstrap: str, args: argparse.Namespace, worker: subprocess.Popen[bytes]) -> None:
    from app.settings import Settings
    from app.traffic import run_demo

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    if not args.no_demo:
        tasks.append(asyncio.create_task(run_demo(bootstrap, Settings.from_env().observations_topic,
                                                  rate_per_s=args.rate, apps=args.apps, stop=stop)))
    while not stop.is_set() and worker.poll() is None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "local":
        return local(sys.argv[2:])
    # Everything else is a Faust command (worker, tables, agents, ...).
    import app.worker  # noqa: F401 - registers the agents, timer and web service on the Faust app
    from app.app import app as faust_app

    faust_app.main()
    return 0


__all__ = ["main", "local", "worker_env", "start_worker", "wait_http", "free_port"]
