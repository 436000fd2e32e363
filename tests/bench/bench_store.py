"""Store cost (issue 23): ``python -m tests.bench.bench_store`` (``make bench-store``), ``--quick`` to develop.

What one series costs the store, for the working tree ("new") and for the commit before issue 23 ("before",
a git worktree in /tmp, run in a subprocess with PYTHONPATH pointing at it), in the same run, from the same
seeds. One series (app-0001/web) at 60, 600 and 6,000 requests a minute (integer ms service times, lognormal
(3.0, 0.8), plus the loadgen's mix of app/local/traffic.py: 0.5 % H12 at 30000 ms, 2 % 500s, 4 % 404s, 2 %
302s) and 3 runtime samples a minute; then the same with 5 custom timers of continuous values.

Each minute goes through the tree's own jobs, driven by hand: ``Sink.write`` (the minute item), ``Rollup.process``
(and ``Rollup.flush`` after each minute with its end, when the tree has it), and ``Publisher.publish`` once a
simulated second (the progress items). Their store is a real ``DynamoStore`` over a client that records each
``BatchWriteItem``, so every item is sized as DynamoDB bills it (``item_size_bytes`` of the attribute map
``_encode`` builds): one write unit per started KB. Cassandra's bytes are the row's key columns plus the packed
payload (app/storage/cassandra.py). Bytes at rest: the final version of every item key, per simulated minute.

Accuracy: p50/p95/p99 of the stored (decoded) digests against exact numpy over 1 min, 1 h, the whole period
(the stored 2 h items merged) and 30 days (360 stored 2 h items built from generated minutes); and a table of
stored t-digest budgets for continuous values. Ends with one line, ``bench-store: ...``. No assertion on
targets: they are printed met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agents.progress import Publisher, Watermarks
from agents.rollup import Rollup
from agents.sink import Sink
from app.clock import ManualClock
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.codec import pack
from app.storage.dynamodb import PROGRESS_PK, DynamoStore, item_size_bytes
from app.storage.protocol import DIGEST, SUMMARY, Kind, MetricItem, Progress
from tables.aggregate import Aggregate, BucketKey
from tables.digest import Digest

ROOT = Path(__file__).resolve().parents[2]
BEFORE_COMMIT = "74f00a0c797e8e189e19c0a75242282f1aabe105"
"""The commit before issue 23: today's layout."""
BEFORE_TREE = Path("/tmp/minutely-bench-before")

APP, PROC = "app-0001", "web"
TRAFFIC = (60, 600, 6000)
"""Requests a minute."""
TIMERS = 5
RUNTIME_SAMPLES = 3
SEED = 23
SERIES, PARTITIONS = 10_000, 8
SERIES_PER_PARTITION = SERIES // PARTITIONS
"""Progress items are per metrics-1m partition: amortized over this many series."""
DAY_S, WEEK_S = 86400, 7 * 86400
T0 = 1_764_000_000 - 1_764_000_000 % WEEK_S
"""The first simulated minute: a block boundary of every resolution (bucket_of is epoch-aligned)."""
STORE_LAG_S = 5
"""A minute is stored this long after its end (the aggregator's grace)."""
QS = (0.5, 0.95, 0.99)
KB = 1024
BUDGETS = (100, 200, 300, 500, 1000)
MONTH_BUCKETS = 360
"""2 h buckets in 30 days."""
H12_MS = 30000
TARGET_WCU, TARGET_REST_BYTES, TARGET_ERROR_PCT = 2.0, 1024.0, 1.0
KINDS = ("minute", "rollup", "blocks", "progress")


# --- traffic -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Traffic:
    """One minute's observations."""

    status: np.ndarray
    service_ms: np.ndarray
    """Integer ms, as floats (what the router parser gives)."""
    h12: np.ndarray
    runtime: list[tuple[float, float]]
    """(rss MB, load) per sample."""
    timers: list[np.ndarray]


def traffic(rpm: int, i: int, timers: int) -> Traffic:
    """Minute ``i`` at ``rpm``: the same in every process and layout (seeded by both)."""
    rng = np.random.default_rng((SEED, rpm, i))
    r = rng.random(rpm)
    svc = np.rint(rng.lognormal(3.0, 0.8, rpm))
    h12 = r < 0.005
    svc[h12] = H12_MS
    status = np.select([h12, r < 0.02, r < 0.06, r < 0.08], [503, 500, 404, 302], 200)
    runtime = [(round(float(rng.uniform(100, 400)), 2), round(float(rng.uniform(0, 2)), 2))
               for _ in range(RUNTIME_SAMPLES)]
    return Traffic(status, svc, h12, runtime, [rng.lognormal(3.0, 0.8, rpm) for _ in range(timers)])


