"""Read-path benchmark: ``python -m tests.bench.bench_query`` (``make bench-query``).

dynalite holds 24 h of one-minute items (1000 requests each, ~1000-centroid digests) plus 7 days of
rollup items for one series. A web process (``python -m app web``: auth, caches) serves them; the load comes
from ``wrk`` (Debian package) in a separate process. Measured: a 24 h query at 1 min (1,440 points) and a
7 d query at the automatic resolution (2 h, 84 points), cached (default settings) and uncached (caches
off), plus the in-process cost of precomputed rollups against merging minutes at read time, and the bytes
and DynamoDB read units behind each uncached query. Prints a Markdown table and writes
artifacts/bench-query.md. No assertion on timings.
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
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.api.query import MetricsQuery, merge_buckets
from app.cli import start_role, wait_http, worker_env
from app.local.embedded import DynamoServer, free_port
from app.settings import Settings
from app.storage.dynamodb import DynamoStore, item_size_bytes, partition_key
from app.storage.protocol import MetricItem
from app.storage.tokens import TokenStore
from tables.aggregate import ROLLUP_RESOLUTIONS, Aggregate, BucketKey

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
APP, PROC = "bench", "web"
DURATION_S = int(os.environ.get("BENCH_DURATION_S", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))


def minute(rng: np.random.Generator, start_s: int, n: int) -> Aggregate:
    a = Aggregate(BucketKey(APP, PROC, start_s * 1000))
    for i, v in enumerate(rng.lognormal(3.0, 0.8, n)):
        a.add_request(200 if i % 40 else 503, float(v), "H12" if i % 200 == 0 else None)
    a.add_runtime(300.0, 0.0, 420.0, 512.0, 0.7)
    return a


async def load_data(settings: Settings, now_s: int) -> str:
    """24 h of minutes with their rollups, 6 more days of 10 min / 1 h / 2 h rollups; returns a read token."""
    rng = np.random.default_rng(1)
    store = DynamoStore(settings)
    await store.start()
    tokens = TokenStore(settings)
    await tokens.start()
    try:
        first = (now_s - 86400) - (now_s - 86400) % 7200
        minutes = [minute(rng, t, 1000) for t in range(first, now_s - now_s % 60, 60)]
        items = [MetricItem(APP, PROC, 60, m.key.start_ms // 1000, orjson.dumps(m.to_record())) for m in minutes]
        for res in ROLLUP_RESOLUTIONS:
            for b, a in merge_buckets(minutes, res).items():
                rec = a.to_record()  # as agents/rollup.py writes it: with the minutes it holds
                rec["mins"] = [m.key.start_ms // 1000 for m in minutes if b <= m.key.start_ms // 1000 < b + res]
                items.append(MetricItem(APP, PROC, res, b, orjson.dumps(rec)))
            # older days: one synthetic bucket-sized aggregate each (same size class as a real rollup)
            for b in range(first - 6 * 86400, first, res):
                agg = minute(rng, b, 2000)
                agg.resolution_s = res
                items.append(MetricItem(APP, PROC, res, b, orjson.dumps(agg.to_record())))
        for i in range(0, len(items), 500):
            await store.put_many(items[i:i + 500])
        token, _ = await tokens.create(APP, "read")
        return token
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
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.headers["ETag"])


async def in_process(settings: Settings, now_s: int) -> list[tuple[str, int, float]]:
    """Uncached in-process cost: precomputed rollups vs merging minutes at read time (same answers)."""
    store = DynamoStore(settings)
    await store.start()
    out = []
    try:
        off = replace(settings, query_cache_max_bytes=0, query_tail_ttl_s=0.0)
        since = now_s - 86400
        for res in (600, 7200):
            for label, use in (("rollup items", True), ("minutes merged at read time", False)):
                q = MetricsQuery(store, settings=replace(off, query_use_rollups=use))
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    await q.answer(APP, PROC, res, since, now_s)
                    times.append(time.perf_counter() - t0)
                out.append((f"24 h at {res // 60} min, {label}", res, float(np.median(times)) * 1000))
    finally:
        await store.stop()
    return out


READ_UNIT_BYTES = 4096
"""DynamoDB bills a Query by the summed size of the items it reads (whole items, whatever the projection),
rounded up to 4 KB per page; an eventually consistent read costs half a unit per 4 KB."""


async def read_cost(settings: Settings, now_s: int) -> list[tuple[str, int, int, float]]:
    """(query, items, bytes read, read units) of the store reads behind each uncached query."""
    store = DynamoStore(settings)
    await store.start()
    out = []
    try:
        for label, res, since in (("24 h, 1 min", 60, now_s - 86400), ("24 h, 10 min", 600, now_s - 86400),
                                  ("7 d, 2 h", 7200, now_s - 7 * 86400)):
            kwargs: dict[str, Any] = {
                "TableName": settings.table_name, "KeyConditionExpression": "pk = :pk AND ts BETWEEN :a AND :b",
                "ExpressionAttributeValues": {":pk": {"S": partition_key(APP, PROC, res)},
                                              ":a": {"N": str(since - since % res)}, ":b": {"N": str(now_s)}}}
            items = size = 0
            units = 0.0
            while True:
                resp = await store._client.query(**kwargs)
                page = sum(item_size_bytes(i) for i in resp["Items"])
                items, size = items + len(resp["Items"]), size + page
                units += math.ceil(page / READ_UNIT_BYTES) * 0.5
                if not resp.get("LastEvaluatedKey"):
                    break
                kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
            out.append((label, items, size, units))
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
        token = asyncio.run(load_data(settings, now_s))
        print(f"loaded dynalite in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        in_proc = asyncio.run(in_process(settings, now_s))
        costs = asyncio.run(read_cost(settings, now_s))
        rows: list[tuple[str, str, float, float, float]] = []
        for mode, extra in (("cached", {}), ("uncached", {"METRICS_QUERY_CACHE_MAX_BYTES": "0",
                                                          "METRICS_QUERY_TAIL_TTL_S": "0"})):
            port = free_port()
            env = worker_env("kafka://127.0.0.1:1", dynamo.endpoint, data_dir=str(ARTIFACTS), web_port=port,
                             extra={"METRICS_TABLE_NAME": table, **extra})
            proc = start_role("web", env, log_path=ARTIFACTS / f"bench-query-web-{mode}.log")
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
            base = f"http://127.0.0.1:{port}/v1/apps/{APP}/metrics?process_type={PROC}"
            queries = (("24 h, 1 min (1,440 points)", f"{base}&since={now_s - 86400}&until={now_s}&resolution=1m"),
                       ("7 d, auto = 2 h (84 points)", f"{base}&since={now_s - 7 * 86400}&until={now_s}"))
            conns = CONNECTIONS if mode == "cached" else 4
            for label, url in queries:
                etag_of(url, token)  # warm-up (and the ETag)
                rps, p50, p99 = wrk(url, token, connections=conns, duration_s=DURATION_S)
                rows.append((label, f"{mode}, 200 + body, {conns} conns", rps, p50, p99))
                if mode == "cached":
                    tag = etag_of(url, token)
                    rps, p50, p99 = wrk(url, token, connections=conns, duration_s=DURATION_S,
                                        extra_header=f"If-None-Match: {tag}")
                    rows.append((label, f"{mode}, 304 (If-None-Match), {conns} conns", rps, p50, p99))
            proc.terminate()
            proc.wait(timeout=20)
        lines = [f"Read path (2 cores, dynalite, one `python -m app web` process, wrk -t1, {DURATION_S} s "
                 "per row; 1000-request minutes with ~1000-centroid digests)", "",
                 "| query | mode | req/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
        lines += [f"| {q} | {m} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |" for q, m, rps, p50, p99 in rows]
        lines += ["", "Rollups: precomputed vs merged at read time (in-process, uncached, median of 5)", "",
                  "| query | ms |", "|---|---:|"]
        lines += [f"| {label} | {ms:.0f} |" for label, _, ms in in_proc]
        lines += ["", "Store reads behind one uncached query (whole items, as DynamoDB bills them; eventually "
                  "consistent)", "", "| query | items | bytes read | bytes per point | read units |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {label} | {n:,} | {size:,} | {size // max(n, 1):,} | {units:,.1f} |"
                  for label, n, size, units in costs]
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
