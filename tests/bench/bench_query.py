"""Read-path benchmark: ``python -m tests.bench.bench_query`` (``make bench-query``).

dynalite holds the same data twice, as two apps: 24 h of one-minute items (1000 requests each, ~1000-centroid
digests) with their rollups, 6 more days of 10 min / 1 h rollups and 29 more days of 2 h rollups.
``bench`` is written as the rollup job writes it (agents/rollup.py: rollup items and summary blocks);
``legacy`` has the digest items only, as written before summary blocks, so its queries take the digest
fallback: the baseline, measured in the same run. A web process (``python -m app web``: auth, caches)
serves them; the load comes from ``wrk`` (Debian package) in a separate process. Measured: 24 h at 1 min
(1,440 points), 7 d and 30 d at the automatic resolution (2 h: 84 and 360 points), uncached (caches off)
and cached (default settings), the in-process cost of precomputed rollups against merging minutes at
read time, and the bytes and DynamoDB read units behind each uncached query. The Prometheus HTTP API
(app/api/prometheus/http.py) is measured in the same runs: ``query_range`` over the same 24 h at step=60, two
queries, uncached (the same settings turn its rendered-answer, series and process-type caches off: they are
sized from METRICS_QUERY_CACHE_MAX_BYTES) and cached, each against the native 24 h row of the same mode and
connections. Its process types come from the catalog (app/storage/catalog.py), written for every day of data.
Prints a Markdown table and writes artifacts/bench-query.md. No assertion on timings.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agents.rollup import Rollup
from app.api.query import MetricsQuery
from app.cli import start_role, wait_http, worker_env
from app.local.embedded import DynamoServer, free_port
from app.ops.stats import Counters
from app.settings import Settings
from app.storage import catalog
from app.storage.backends import metrics_store, token_table
from app.storage.dynamodb import PROGRESS_PK, DynamoStore, item_size_bytes
from app.storage.protocol import SUMMARY, MetricItem, Progress
from app.storage.tokens import TokenStore
from tables.aggregate import ROLLUP_RESOLUTIONS, Aggregate, BucketKey
from tables.record import decode as decode_stored
from tables.record import encode as encode_stored
from tables.summary import BLOCK_SPAN_S, SummaryBlock, block_of, point_json

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
APP, LEGACY, PROC = "bench", "legacy", "web"
DURATION_S = int(os.environ.get("BENCH_DURATION_S", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
OLDER_DAYS = {600: 6, 3600: 6, 7200: 29}
"""Days of rollups before the 24 h of minutes, per resolution (what the automatic resolution reads)."""
PROM_QUERIES = ('sum by (status_class) (minutely_requests{app="bench"})', 'minutely_response_time_ms{quantile="0.99"}')
"""The Prometheus rows' PromQL: an aggregation over the status classes, and one series picked by a label."""
PROM_UNCACHED_TARGET = "target p99 <= 20 ms and <= 1.5x native"
PROM_CACHED_TARGET = "target >= 2,000 req/s"


def minute(rng: np.random.Generator, app: str, start_s: int, n: int) -> Aggregate:
    a = Aggregate(BucketKey(app, PROC, start_s * 1000))
    for i, v in enumerate(rng.lognormal(3.0, 0.8, n)):
        a.add_request(200 if i % 40 else 503, float(v), "H12" if i % 200 == 0 else None)
    a.add_runtime(300.0, 0.0, 420.0, 512.0, 0.7)
    return a


def renamed(agg: Aggregate, app: str) -> Aggregate:
    rec = agg.to_record()
    rec["app"] = app
    return Aggregate.from_record(rec)


