"""Throughput per worker process, end to end (Kafka in -> minute emitted), with baselines from the same run.

    make bench        # or: python -m tests.bench.bench_pipeline [--single N] [--batched N]

Rows: raw aiokafka consumption (getmany + orjson.loads), a bare Faust agent that only counts, our
worker on single-observation messages and on arrays of 500 observations, and the in-process
parse+aggregate loop alone. Rates are measured from the first batch to the last emitted minute, so
process start and group join are excluded everywhere. Prints a Markdown table (also written to
artifacts/bench.md). No assertions: targets are read off the ratios.
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
from pathlib import Path

import orjson

from app.clock import SystemClock
from app.local.embedded import DynamoServer, KafkaBroker
from app.local.traffic import Generator, produce
from app.ops.topics import ensure_topics
from app.settings import Settings
from tables.windows import IngestResult, PartitionWindows
from tests.integration.pipeline import ARTIFACTS, Pipeline

ROOT = Path(__file__).resolve().parents[2]


def make_traffic(n_obs: int, per_message: int) -> tuple[list[tuple[bytes, bytes]], int, int]:
    """Messages over ~10 minutes of event time, then one closer per app; returns (messages, obs, minutes)."""
    start_ms = int(time.time() * 1000) // 60_000 * 60_000 - 20 * 60_000
    gen = Generator(apps=4, dynos=4, seed=3, start_ms=start_ms)
    n_msgs = max(1, n_obs // per_message)
    span_ms = max(1, 10 * 60_000 * len(gen.apps) // n_msgs)
    msgs: list[tuple[bytes, bytes]] = []
    minutes: set[tuple[str, str, int]] = set()
    total = 0
    while total < n_obs:
        for app in gen.apps:
            obs = gen.batch(app, per_message, span_ms)
            for o in obs:
                proc = "web" if o["dyno"] == "router" else o["dyno"].split(".")[0]
                minutes.add((app, proc, o["ts"] // 60_000))
            if per_message == 1:
                msgs.extend((app.encode(), orjson.dumps(o)) for o in obs)  # the single-object form
            else:
                msgs.append((app.encode(), orjson.dumps(obs)))
            total += len(obs)
        gen.now_ms += span_ms
    closer_ts = gen.now_ms + 5 * 60_000
    for app in gen.apps:  # event time moves past every real minute's grace: all close by watermark
        msgs.append((app.encode(), orjson.dumps({"kind": "router", "app": app, "dyno": "web.1", "ts": closer_ts,
                                                 "status": 200, "service_ms": 1.0})))
    return msgs, total, len(minutes)


async def raw_aiokafka(bootstrap: str, topic: str, n_msgs: int) -> tuple[int, int, float]:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         group_id=f"raw-{uuid.uuid4().hex[:6]}", max_partition_fetch_bytes=8 * 1024 * 1024)
    await c.start()
    try:
        seen = obs = first = 0
        t0 = 0.0
        while seen < n_msgs:
            batch = await c.getmany(timeout_ms=1000, max_records=5000)
            for records in batch.values():
                for r in records:
                    v = orjson.loads(r.value)
                    obs += len(v) if isinstance(v, list) else 1
                if not t0 and records:
                    t0, first = time.perf_counter(), len(records)
                seen += len(records)
        return seen - first, obs, time.perf_counter() - t0
    finally:
        await c.stop()


def bare_faust(broker: KafkaBroker, topic: str, n_msgs: int, *, decode: bool = False) -> tuple[int, float, int]:
    """(messages, seconds, observations) of the bare agent, counted after its first batch."""
    out = Path(tempfile.mkdtemp()) / "bare.txt"
    env = {**os.environ, "BENCH_BROKER": broker.url, "BENCH_TOPIC": topic, "BENCH_N": str(n_msgs),
           "BENCH_OUT": str(out), "BENCH_DECODE": "1" if decode else "0"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.bare_faust", "worker", "-l", "warn"],
                            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not out.exists() or not out.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("bare Faust baseline did not finish")
            time.sleep(0.2)
        n, secs, obs = out.read_text().split()
        return int(n), float(secs), int(obs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def worker_run(broker: KafkaBroker, dynamo: DynamoServer, msgs: list[tuple[bytes, bytes]],
               minutes: int) -> tuple[int, float, dict[str, int]]:
    tmp = Path(tempfile.mkdtemp())
    p = Pipeline(broker, dynamo, tmp, METRICS_GRACE_S="5", METRICS_IDLE_TIMEOUT_S="600")
    asyncio.run(produce(broker.address, p.settings.kafka.observations_topic, msgs))
    p.start(data_dir=tmp / "state")
    try:
        s = p.wait_stats(lambda s: s["observations_accepted"] > 0, 300, "first batch")
        t0, first = time.perf_counter(), s["observations_accepted"]
        s = p.wait_stats(lambda s: s["minutes_emitted"] >= minutes, 900, "every minute emitted")
        secs = time.perf_counter() - t0
        return s["observations_accepted"] - first, secs, s
    finally:
        p.stop()


def hot_loop(msgs: list[tuple[bytes, bytes]]) -> tuple[int, float]:
    pw = PartitionWindows(0, clock=SystemClock(), grace_ms=5000, idle_timeout_ms=600_000, max_future_ms=300_000,
                          max_message_bytes=8 << 20, max_centroids=Settings().windows.digest_max_centroids)
    r = IngestResult()
    t0 = time.perf_counter()
    for i, (_, v) in enumerate(msgs):
        pw.ingest(i, v, r)
    for agg in pw.windows.values():
        agg.response.flush()
    return r.counts.accepted, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single", type=int, default=60_000, help="single-observation messages")
    ap.add_argument("--batched", type=int, default=2_000_000, help="observations sent as arrays of 500")
    args = ap.parse_args()
    broker, dynamo = KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="bench-kafka-"))), DynamoServer()
    broker.start()
    dynamo.start()
    rows: list[tuple[str, str, float, str]] = []
    try:
        single, _single_obs, single_minutes = make_traffic(args.single, 1)
        batched, batched_obs, batched_minutes = make_traffic(args.batched, 500)
        s = Settings()
        topics = {"single": f"bench-single-{uuid.uuid4().hex[:6]}", "batched": f"bench-batched-{uuid.uuid4().hex[:6]}"}
        for t in topics.values():
            asyncio.run(ensure_topics(broker.address, Settings.of(observations_topic=t, partitions=4).kafka))
        asyncio.run(produce(broker.address, topics["single"], single))
        asyncio.run(produce(broker.address, topics["batched"], batched))

        n, _, secs = asyncio.run(raw_aiokafka(broker.address, topics["single"], len(single)))
        raw_single = n / secs
        rows.append(("raw aiokafka getmany + orjson.loads", "1 obs/msg", raw_single, "msg/s"))
        n, obs, secs = asyncio.run(raw_aiokafka(broker.address, topics["batched"], len(batched)))
        rows.append(("raw aiokafka getmany + orjson.loads", "500 obs/msg", obs / secs * n / len(batched), "obs/s"))
        n, secs, _ = bare_faust(broker, topics["single"], len(single))
        bare = n / secs
        rows.append(("bare Faust agent, counts only (take 5000)", "1 obs/msg", bare, "msg/s"))
        _, secs, obs = bare_faust(broker, topics["batched"], len(batched), decode=True)
        bare_decode = obs / secs
        rows.append(("bare Faust agent + our JSON decode only, no aggregation", "500 obs/msg", bare_decode,
                     "obs/s"))
        n, secs, _ = worker_run(broker, dynamo, single, single_minutes)
        ours_single = n / secs
        rows.append(("minutely worker, Kafka in -> minute emitted", "1 obs/msg", ours_single, "obs/s = msg/s"))
        n, secs, _ = worker_run(broker, dynamo, batched, batched_minutes)
        ours_batched = n / secs
        rows.append(("minutely worker, Kafka in -> minute emitted", "500 obs/msg", ours_batched, "obs/s"))
        n, secs = hot_loop(batched)
        rows.append(("parse + validate + aggregate loop only (no Kafka)", "500 obs/msg", n / secs, "obs/s"))
        del s
    finally:
        dynamo.stop()
        broker.stop()

    lines = [
        f"Benchmark ({os.cpu_count()} cores, Apache Kafka {broker.version} on loopback, "
        f"{args.single:,} single-observation messages, {batched_obs:,} observations in arrays of 500, "
        f"{Settings().windows.digest_max_centroids}-centroid digests)",
        "",
        "| what | messages | rate | unit |",
        "|---|---|---:|---|",
        *[f"| {what} | {form} | {rate:,.0f} | {unit} |" for what, form, rate, unit in rows],
        "",
        f"- single-observation worker / bare Faust agent: **{ours_single / bare:.0%}** (target >= 90 %)",
        f"- batched worker: **{ours_batched:,.0f} obs/s** (target >= 1,000,000); a bare Faust agent that only "
        f"decodes the same messages: {bare_decode:,.0f} obs/s ({ours_batched / bare_decode:.0%} of it)",
        f"- single-observation worker / raw aiokafka: {ours_single / raw_single:.0%}",
    ]
    text = "\n".join(lines)
    print(text)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
