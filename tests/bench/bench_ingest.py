"""Drain lines per second for one ingest process, HTTP in -> Kafka acknowledged (acks=all).

    make bench    # or: python -m tests.bench.bench_ingest [--lines N]

The load comes from a separate process (tests/bench/drain_client.py, aiohttp, 16 connections) posting
Logplex frames of 500 lines (Heroku router lines with runtime samples mixed in). Rows: parse-only speed in
this process, then end to end without and with Frame-Ids (dynalite dedup claims), for the ingest producer's
default 1 MB batches and for 4 MB batches (which need the brokers' message.max.bytes raised).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.cli import start_role, wait_http, worker_env
from app.ingest.logplex import parse_frame
from app.local import loadgen
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.local.traffic import Generator
from app.ops.topics import ensure_topics
from app.settings import Settings
from app.storage.backends import token_table
from app.storage.tokens import TokenStore

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


AT_CAPACITY = {  # one app at the process's capacity: its own limits lifted
    "METRICS_LIMIT_INGEST_RATE_BYTES_S": str(10**9), "METRICS_LIMIT_INGEST_BURST_BYTES": str(10**9),
    "METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN": str(10**9), "METRICS_INGEST_MAX_WAITING_PER_APP": "1000",
    "METRICS_INGEST_MAX_ACTIVE_REQUESTS": "1000",
}
"""The ingest's settings for a benchmark of one app."""


def create_token(settings: Settings, app: str, kind: str) -> str:
    async def create() -> str:
        store = TokenStore(settings.web, table=token_table(settings))
        await store.start()
        try:
            return (await store.create(app, kind))[0]
        finally:
            await store.stop()
    return asyncio.run(create())


def build_frames(n_lines: int, per_frame: int = 500, *,
                 keep: Callable[[dict[str, Any]], bool] = lambda o: True) -> list[tuple[bytes, int]]:
    """The load generator's drain lines (app/local/traffic.py, realistic): router requests (with the
    router's own errors, no service time), runtime samples, add-on metrics, platform events, l2met lines.
    ``keep`` selects observations to render."""
    gen = Generator(apps=1, dynos=4, seed=9, start_ms=int(time.time() * 1000) - 3_600_000, realistic=True)
    lines: list[bytes] = []
    while len(lines) < n_lines:
        for o in gen.batch("app-0", 1000, 1000):
            if keep(o):
                lines.extend(loadgen.render(loadgen.as_logged(o)))
        gen.now_ms += 1000
    lines = lines[:n_lines]
    return [(loadgen.frame(lines[i:i + per_frame]), len(lines[i:i + per_frame]))
            for i in range(0, len(lines), per_frame)]


def classic(o: dict[str, Any]) -> bool:
    """The mix before the real-world formats: served router requests and runtime samples."""
    return o["kind"] == "runtime" or (o["kind"] == "router" and o.get("service_ms") is not None)


def outage(o: dict[str, Any]) -> bool:
    """An outage: every line an error the router answered itself (H10/H14, empty fields: the slow path)."""
    return o["kind"] == "router" and o.get("service_ms") is None