async def load_data(settings: Settings, now_s: int) -> dict[str, str]:
    """The two copies of the data; returns a read token per app."""
    rng = np.random.default_rng(1)
    store = metrics_store(settings)  # METRICS_STORE's backend (tests/bench/bench_stores.py loads both)
    await store.start()
    tokens = TokenStore(settings.web, table=token_table(settings))
    await tokens.start()
    try:
        first = (now_s - 86400) - (now_s - 86400) % 7200
        minutes = [minute(rng, APP, t, 1000) for t in range(first, now_s - now_s % 60, 60)]
        records = [orjson.dumps(m.to_record()) for m in minutes]
        # bench: the sink's minute items, then the rollup job over the same minutes (its batches of 500)
        await store.put_many([MetricItem(APP, PROC, 60, m.key.start_ms // 1000, encode_stored(m))
                               for m in minutes])
        rollup = Rollup({}, store, settings.storage, settings.query, Counters(), context_topic="metrics-1m")
        for i in range(0, len(records), 500):
            await rollup.process([(0, r) for r in records[i:i + 500]])
        # What a caught-up pipeline has stored: through the last closed minute's flush boundary.
        through_ms = (await rollup.flush({0: (now_s - now_s % 60) * 1000}))[0]
        # legacy: the same minutes and rollup items, without blocks
        items = [MetricItem(LEGACY, PROC, 60, m.key.start_ms // 1000, encode_stored(renamed(m, LEGACY)))
                 for m in minutes]
        for res in ROLLUP_RESOLUTIONS:
            for it in await store.query(APP, PROC, res, first, now_s + 1):
                agg, mins = decode_stored(it.payload)
                items.append(MetricItem(LEGACY, PROC, res, it.ts_s, encode_stored(renamed(agg, LEGACY), mins=mins)))
        # older days: one synthetic bucket-sized aggregate each (same size class as a real rollup), for both
        # apps; bench also gets the summary blocks the rollup job would have written for them
        blocks: dict[tuple[int, int], SummaryBlock] = {}
        for res in ROLLUP_RESOLUTIONS:
            for b in range(first - OLDER_DAYS[res] * 86400, first, res):
                agg = minute(rng, APP, b, 2000)
                agg.resolution_s = res
                items.append(MetricItem(APP, PROC, res, b, encode_stored(agg)))
                items.append(MetricItem(LEGACY, PROC, res, b, encode_stored(renamed(agg, LEGACY))))
                key = (res, block_of(b, res))
                if key not in blocks:
                    blocks[key] = SummaryBlock(res, key[1], since_s=first - OLDER_DAYS[res] * 86400)
                blocks[key].put(b, point_json(agg))
        # merge with the blocks the rollup job wrote for the first 24 h (the block at `first` is shared)
        for (res, start), block in blocks.items():
            stored = await store.query(APP, PROC, res, start, start + 1, SUMMARY)
            if stored:
                written = SummaryBlock.decode(stored[0].payload)
                block.points.update(written.points)
                block.through.update(written.through)
            items.append(MetricItem(APP, PROC, res, start, block.encode(), SUMMARY, BLOCK_SPAN_S[res]))
        # The process-type catalog, as the rollup job writes it (agents/rollup.py): one item per app and day
        # of data, through the store; the Prometheus API reads the process types from it.
        oldest = first - max(OLDER_DAYS.values()) * 86400
        items += [catalog.catalog_item(app, day, [PROC]) for app in (APP, LEGACY)
                  for day in range(catalog.day_of(oldest), now_s + 1, catalog.DAY_S)]
        for i in range(0, len(items), 500):
            await store.put_many(items[i:i + 500])
        # A caught-up pipeline: every partition stored as far as the flush said (agents/progress.py).
        await store.put_progress([Progress(p, through_ms, now_s * 1000, {}) for p in range(settings.kafka.partitions)])
        return {app: (await tokens.create(app, "read"))[0] for app in (APP, LEGACY)}
    finally:
        await tokens.stop()
        await store.stop()


def wrk(url: str, token: str, *, connections: int, duration_s: int,
        extra_header: str | None = None) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from wrk --latency."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "10s",
           "-H", f"Authorization: Bearer {token}"]
    if extra_header:
        cmd += ["-H", extra_header]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if rps is None or non2xx is not None:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(rps.group(1)), ms("50"), ms("99")


def etag_of(url: str, token: str) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.headers["ETag"])


def prom_url(port: int, query: str, start_s: int, end_s: int, step_s: int) -> str:
    """A GET ``query_range`` with the expression URL-encoded (wrk sends one fixed request)."""
    params = urllib.parse.urlencode({"query": query, "start": start_s, "end": end_s, "step": step_s})
    return f"http://127.0.0.1:{port}/api/v1/query_range?{params}"


