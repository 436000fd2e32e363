"""Both stores from one process: ``python -m tests.bench.bench_stores`` (``make bench-stores``).

In the same run, on this machine: DynamoDB (dynalite) and Apache Cassandra 5.0 (the embedded node) each
get the read benchmark's data (tests/bench/bench_query.py: 24 h of minutes with rollups and summary blocks,
30 days of coarser buckets). Measured per store:

* write rate: 10,080 one-minute digest items (~1,000 requests each) through the store's ``put_many`` in
  batches of 500, as the sink writes them;
* uncached query latency in-process (caches off): 24 h at 1 min and 7 d at 2 h, p50/p99 of 200 each;
* the cost of shadow reads: the serving latency (DynamoDB) with shadow 0 % and 100 % (each read also runs
  on Cassandra in the background, compared), 300 requests each, alternating rounds. Target: < 5 % added p99.

Prints a Markdown table and writes artifacts/bench-stores.md. No assertion on timings.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from app.api.query import MetricsQuery
from app.local.embedded import CassandraServer, DynamoServer
from app.migration import state as sm
from app.migration.reads import Engines, MigratingQuery, ReadStats
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.backends import metrics_store
from app.storage.protocol import MetricItem
from tests.bench.bench_query import APP, PROC, load_data, minute

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
WRITE_ITEMS = 10_080
QUERIES = 200
SHADOW_REQUESTS = 300


def pct(xs: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(xs), q)) * 1000


async def write_rate(settings: Settings, now_s: int) -> float:
    rng = np.random.default_rng(7)
    start = now_s - now_s % 60 - WRITE_ITEMS * 60
    items = [MetricItem("writes", PROC, 60, t, orjson.dumps(minute(rng, "writes", t, 1000).to_record()))
             for t in range(start, start + WRITE_ITEMS * 60, 60)]
    store = metrics_store(settings)
    await store.start()
    try:
        t0 = time.perf_counter()
        for i in range(0, len(items), 500):
            await store.put_many(items[i:i + 500])
        return len(items) / (time.perf_counter() - t0)
    finally:
        await store.stop()


async def query_latency(settings: Settings, now_s: int) -> dict[str, tuple[float, float]]:
    store = metrics_store(settings)
    await store.start()
    try:
        q = MetricsQuery(store, settings=settings.replace(query_cache_max_bytes=0, query_tail_ttl_s=0.0))
        out = {}
        for label, res, since in (("24 h at 1 min", 60, now_s - 86400), ("7 d at 2 h", 7200, now_s - 7 * 86400)):
            await q.answer(APP, PROC, res, since, now_s)  # warm the connection and the prepared statements
            times = []
            for _ in range(QUERIES):
                t0 = time.perf_counter()
                await q.answer(APP, PROC, res, since, now_s)
                times.append(time.perf_counter() - t0)
            out[label] = (pct(times, 0.5), pct(times, 0.99))
        return out
    finally:
        await store.stop()


async def shadow_cost(settings: Settings, now_s: int, *,
                      cached: bool) -> dict[int, tuple[float, float, dict[str, int]]]:
    """Serving latency from DynamoDB with shadow 0 % and 100 % against Cassandra, caches off (every read goes
    to both stores) or on (the defaults: a repeated range is served from cache, its shadow too)."""
    off = settings.replace(store="dynamodb")
    if not cached:
        off = off.replace(query_cache_max_bytes=0, query_tail_ttl_s=0.0)
    start = sm.start(sm.initial(off), off, "cassandra", backfill=False, now_ms=(now_s - 3 * 86400) * 1000)
    states = {0: start, 100: sm.shadow(start, 100, aa=False, now_ms=now_s * 1000)}
    current = [states[0]]
    counters = Counters()
    stats = ReadStats()
    engines = Engines(off, stats)
    q = MigratingQuery(off, lambda: current[0], engines, stats=stats, counters=counters)
    times: dict[int, list[float]] = {0: [], 100: []}
    try:
        for pct_ in (0, 100):  # warm both engines
            current[0] = states[pct_]
            await q.answer(APP, PROC, 60, now_s - 86400, now_s)
            await q.drain()
        for _ in range(SHADOW_REQUESTS // 20):
            for pct_ in (0, 100):
                current[0] = states[pct_]
                for _ in range(20):
                    t0 = time.perf_counter()
                    await q.answer(APP, PROC, 60, now_s - 86400, now_s)
                    times[pct_].append(time.perf_counter() - t0)
                await q.drain()  # the shadows of this round finish before the next round
        snap = counters.snapshot()
        shadow = {k: snap[k] for k in ("shadow_reads", "shadow_matched", "shadow_points_compared",
                                       "shadow_mismatch_value", "shadow_mismatch_missing", "shadow_failed")}
        return {p: (pct(t, 0.5), pct(t, 0.99), shadow if p else {}) for p, t in times.items()}
    finally:
        await engines.stop()


async def run(dynamo: DynamoServer, cassandra: CassandraServer) -> str:
    now_s = int(time.time())
    base = Settings.of(dynamodb_endpoint=dynamo.endpoint, cassandra_port=cassandra.port, table_name="bench-stores",
                       cassandra_keyspace="bench_stores")
    rows: list[str] = []
    writes: dict[str, float] = {}
    latency: dict[str, dict[str, tuple[float, float]]] = {}
    for store in ("dynamodb", "cassandra"):
        s = base.replace(store=store)
        await load_data(s, now_s)
        writes[store] = await write_rate(s, now_s)
        latency[store] = await query_latency(s, now_s)
    shadows = {cached: await shadow_cost(base, now_s, cached=cached) for cached in (False, True)}
    rows.append("| measure | DynamoDB (dynalite) | Cassandra 5.0 | Cassandra / DynamoDB |")
    rows.append("|---|---:|---:|---:|")
    rows.append(f"| write, one-minute items/s | {writes['dynamodb']:,.0f} | {writes['cassandra']:,.0f} | "
                f"{writes['cassandra'] / writes['dynamodb']:.2f} |")
    for label in latency["dynamodb"]:
        for i, name in ((0, "p50"), (1, "p99")):
            d, c = latency["dynamodb"][label][i], latency["cassandra"][label][i]
            rows.append(f"| uncached {label}, {name} ms | {d:.1f} | {c:.1f} | {c / d:.2f} |")
    rows.append("")
    rows.append("| serving (DynamoDB), 24 h at 1 min | shadow 0 % | shadow 100 % | added |")
    rows.append("|---|---:|---:|---:|")
    for cached, shadow in shadows.items():
        for name, a, b in (("p50", shadow[0][0], shadow[100][0]), ("p99", shadow[0][1], shadow[100][1])):
            rows.append(f"| {'cached' if cached else 'uncached'}, {name} ms | {a:.2f} | {b:.2f} | "
                        f"{100 * (b - a) / a:+.1f} % |")
    rows.append("")
    for cached, shadow in shadows.items():
        rows.append(f"shadow reads ({'cached' if cached else 'uncached'}): {shadow[100][2]}")
    return "\n".join(rows)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dynamo = DynamoServer()
        node = CassandraServer(data_dir=Path(tmp) / "cassandra")
        dynamo.start()
        node.start()
        try:
            table = asyncio.run(run(dynamo, node))
        finally:
            node.stop()
            dynamo.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-stores.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