def build_minute(start_s: int, t: Traffic, max_centroids: int) -> Aggregate:
    """The minute through the Aggregate API, as the aggregator builds it."""
    agg = Aggregate(BucketKey(APP, PROC, start_s * 1000), max_centroids=max_centroids)
    for status, svc, h12 in zip(t.status.tolist(), t.service_ms.tolist(), t.h12.tolist(), strict=True):
        agg.add_request(status, svc, "H12" if h12 else None)
    for rss, load in t.runtime:
        agg.add_runtime(rss, 0.0, 420.0, 512.0, load)
    ts_ms = start_s * 1000
    for k, values in enumerate(t.timers):
        name = f"t{k}"
        for v in values.tolist():
            agg.add_metric(name, "timer", v, ts_ms)
    return agg


def fast_minute(start_s: int, t: Traffic, max_centroids: int) -> Aggregate:
    """The same aggregate as :func:`build_minute`, filled the way tables/windows.py's hot path fills it (the
    timers' and the response's ``pending``, the status counts), vectorized: the 30 day run's minutes."""
    agg = Aggregate(BucketKey(APP, PROC, start_s * 1000), max_centroids=max_centroids)
    agg.response.pending.extend(t.service_ms.tolist())
    agg.status = [int(c) for c in np.bincount(t.status // 100, minlength=6)]
    agg.failed = int((t.status >= 500).sum())
    n_h12 = int(t.h12.sum())
    if n_h12:
        agg.errors["H12"] = n_h12
    for rss, load in t.runtime:
        agg.add_runtime(rss, 0.0, 420.0, 512.0, load)
    for k, values in enumerate(t.timers):
        name = f"t{k}"
        agg.add_metric(name, "timer", float(values[0]), start_s * 1000)
        agg.timers[name].pending.extend(values[1:].tolist())
    return agg


# --- the recording store -----------------------------------------------------------------------------------

class RecordingClient:
    """The aioboto3 client DynamoStore writes through: keeps each put request's attribute map."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def batch_write_item(self, **kwargs: Any) -> dict[str, Any]:
        for requests in kwargs["RequestItems"].values():
            self.items += [r["PutRequest"]["Item"] for r in requests]
        return {}


@dataclass
class KindCost:
    puts: int = 0
    wcu: int = 0
    bytes: int = 0
    """DynamoDB item bytes written."""
    cassandra: int = 0
    """Cassandra row bytes written (key columns + packed payload)."""
    at_rest: int = 0
    """DynamoDB bytes of the final version of every key."""


def kind_of(pk: str) -> str:
    if pk == PROGRESS_PK:
        return "progress"
    parts = pk.split("#")
    if len(parts) == 4 and parts[3] == "s":
        return "blocks"
    return "minute" if parts[2] == "60" else "rollup"


def cassandra_row_bytes(item: MetricItem, over_bytes: int) -> int:
    """Column bytes of the row CassandraStore inserts: app, proc (text), res (int), kind (text), bucket, ts
    (bigint), d (the packed payload), z (boolean); per-cell overhead and TTL not counted."""
    data, _ = pack(item.payload, over_bytes)
    return len(item.app.encode()) + len(item.process_type.encode()) + 4 + len(item.kind) + 8 + 8 + len(data) + 1


class RecordingStore:
    """A MetricsStore: writes go through a real DynamoStore (sized as billed), reads come from memory."""

    def __init__(self, settings: Settings, clock: ManualClock) -> None:
        self.settings = settings
        self.client = RecordingClient()
        self.dynamo = DynamoStore(settings.storage, settings.dynamodb, clock=clock)
        self.dynamo._client = self.client
        self.held: dict[tuple[int, str], dict[int, bytes]] = {}
        self.final: dict[tuple[str, int], tuple[str, int]] = {}
        """(pk, ts) -> (kind, size) of the last version written."""
        self.costs: dict[str, KindCost] = {k: KindCost() for k in KINDS}
        self.hourly_wcu: dict[int, int] = {}
        self.minute = 0
        """The simulated minute being processed: writes are counted in its hour."""

    def _account(self) -> None:
        for raw in self.client.items:
            pk, ts = raw["pk"]["S"], int(raw["ts"]["N"])
            kind = kind_of(pk)
            size = item_size_bytes(raw)
            wcu = math.ceil(size / KB)
            c = self.costs[kind]
            c.puts += 1
            c.wcu += wcu
            c.bytes += size
            self.final[(pk, ts)] = (kind, size)
            hour = self.minute // 60
            self.hourly_wcu[hour] = self.hourly_wcu.get(hour, 0) + wcu
        self.client.items.clear()

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        await self.dynamo.put_many(items)
        self._account()
        unique = {(i.resolution_s, i.kind, i.ts_s): i for i in items}  # as both backends collapse a batch
        over = self.settings.storage.compress_over_bytes
        for (res, kind, ts), item in unique.items():
            self.held.setdefault((res, kind), {})[ts] = item.payload
            self.costs["blocks" if kind == SUMMARY else "minute" if res == 60 else "rollup"].cassandra += (
                cassandra_row_bytes(item, over))

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int,
                    kind: Kind = DIGEST) -> list[MetricItem]:
        held = self.held.get((resolution_s, kind), {})
        return [MetricItem(app, process_type, resolution_s, ts, held[ts], kind)
                for ts in sorted(held) if since_s <= ts < until_s]

    async def series(self) -> list[tuple[str, str]]:
        return [(APP, PROC)]

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        await self.dynamo.put_progress(progress)
        self._account()
        # scope (text), partition (int), through_ms, updated_ms (bigint), changed (blob)
        self.costs["progress"].cassandra += sum(len("metrics-1m") + 4 + 8 + 8 + len(orjson.dumps(p.changed))
                                                for p in progress)

    async def progress(self) -> list[Progress]:
        return []

    def settle(self) -> None:
        """Bytes at rest: the final version of every key."""
        for k in KINDS:
            self.costs[k].at_rest = 0
        for kind, size in self.final.values():
            self.costs[kind].at_rest += size


# --- one layout ----------------------------------------------------------------------------------------------

def record_codec() -> tuple[Callable[[bytes], Aggregate], Callable[[Aggregate, list[int]], bytes] | None]:
    """(decode a stored digest item, encode a rollup item as the rollup job stores it) of this tree."""
    import tables
    # Not an ImportError: the venv's editable install would find the working tree's module for the before tree.
    if not (Path(tables.__path__[0]) / "record.py").is_file():
        return (lambda payload: Aggregate.from_record(orjson.loads(payload))), None
    from agents.rollup import Bucket
    from tables import record
    version = Settings.of().storage.record_format
    return ((lambda payload: record.decode(payload)[0]),
            (lambda agg, mins: Bucket(agg, set(mins), 0).payload(version)))


@dataclass
class Accuracy:
    """Worst relative error (%) over p50/p95/p99 per range, for the response times and the custom timers."""

    response: dict[str, float] = field(default_factory=dict)
    timers: dict[str, float] = field(default_factory=dict)


@dataclass
class LayoutRun:
    layout: str
    rpm: int
    timers: int
    minutes: int
    costs: dict[str, KindCost]
    hourly_wcu: list[int]
    notes: list[list[int]]
    accuracy: Accuracy
    watermarks_ms: list[int]

    @classmethod
    def of(cls, d: dict[str, Any]) -> LayoutRun:
        return cls(d["layout"], d["rpm"], d["timers"], d["minutes"],
                   {k: KindCost(**v) for k, v in d["costs"].items()}, d["hourly_wcu"], d["notes"],
                   Accuracy(**d["accuracy"]), d["watermarks_ms"])


def rel_errors(digest: Digest, truth: np.ndarray) -> float:
    """Worst relative error (%) of the digest's p50/p95/p99 against the true ones."""
    worst = 0.0
    for q, exact in zip(QS, truth.tolist(), strict=True):
        got = digest.quantile(q)
        if got is None:
            return math.inf
        worst = max(worst, abs(got - exact) / abs(exact) * 100 if exact else abs(got) * 100)
    return worst


def truths(values: list[np.ndarray]) -> np.ndarray:
    return np.array(np.quantile(np.concatenate(values), QS), dtype=np.float64)


async def run_layout(layout: str, rpm: int, timers: int, minutes: int) -> LayoutRun:
    """``minutes`` of one series through this tree's sink, rollup job (and flush), sized as stored."""
    settings = Settings.of()
    mc = settings.windows.digest_max_centroids
    clock = ManualClock(T0 * 1000)
    store = RecordingStore(settings, clock)
    counters = Counters()

    async def dead_letter(bad: Sequence[tuple[bytes, str]]) -> None:
        raise AssertionError(f"the sink refused a minute: {bad[0][1]}")

    sink = Sink(store, settings.storage, dead_letter=dead_letter, counters=counters)
    rollup = Rollup({}, store, settings.storage, settings.query, counters, context_topic="metrics-1m", clock=clock)
    flush = getattr(rollup, "flush", None)
    series = 1 + timers
    truth_minute: list[np.ndarray] = []
    truth_hour: list[np.ndarray] = []
    hour_values: list[list[np.ndarray]] = [[] for _ in range(series)]
    day_values: list[list[np.ndarray]] = [[], []]
    watermarks: list[int] = []
    for i in range(minutes):
        start_s = T0 + 60 * i
        end_s = start_s + 60
        clock.set((end_s + STORE_LAG_S) * 1000)
        store.minute = i
        t = traffic(rpm, i, timers)
        value = orjson.dumps(build_minute(start_s, t, mc).to_record())
        await sink.write([value])
        await rollup.process([(0, value)])
        if flush is not None:
            watermarks.append((await flush({0: end_s * 1000}))[0])
        else:
            watermarks.append(end_s * 1000)  # today: stored when merged
        observed = [t.service_ms, *t.timers]
        truth_minute.append(np.array([np.quantile(v, QS) for v in observed]))
        for k, v in enumerate(observed):
            hour_values[k].append(v)
        day_values[0].append(t.service_ms.astype(np.int64))
        if timers:
            day_values[1].append(t.timers[0])
        if (i + 1) % 60 == 0:
            truth_hour.append(np.array([truths(v) for v in hour_values]))
            hour_values = [[] for _ in range(series)]
    store.settle()
    notes = partial_items(store, minutes)
    return LayoutRun(layout, rpm, timers, minutes, store.costs,
                     [store.hourly_wcu.get(h, 0) for h in range(minutes // 60)], notes,
                     accuracy(store, truth_minute, truth_hour, day_values, minutes), watermarks)


def partial_items(store: RecordingStore, minutes: int) -> list[list[int]]:
    """Items whose span goes past the simulated period, as [resolution s, span s, simulated s, size B]: their
    size is counted per simulated minute, i.e. extrapolated linearly to the whole span (an upper bound: the
    item's fixed part is counted again in each stretch)."""
    from tables.summary import BLOCK_SPAN_S
    end_s = T0 + 60 * minutes
    out = []
    for (pk, ts), (kind, size) in sorted(store.final.items()):
        if kind == "blocks":
            res = int(pk.split("#")[2])
            if ts + BLOCK_SPAN_S[res] > end_s:
                out.append([res, BLOCK_SPAN_S[res], end_s - ts, size])
    return out


def accuracy(store: RecordingStore, truth_minute: list[np.ndarray], truth_hour: list[np.ndarray],
             day_values: list[list[np.ndarray]], minutes: int) -> Accuracy:
    decode, _ = record_codec()
    acc = Accuracy()
    series = truth_minute[0].shape[0]
    period = f"{minutes // 60} h"

    def worst(aggs: list[Aggregate], truth: list[np.ndarray]) -> tuple[float, float]:
        resp = tim = 0.0
        for agg, tr in zip(aggs, truth, strict=True):
            resp = max(resp, rel_errors(agg.response.digest, tr[0]))
            for k in range(1, series):
                tim = max(tim, rel_errors(agg.timers[f"t{k - 1}"].digest, tr[k]))
        return resp, tim

    stored = {key: [decode(v[ts]) for ts in sorted(v)] for key, v in store.held.items() if key[1] == DIGEST}
    for label, key, truth in (("1 min", 60, truth_minute), ("1 h", 3600, truth_hour)):
        aggs = stored[(key, DIGEST)]
        if len(aggs) != len(truth):
            raise AssertionError(f"{len(aggs)} stored items of {key} s, {len(truth)} expected")
        acc.response[label], tim = worst(aggs, truth)
        if series > 1:
            acc.timers[label] = tim
    total = Aggregate(BucketKey(APP, PROC, T0 * 1000), resolution_s=60 * minutes)
    for agg in stored[(7200, DIGEST)]:  # as a query merges the range's stored items
        total.merge(agg)
    all_ms = np.concatenate(day_values[0])
    exact = np.quantile(all_ms, QS)
    by_counts = np.array([count_quantile(np.bincount(all_ms), q) for q in QS])
    if not np.array_equal(exact, by_counts):
        raise AssertionError(f"count-based quantiles {by_counts} differ from np.quantile {exact}")
    acc.response[period] = rel_errors(total.response.digest, exact)
    if series > 1:
        t0 = np.concatenate(day_values[1])
        exact = np.array(np.quantile(t0, QS), dtype=np.float64)
        hist = log_bins(t0)
        for q, want in zip(QS, exact.tolist(), strict=True):
            if abs(hist_quantile(hist, q) / want - 1) > LOG_STEP:
                raise AssertionError(f"the log histogram's quantile {q} is {hist_quantile(hist, q)}, not {want}")
        acc.timers[period] = rel_errors(total.timers["t0"].digest, exact)
    return acc


def count_quantile(counts: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) method over the values 0..len(counts)-1 seen counts[v] times."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    pos = (n - 1) * q
    lo = math.floor(pos)
    g = pos - lo
    a = float(np.searchsorted(cum, lo, side="right"))
    b = float(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
    return a + (b - a) * g if g < 0.5 else b - (b - a) * (1 - g)  # numpy's own lerp


async def progress_cost(watermarks_ms: list[int]) -> tuple[KindCost, list[int]]:
    """One partition's progress items: the tree's Publisher, once a simulated second, with the watermark
    the run's flushes returned (today: the committed minute itself)."""
    settings = Settings.of()
    clock = ManualClock(T0 * 1000)
    store = RecordingStore(settings, clock)
    offset = [0]

    def committed(_partition: int) -> int | None:
        return offset[0] or None

    stored = {T0 * 1000 + 60_000 * (i + 1): w for i, w in enumerate(watermarks_ms)}
    gated = hasattr(Rollup, "flush")
    if gated:
        async def flush(through: dict[int, int]) -> dict[int, int]:
            return {p: stored[ms] for p, ms in through.items()}

        wm = Watermarks(clock=clock, gated=True)
        publisher = Publisher(wm, store, Counters(), committed=committed, clock=clock, flush=flush)
    else:
        wm = Watermarks(clock=clock)
        publisher = Publisher(wm, store, Counters(), committed=committed, clock=clock)
    for i in range(len(watermarks_ms)):
        end_s = T0 + 60 * (i + 1)
        store.minute = i
        for s in range(60):
            clock.set((end_s + STORE_LAG_S + s) * 1000)
            if s == 0:
                wm.checkpoint(0, end_s * 1000, i + 1)
                offset[0] = i + 1
            await publisher.publish({0})
    store.settle()
    hours = len(watermarks_ms) // 60
    return store.costs["progress"], [store.hourly_wcu.get(h, 0) for h in range(hours)]


async def all_layout_runs(layout: str, minutes: int) -> dict[str, Any]:
    runs = []
    for timers in (0, TIMERS):
        for rpm in TRAFFIC:
            t = time.perf_counter()
            runs.append(await run_layout(layout, rpm, timers, minutes))
            print(f"  [{layout}] {rpm} req/min, {timers} timers: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    progress, progress_hourly = await progress_cost(runs[0].watermarks_ms)
    return {"layout": layout, "runs": [asdict(r) for r in runs], "progress": asdict(progress),
            "progress_hourly": progress_hourly}


# --- 30 days and the digest budgets (the working tree only) --------------------------------------------------

LOG_LO, LOG_BINS, LOG_HI = math.log(1e-3), 1 << 22, math.log(1e6)
LOG_STEP = (LOG_HI - LOG_LO) / LOG_BINS
"""The 30 day truth of continuous values: a histogram of log-spaced bins this fine (relative width ~5e-6)."""


def hist_quantile(counts: np.ndarray, q: float) -> float:
    """The linear-method quantile, each value taken as its bin's geometric centre: within one bin (LOG_STEP
    relative) of np.quantile."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    pos = (n - 1) * q
    lo = math.floor(pos)
    a = int(np.searchsorted(cum, lo, side="right"))
    b = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
    va, vb = (math.exp(LOG_LO + (x + 0.5) * LOG_STEP) for x in (a, b))
    return va + (vb - va) * (pos - lo)


def log_bins(values: np.ndarray) -> np.ndarray:
    return np.bincount(((np.log(values) - LOG_LO) / LOG_STEP).astype(np.int64), minlength=LOG_BINS)


def month(rpm: int) -> tuple[float, float]:
    """Worst error (%) over 30 days: 360 2 h buckets merged from generated minutes, each encoded and decoded
    as the rollup job stores it, then merged as a query would. Response times against the exact quantiles of
    their integer counts; one custom timer (the five are drawn alike) against a fine log histogram."""
    decode, encode = record_codec()
    mc = Settings.of().windows.digest_max_centroids
    counts = np.zeros(H12_MS + 1, dtype=np.int64)
    hist = np.zeros(LOG_BINS, dtype=np.int64)
    total = Aggregate(BucketKey(APP, PROC, T0 * 1000), resolution_s=MONTH_BUCKETS * 7200)
    for b in range(MONTH_BUCKETS):
        start_s = T0 + 7200 * b
        bucket = Aggregate(BucketKey(APP, PROC, start_s * 1000), resolution_s=7200, max_centroids=mc)
        mins = []
        service: list[np.ndarray] = []
        timer: list[np.ndarray] = []
        for j in range(120):
            t = traffic(rpm, 120 * b + j, 1)
            bucket.merge(fast_minute(start_s + 60 * j, t, mc))
            mins.append(start_s + 60 * j)
            service.append(t.service_ms)
            timer.append(t.timers[0])
        counts += np.bincount(np.concatenate(service).astype(np.int64), minlength=H12_MS + 1)
        hist += log_bins(np.concatenate(timer))
        total.merge(decode(encode(bucket, mins)) if encode is not None else bucket)
    exact = np.array([count_quantile(counts, q) for q in QS])
    timer_truth = np.array([hist_quantile(hist, q) for q in QS])
    return rel_errors(total.response.digest, exact), rel_errors(total.timers["t0"].digest, timer_truth)


@dataclass
class Budget:
    max_centroids: int
    rpm: int
    minute_bytes: float
    hour_bytes: float
    errors: dict[str, float]


def budgets(minutes: int) -> list[Budget]:
    """Stored t-digest budgets for continuous values (custom timer t0 of the run's minutes): bytes of the
    stored form (``Digest.to_bytes``) and worst error per range, each minute and hour digest stored and read
    back, hours merged from the stored minutes, the period from the stored hours."""
    out = []
    hours = minutes // 60
    for rpm in TRAFFIC:
        values = [traffic(rpm, i, 1).timers[0] for i in range(minutes)]
        for mc in BUDGETS:
            errs = {"1 min": 0.0, "1 h": 0.0, f"{hours} h": 0.0}
            minute_bytes = hour_bytes = 0
            period = Digest(mc)
            for h in range(hours):
                hour = Digest(mc)
                for v in values[60 * h:60 * h + 60]:
                    d = Digest(mc)
                    d.add_many(v.tolist())
                    raw = d.to_bytes()
                    minute_bytes += len(raw)
                    back = Digest.from_bytes(raw, mc)
                    errs["1 min"] = max(errs["1 min"], rel_errors(back, np.quantile(v, QS)))
                    hour.merge(back)
                raw = hour.to_bytes()
                hour_bytes += len(raw)
                back = Digest.from_bytes(raw, mc)
                errs["1 h"] = max(errs["1 h"], rel_errors(back, truths(values[60 * h:60 * h + 60])))
                period.merge(back)
            errs[f"{hours} h"] = rel_errors(period, truths(values))
            out.append(Budget(mc, rpm, minute_bytes / minutes, hour_bytes / hours, errs))
    return out


# --- the before tree -----------------------------------------------------------------------------------------

def before_tree() -> Path | None:
    """A git worktree of the commit before issue 23 (made when absent); None when git cannot make one."""
    try:
        return _before_tree()
    except OSError as exc:  # no git
        print(f"bench-store: cannot run git ({exc}): the before layout is skipped")
        return None


def _before_tree() -> Path | None:
    if (BEFORE_TREE / "agents" / "rollup.py").exists():
        head = subprocess.run(["git", "-C", str(BEFORE_TREE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip()
        if head == BEFORE_COMMIT:
            return BEFORE_TREE
        print(f"bench-store: {BEFORE_TREE} is at {head or 'no commit'}, not {BEFORE_COMMIT[:7]}: the before "
              f"layout is skipped (remove it: git worktree remove --force {BEFORE_TREE})")
        return None
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BEFORE_COMMIT}^{{commit}}"],
                           capture_output=True, check=False)
    if known.returncode:
        print(f"bench-store: git history lacks {BEFORE_COMMIT[:7]} (a shallow or exported tree?): the before "
              "layout is skipped")
        return None
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True, check=False)
    made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(BEFORE_TREE), BEFORE_COMMIT],
                          capture_output=True, text=True, check=False)
    if made.returncode:
        print(f"bench-store: git worktree add {BEFORE_TREE} failed ({made.stderr.strip()}): the before layout is "
              "skipped")
        return None
    return BEFORE_TREE


def start_before(tree: Path, minutes: int) -> subprocess.Popen[bytes]:
    """This file, run against the before tree's packages (PYTHONPATH first, ahead of the working tree)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--minutes", str(minutes)],
                            cwd=tree, env=env, stdout=subprocess.PIPE)


# --- the report ----------------------------------------------------------------------------------------------

@dataclass
class Summary:
    wcu: float
    """Write units per series-minute, averaged over the period, progress included."""
    worst_hour_wcu: float
    rest_bytes: float
    cassandra_bytes: float


def summarize(run: LayoutRun, progress: KindCost, progress_hourly: list[int], progress_minutes: int) -> Summary:
    """Per series-minute; the progress items (one partition's) amortized over SERIES_PER_PARTITION series."""
    per = run.minutes
    share = 1 / SERIES_PER_PARTITION
    wcu = sum(c.wcu for k, c in run.costs.items() if k != "progress") / per + progress.wcu * share / progress_minutes
    worst = max(w + p * share for w, p in zip(run.hourly_wcu, progress_hourly, strict=False)) / 60
    rest = (sum(c.at_rest for k, c in run.costs.items() if k != "progress") / per
            + progress.at_rest * share / (Settings.of().storage.ttl_s / 60))
    cass = (sum(c.cassandra for k, c in run.costs.items() if k != "progress") / per
            + progress.cassandra * share / progress_minutes)
    return Summary(wcu, worst, rest, cass)


def ratio(new: float, before: float | None) -> str:
    return "-" if before is None or before == 0 else f"{new / before:.3f}"


def fmt(x: float) -> str:
    return f"{x:.5f}" if x < 0.01 else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def kind_table(layout: dict[str, Any], runs: list[LayoutRun], timers: int) -> None:
    progress = KindCost(**layout["progress"])
    minutes = runs[0].minutes
    share = 1 / SERIES_PER_PARTITION
    variant = "the common case" if not timers else f"+ {timers} timers"
    print(f"\n#### {layout['layout']} ({layout['source']}), {variant}")
    print("| traffic | item kind | puts/series-min | WCU/series-min | KB written/series-min | KB at rest/series-min "
          "| Cassandra B written/series-min |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ttl_min = Settings.of().storage.ttl_s / 60
    for run in runs:
        if run.timers != timers:
            continue
        for k in KINDS:
            c = progress if k == "progress" else run.costs[k]
            per = share / minutes if k == "progress" else 1 / run.minutes
            rest = c.at_rest * share / ttl_min if k == "progress" else c.at_rest / run.minutes
            print(f"| {run.rpm} req/min | {k} | {fmt(c.puts * per)} | {fmt(c.wcu * per)} | {fmt(c.bytes * per / KB)} "
                  f"| {fmt(rest / KB)} | {fmt(c.cassandra * per)} |")


def report(new: dict[str, Any], before: dict[str, Any] | None, month_errors: dict[int, tuple[float, float]],
           budget_rows: list[Budget], minutes: int) -> None:
    hours = minutes // 60
    print(f"\n## bench-store: one series ({APP}/{PROC}), {hours} h of minutes, same seeds in both layouts")
    print(f"Assumptions: progress items (one per metrics-1m partition) amortized over {SERIES:,} series in "
          f"{PARTITIONS} partitions = {SERIES_PER_PARTITION:,} series each; 1 WCU per started KB of each put "
          f"(item_size_bytes); bytes at rest = the final version of every item key per series-minute (each lives "
          f"{Settings.of().storage.ttl_s // DAY_S} d past its end); Cassandra = row key columns + packed payload.")
    layouts = [new] + ([before] if before else [])
    parsed = {lay["layout"]: [LayoutRun.of(r) for r in lay["runs"]] for lay in layouts}
    for timers in (0, TIMERS):
        for lay in layouts:
            kind_table(lay, parsed[lay["layout"]], timers)
    sums: dict[tuple[str, int, int], Summary] = {}
    for lay in layouts:
        progress = KindCost(**lay["progress"])
        for run in parsed[lay["layout"]]:
            sums[(lay["layout"], run.timers, run.rpm)] = summarize(run, progress, lay["progress_hourly"], run.minutes)
    print("\n#### per series-minute, new against before")
    print("| variant | traffic | WCU new (period / worst hour) | WCU before (period / worst hour) | ratio "
          "(period / worst hour) | KB at rest new | before | ratio | Cassandra B written new | before | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for timers in (0, TIMERS):
        for rpm in TRAFFIC:
            n = sums[("new", timers, rpm)]
            b = sums.get(("before", timers, rpm))
            bp, bw, br, bc = (None, None, None, None) if b is None else (
                b.wcu, b.worst_hour_wcu, b.rest_bytes, b.cassandra_bytes)
            variant = "common" if not timers else f"+{timers} timers"
            print(f"| {variant} | {rpm} req/min | {fmt(n.wcu)} / {fmt(n.worst_hour_wcu)} | "
                  f"{'-' if b is None else f'{fmt(b.wcu)} / {fmt(b.worst_hour_wcu)}'} | "
                  f"{ratio(n.wcu, bp)} / {ratio(n.worst_hour_wcu, bw)} | {fmt(n.rest_bytes / KB)} | "
                  f"{'-' if b is None else fmt(b.rest_bytes / KB)} | {ratio(n.rest_bytes, br)} | "
                  f"{fmt(n.cassandra_bytes)} | {'-' if b is None else fmt(b.cassandra_bytes)} | "
                  f"{ratio(n.cassandra_bytes, bc)} |")
    partial: dict[tuple[int, int, int], list[int]] = {}
    for lay in layouts:
        for r in parsed[lay["layout"]]:
            for res, span_s, covered_s, size in r.notes:
                partial.setdefault((res, span_s, covered_s), []).append(size)
    if partial:
        print("\nExtrapolated: summary blocks longer than the simulated period; each block's size at the end is "
              "counted per simulated minute, i.e. linearly over its span (an upper bound):")
        for (res, span_s, covered_s), sizes in sorted(partial.items()):
            print(f"- {res} s points, blocks of {span_s // 3600} h, {covered_s // 3600} h simulated: "
                  f"{min(sizes)}..{max(sizes)} B after {covered_s // 3600} h (x {span_s / covered_s:g} over the span)")
    print("\n#### accuracy: worst relative error (%) of p50/p95/p99, stored (decoded) digests against exact numpy")
    ranges = ["1 min", "1 h", f"{hours} h"] + (["30 d"] if month_errors else [])
    print(f"| layout | values | traffic | {' | '.join(ranges)} |")
    print("|---|---|---|" + "---:|" * len(ranges))
    for lay in layouts:
        for run in parsed[lay["layout"]]:
            for what, errs in (("response ms", run.accuracy.response), ("timers", run.accuracy.timers)):
                if not errs or (what == "response ms" and run.timers):
                    continue
                cells = [errs.get(r) for r in ranges]
                if lay["layout"] == "new" and "30 d" in ranges:
                    m = month_errors.get(run.rpm)
                    cells[-1] = None if m is None else m[0 if what == "response ms" else 1]
                print(f"| {lay['layout']} | {what} | {run.rpm} req/min | "
                      + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
    print(f"(1 h: each stored 1 h item; {hours} h: the stored 2 h items merged; 30 d: 360 2 h items built from "
          "generated minutes, stored and read back, merged; timers over the period: t0, the five are drawn alike; "
          "the 30 d timer truth is a log histogram within ~5e-4 % of exact. Checked in this run over the period: the "
          "count-based quantile equals np.quantile for the response times, and the histogram's is within one bin "
          "of it for t0)")
    if budget_rows:
        print("\n#### stored t-digest budget, continuous values (custom timer t0)")
        print(f"| max_centroids | traffic | stored minute digest B | stored hour digest B | worst % 1 min | 1 h "
              f"| {hours} h |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for row in budget_rows:
            e = list(row.errors.values())
            print(f"| {row.max_centroids} | {row.rpm} req/min | {row.minute_bytes:.0f} | {row.hour_bytes:.0f} | "
                  f"{e[0]:.4f} | {e[1]:.4f} | {e[2]:.4f} |")
    common = [sums[("new", 0, rpm)] for rpm in TRAFFIC]
    wcu = max(s.worst_hour_wcu for s in common)
    wcu_before = max((sums[("before", 0, rpm)].worst_hour_wcu for rpm in TRAFFIC), default=math.nan) if before \
        else math.nan
    rest = max(s.rest_bytes for s in common)
    worst_err = max(max(r.accuracy.response.values()) for r in parsed["new"] if not r.timers)
    if month_errors:
        worst_err = max(worst_err, max(m[0] for m in month_errors.values()))

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"\nTargets (common case, worst traffic level; WCU = the worst hour's average):"
          f"\n- WCU/series-minute {fmt(wcu)} <= {TARGET_WCU:g}: {met(wcu <= TARGET_WCU)}"
          f"\n- bytes at rest/series-minute {fmt(rest)} <= {TARGET_REST_BYTES:g}: {met(rest <= TARGET_REST_BYTES)}"
          f"\n- worst percentile error {worst_err:.4f} % <= {TARGET_ERROR_PCT:g} %: "
          f"{met(worst_err <= TARGET_ERROR_PCT)}" + ("" if month_errors else " (30 d not run: --quick)"))
    print(f"bench-store: wcu_per_series_minute={wcu:.3f} wcu_per_series_minute_before={wcu_before:.3f} "
          f"bytes_at_rest_per_series_minute={rest:.1f} worst_pct_error={worst_err:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="4 h of minutes, no 30 day run")
    parser.add_argument("--minutes", type=int, default=None, help="simulated minutes (a multiple of 120)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    minutes = args.minutes or (240 if args.quick else 1440)
    if minutes % 120:
        parser.error("--minutes must be whole 2 h buckets (a multiple of 120)")
    if args.worker:  # the before tree: its results as JSON on stdout
        sys.stdout.buffer.write(orjson.dumps(sourced(asyncio.run(all_layout_runs("before", minutes)))))
        return 0
    check_fast_minute()
    started = time.perf_counter()
    tree = before_tree()
    proc = start_before(tree, minutes) if tree else None
    new = sourced(asyncio.run(all_layout_runs("new", minutes)))
    month_errors: dict[int, tuple[float, float]] = {}
    if not args.quick:
        for rpm in TRAFFIC:
            t = time.perf_counter()
            month_errors[rpm] = month(rpm)
            print(f"  [new] 30 d at {rpm} req/min: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    budget_rows = budgets(minutes) if hasattr(Digest, "to_bytes") else []
    before: dict[str, Any] | None = None
    if proc is not None:
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"bench-store: the before layout's run failed (exit {proc.returncode}): see its output above")
        else:
            before = orjson.loads(out)
    report(new, before, month_errors, budget_rows, minutes)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def sourced(results: dict[str, Any]) -> dict[str, Any]:
    """The results, with the tree their code came from (all of it: the venv's editable install finds the
    working tree's modules for names the before tree lacks)."""
    import agents.rollup
    root = Path(agents.rollup.__file__).resolve().parents[1]
    foreign = sorted(name for name, m in list(sys.modules.items())
                     if name.split(".")[0] in ("app", "agents", "tables") and getattr(m, "__file__", None)
                     and not Path(m.__file__ or "").resolve().is_relative_to(root))
    if foreign:
        raise AssertionError(f"modules from outside {root}: {', '.join(foreign)}")
    return {**results, "source": str(root)}


def check_fast_minute() -> None:
    """The 30 day run's vectorized minutes equal the API-built ones."""
    for rpm in TRAFFIC:
        t = traffic(rpm, 0, 2)
        if fast_minute(T0, t, 1000).to_record() != build_minute(T0, t, 1000).to_record():
            raise AssertionError(f"fast_minute differs from build_minute at {rpm} req/min")


if __name__ == "__main__":
    sys.exit(main())