def prom_warm(url: str, token: str) -> int:
    """Warm-up: the answer's number of samples; raises if it has none, so no row measures an empty answer."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = orjson.loads(r.read())
    samples = sum(len(s["values"]) for s in doc["data"]["result"]) if doc.get("status") == "success" else 0
    if samples == 0:
        raise RuntimeError(f"Prometheus answer has no samples: {url}\n{str(doc)[:500]}")
    return samples


async def in_process(settings: Settings, now_s: int) -> list[tuple[str, float]]:
    """Uncached in-process cost per query: summary blocks, digests (rollup items), minutes merged at read
    time. Median of 5."""
    store = DynamoStore(settings.storage, settings.dynamodb)
    await store.start()
    out = []
    try:
        off = settings.replace(query_cache_max_bytes=0, query_tail_ttl_s=0.0)
        for label, res, since in (("24 h at 1 min", 60, now_s - 86400), ("24 h at 10 min", 600, now_s - 86400),
                                  ("7 d at 2 h", 7200, now_s - 7 * 86400)):
            ways = [("summary blocks", APP, True), ("digests: minutes or rollup items", LEGACY, True)]
            if res != 60:
                ways.append(("digests: minutes merged at read time", LEGACY, False))
            for way, app, use in ways:
                q = MetricsQuery(store, settings=off.replace(query_use_rollups=use))
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    await q.answer(app, PROC, res, since, now_s)
                    times.append(time.perf_counter() - t0)
                out.append((f"{label}, {way}", float(np.median(times)) * 1000))
    finally:
        await store.stop()
    return out


READ_UNIT_BYTES = 4096
"""DynamoDB bills a Query by the summed size of the items it reads (whole items, whatever the projection),
rounded up to 4 KB per page; an eventually consistent read costs half a unit per 4 KB."""


async def read_cost(settings: Settings, now_s: int) -> list[tuple[str, int, int, int, float]]:
    """(query, points, items, bytes read, read units) behind one uncached answer, as the query path runs it
    (final points and the live edge): every Query page it sends is sized as DynamoDB bills it."""
    store = DynamoStore(settings.storage, settings.dynamodb)
    await store.start()
    pages: list[tuple[int, int]] = []
    original = store._client.query

    async def spy(**kwargs: Any) -> Any:
        resp = await original(**kwargs)
        # The watermarks are read once a second per process, not per answer: not counted here.
        if kwargs["ExpressionAttributeValues"][":pk"]["S"] != PROGRESS_PK:
            pages.append((len(resp["Items"]), sum(item_size_bytes(i) for i in resp["Items"])))
        return resp

    store._client.query = spy
    out = []
    try:
        off = settings.replace(query_cache_max_bytes=0, query_tail_ttl_s=0.0)
        for label, res, days in (("24 h, 1 min", 60, 1), ("7 d, 2 h", 7200, 7), ("30 d, 2 h", 7200, 30)):
            for layout, app in (("summary blocks", APP), ("digests (before)", LEGACY)):
                pages.clear()
                body = (await MetricsQuery(store, settings=off).answer(app, PROC, res, now_s - days * 86400,
                                                                       now_s)).body
                points = len(orjson.loads(body)["points"])
                units = sum(math.ceil(size / READ_UNIT_BYTES) * 0.5 for _, size in pages)
                out.append((f"{label}, {layout}", points, sum(n for n, _ in pages), sum(b for _, b in pages), units))
    finally:
        await store.stop()
    return out


def main() -> int:
    if shutil.which("wrk") is None:
        print("wrk not found: install the Debian package (apt-get install wrk) to run this benchmark",
              file=sys.stderr)
        return 2
    ARTIFACTS.mkdir(exist_ok=True)
    dynamo = DynamoServer()
    dynamo.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        table = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings.from_env({"METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint, "METRICS_TABLE_NAME": table})
        now_s = int(time.time())
        t0 = time.monotonic()
        tokens = asyncio.run(load_data(settings, now_s))
        print(f"loaded dynalite in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        in_proc = asyncio.run(in_process(settings, now_s))
        costs = asyncio.run(read_cost(settings, now_s))
        rows: list[tuple[str, str, float, float, float, str]] = []
        # (mode, connections) -> the native 24 h row (summary blocks): what the Prometheus rows compare to
        native: dict[tuple[str, int], tuple[float, float, float]] = {}
        for mode, extra in (("uncached", {"METRICS_QUERY_CACHE_MAX_BYTES": "0", "METRICS_QUERY_TAIL_TTL_S": "0"}),
                            ("cached", {})):
            port = free_port()
            env = worker_env("kafka://127.0.0.1:1", dynamo.endpoint, data_dir=str(ARTIFACTS), web_port=port,
                             extra={"METRICS_TABLE_NAME": table, "METRICS_ADMIN_PORT": str(free_port()),
                                    # one app's token from 16 connections: measure the engine, not the
                                    # per-app query rate limit
                                    "METRICS_LIMIT_QUERY_RATE_PER_S": "1000000", "METRICS_LIMIT_QUERY_BURST": "1000000",
                                    "METRICS_QUERY_MAX_CONCURRENT_PER_APP": "64", **extra})
            proc = start_role("web", env, log_path=ARTIFACTS / f"bench-query-web-{mode}.log")
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
            for app, layout in ((APP, "summary blocks"), (LEGACY, "digests (before)")):
                if mode == "cached" and app == LEGACY:
                    continue
                base = f"http://127.0.0.1:{port}/v1/apps/{app}/metrics?process_type={PROC}"
                queries = (("24 h, 1 min (1,440 points)", f"{base}&since={now_s - 86400}&until={now_s}&resolution=1m"),
                           ("7 d, auto = 2 h (84 points)", f"{base}&since={now_s - 7 * 86400}&until={now_s}"),
                           ("30 d, auto = 2 h (360 points)", f"{base}&since={now_s - 30 * 86400}&until={now_s}"))
                for label, url in queries:
                    etag_of(url, tokens[app])  # warm-up (and the ETag)
                    for conns in ((1, 4) if mode == "uncached" else (CONNECTIONS,)):
                        rps, p50, p99 = wrk(url, tokens[app], connections=conns, duration_s=DURATION_S)
                        rows.append((label, f"{mode}, {layout}, {conns} conn{'s' if conns > 1 else ''}",
                                     rps, p50, p99, ""))
                        if app == APP and label.startswith("24 h"):
                            native[(mode, conns)] = (rps, p50, p99)
                    if mode == "cached":
                        tag = etag_of(url, tokens[app])
                        rps, p50, p99 = wrk(url, tokens[app], connections=CONNECTIONS, duration_s=DURATION_S,
                                            extra_header=f"If-None-Match: {tag}")
                        rows.append((label, f"{mode}, 304 (If-None-Match), {CONNECTIONS} conns", rps, p50, p99,
                                     ""))
            # The Prometheus API over the same 24 h of the summary-block app, against the native 24 h row.
            for promql in PROM_QUERIES:
                url = prom_url(port, promql, now_s - 86400, now_s, 60)
                samples = prom_warm(url, tokens[APP])
                for conns in ((1, 4) if mode == "uncached" else (CONNECTIONS,)):
                    rps, p50, p99 = wrk(url, tokens[APP], connections=conns, duration_s=DURATION_S)
                    n_rps, _, n_p99 = native[(mode, conns)]
                    if mode == "uncached":
                        target, vs = PROM_UNCACHED_TARGET, f"p99 {p99 / n_p99:.2f}x"
                    else:
                        target, vs = PROM_CACHED_TARGET, f"req/s {rps / n_rps:.2f}x"
                    rows.append((f"Prometheus query_range `{promql}`, 24 h, step=60 ({samples:,} samples)",
                                 f"{mode}, summary blocks, {conns} conn{'s' if conns > 1 else ''} ({target})",
                                 rps, p50, p99, vs))
            proc.terminate()
            proc.wait(timeout=20)
        lines = [f"Read path (2 cores, dynalite, one `python -m app web` process, wrk -t1, {DURATION_S} s "
                 "per row; 1000-request minutes with ~1000-centroid digests)", "",
                 "| query | mode | req/s | p50 ms | p99 ms | vs native 24 h (same mode, conns) |",
                 "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {q} | {m} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {vs} |" for q, m, rps, p50, p99, vs in rows]
        lines += ["", "Store reads behind one uncached answer (final points and live edge; whole items, as "
                  "DynamoDB bills them; eventually consistent)", "",
                  "| query | points | items | bytes read | bytes per point | read units |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {label} | {pts:,} | {n:,} | {size:,} | {size // max(pts, 1):,} | {units:,.1f} |"
                  for label, pts, n, size, units in costs]
        lines += ["", "In-process, uncached, median of 5 (no HTTP)", "", "| query | ms |", "|---|---:|"]
        lines += [f"| {label} | {ms:.1f} |" for label, ms in in_proc]
        text = "\n".join(lines) + "\n"
        print(text)
        (ARTIFACTS / "bench-query.md").write_text(text)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        dynamo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