def parse_rate(frames: list[tuple[bytes, int]]) -> float:
    t0 = time.perf_counter()
    for body, _ in frames:
        parse_frame(body, "app-0")
    return sum(n for _, n in frames) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    frames = build_frames(args.lines)
    n_lines = sum(n for _, n in frames)
    kinds = Counter(orjson.loads(o)["kind"] for body, _ in frames for o in parse_frame(body, "app-0").encoded)
    mix = ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items()))
    # Same run, same process: the lines this parser took before the real-world formats are the baseline.
    rate_mix = parse_rate(frames)
    rate_classic = parse_rate(build_frames(args.lines, keep=classic))
    rate_outage = parse_rate(build_frames(args.lines // 4, keep=outage))

    # The broker accepts batches up to 8 MB, so the ingest's batch size (METRICS_KAFKA_MAX_BATCH_BYTES) is
    # what each row varies: 1 MB fits every broker's default message.max.bytes, 4 MB needs it raised.
    broker = KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="bench-kafka-")),
                         properties={"message.max.bytes": str(8 * 1024 * 1024)})
    dynamo = DynamoServer()
    broker.start()
    dynamo.start()
    uid = uuid.uuid4().hex[:6]
    overrides = {"METRICS_OBSERVATIONS_TOPIC": f"bi-{uid}", "METRICS_DLQ_TOPIC": f"bid-{uid}",
                 "METRICS_TABLE_NAME": f"bi-{uid}", "METRICS_PARTITIONS": "4",
                 # the topic's own max.message.bytes (1 MB by default, app/ops/topics.py) raised with the broker's
                 "METRICS_TOPIC_MAX_MESSAGE_BYTES": str(8 * 1024 * 1024)}
    settings = Settings.from_env({**overrides, "METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint})
    rows: list[tuple[str, float]] = [("parse only (this process, no HTTP/Kafka)", rate_mix),
                                     ("parse only, served requests and runtime samples only (baseline)", rate_classic),
                                     ("parse only, an outage: every line an H10/H14 with empty fields", rate_outage)]
    try:
        asyncio.run(ensure_topics(broker.address, settings.kafka))

        tok = create_token(settings, "app-0", "drain")
        path = Path(tempfile.mkdtemp()) / "frames.json"
        path.write_bytes(orjson.dumps([(b.decode("latin-1"), n) for b, n in frames]))
        for batch_label, batch_bytes in (("1 MB batches, the default", 1_000_000),
                                         ("4 MB batches, broker message.max.bytes raised", 4 * 1024 * 1024)):
            port = free_port()
            proc = start_role("ingest", worker_env(broker.url, dynamo.endpoint, data_dir=tempfile.mkdtemp(),
                                                   web_port=port, extra={**overrides,
                                                   "METRICS_ADMIN_PORT": str(free_port()), **AT_CAPACITY,
                                                   "METRICS_KAFKA_MAX_BATCH_BYTES": str(batch_bytes)}))
            try:
                # Ready, not only alive: the producer has connected (a 503 before would count as a failure).
                wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc)
                for label, extra in ((f"end to end, HTTP in -> Kafka acked (no Frame-Id), {batch_label}", []),
                                     (f"end to end, with Logplex-Frame-Id dedup (dynalite), {batch_label}",
                                      ["--frame-ids"])):
                    out = subprocess.run([sys.executable, "-m", "tests.bench.drain_client",
                                          f"http://127.0.0.1:{port}/v1/drains/logplex", tok, str(path),
                                          str(args.concurrency), *extra], cwd=str(ROOT), capture_output=True,
                                         text=True, check=True, env=os.environ)
                    lines, secs, failures = out.stdout.split()
                    if int(failures):
                        raise RuntimeError(f"{failures} frames were not accepted: {out.stderr.strip()[-500:]}")
                    rows.append((label, int(lines) / float(secs)))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    finally:
        dynamo.stop()
        broker.stop()
    text = "\n".join([
        f"Ingest benchmark ({os.cpu_count()} cores, {n_lines:,} drain lines in frames of 500, load from a separate "
        f"process with {args.concurrency} connections)", "",
        "| what | lines/s |", "|---|---:|", *[f"| {w} | {r:,.0f} |" for w, r in rows], "",
        f"- observations parsed from the {n_lines:,} lines of the mix: {mix}",
        f"- parsing vs the baseline mix: real-world mix **{rate_mix / rate_classic:.0%}**, outage lines "
        f"**{rate_outage / rate_classic:.0%}**",
        f"- end to end vs target 200,000 lines/s: **{rows[3][1] / 200_000:.0%}** with 1 MB batches, "
        f"**{rows[5][1] / 200_000:.0%}** with 4 MB batches",
    ])
    print(text)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-ingest.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
