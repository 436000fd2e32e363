"""The query engine (app/api/query/engine.py): resolutions, the final/tail split, the answer cache
(stale-while-revalidate, shared misses, the memory bound, expiry) and the incremental refresh. The
``MemoryStore`` and minute helpers here serve the other query, web, agent and migration tests too."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import orjson
import pytest

from app.api.query import STALE_GRACE_S, MetricsQuery, auto_resolution, merge_buckets
from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import DIGEST, SUMMARY, Kind, MetricItem, Progress
from tables.aggregate import Aggregate, BucketKey

T0 = 1_764_000_000 - 1_764_000_000 % 7200  # a 2 h boundary
SETTINGS = Settings.of(query_settle_s=300.0, query_tail_ttl_s=1.0, query_cache_max_age_s=600.0,
                       query_tail_read_interval_s=0.0)


class MemoryStore:
    """The MetricsStore contract in memory: overwrite by key, half-open sorted ranges, expired items
    omitted (as DynamoStore), and a log of the queries made. Digest items are in ``items``, summary
    blocks in ``blocks``."""

    def __init__(self, clock: ManualClock, ttl_s: int = SETTINGS.storage.ttl_s) -> None:
        self.items: dict[tuple[str, str, int, int], bytes] = {}
        self.blocks: dict[tuple[str, str, int, int], bytes] = {}
        self.spans: dict[tuple[str, str, int, int], int] = {}
        self.clock = clock
        self.ttl_s = ttl_s
        self.queries: list[tuple[str, str, int, int, int]] = []
        self.block_queries: list[tuple[str, str, int, int, int]] = []
        self.puts = 0
        self.fail_puts = 0
        self.fail_queries = 0
        self.fail_progress = 0
        self.progress_items: dict[int, Progress] | None = None
        """None: every partition stored through the end of time (tests of other things); a dict: as published."""

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            raise StoreUnavailable("DynamoDB throttling", retry_after_s=0.01)
        self.puts += 1
        for it in items:
            key = (it.app, it.process_type, it.resolution_s, it.ts_s)
            (self.blocks if it.kind == SUMMARY else self.items)[key] = it.payload
            if it.kind == SUMMARY:
                self.spans[key] = it.span_s

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int, kind: Kind = DIGEST) -> list[MetricItem]:
        if self.fail_queries:
            self.fail_queries -= 1
            raise StoreUnavailable("DynamoDB unreachable", retry_after_s=2)
        (self.block_queries if kind == SUMMARY else self.queries).append(
            (app, process_type, resolution_s, since_s, until_s))
        now_s = self.clock.now_ms() // 1000
        source = self.blocks if kind == SUMMARY else self.items
        return [MetricItem(a, p, r, ts, v, kind) for (a, p, r, ts), v in sorted(source.items())
                if (a, p, r) == (app, process_type, resolution_s) and since_s <= ts < until_s
                and ts + self.spans.get((a, p, r, ts), 0) + self.ttl_s > now_s]

    async def series(self) -> list[tuple[str, str]]:
        return sorted({(a, p) for a, p, r, _ in self.items if r == 60})

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        if self.fail_progress:
            self.fail_progress -= 1
            raise StoreUnavailable("DynamoDB throttling", retry_after_s=0.01)
        if self.progress_items is None:
            self.progress_items = {}
        self.progress_items.update((p.partition, p) for p in progress)

    async def progress(self) -> list[Progress]:
        if self.fail_progress:
            self.fail_progress -= 1
            raise StoreUnavailable("DynamoDB unreachable", retry_after_s=2)
        if self.progress_items is None:
            return [Progress(p, 2**62, self.clock.now_ms(), {}) for p in range(SETTINGS.kafka.partitions)]
        return [self.progress_items[p] for p in sorted(self.progress_items)]


def minute(start_s: int, values: np.ndarray, *, app: str = "shop", proc: str = "web",
           mc: int = 1000) -> Aggregate:
    a = Aggregate(BucketKey(app, proc, start_s * 1000), max_centroids=mc)
    for i, v in enumerate(values):
        a.add_request(503 if i % 50 == 0 else 200, float(v), "H12" if i % 100 == 0 else None)
    a.add_runtime(100.0 + start_s % 7, 0.0, 120.0, 512.0, 0.1 * (start_s % 11))
    return a


def put_minutes(store: MemoryStore, aggs: Sequence[Aggregate]) -> None:
    for a in aggs:
        store.items[(a.key.app, a.key.process_type, 60, a.key.start_ms // 1000)] = orjson.dumps(a.to_record())


def test_auto_resolution_follows_the_platform_ranges() -> None:
    assert [auto_resolution(h * 3600) for h in (1, 2, 3, 24, 48, 71, 72, 120, 168, 720)] == \
           [60, 60, 600, 600, 600, 600, 3600, 3600, 7200, 7200]


async def test_final_buckets_come_from_rollup_items_and_tail_from_minutes_plus_live() -> None:
    rng = np.random.default_rng(5)
    now_s = T0 + 3 * 3600 + 130  # with 300 s settle, only [T0, T0 + 2 h) is final
    clock = ManualClock(now_s * 1000)
    store = MemoryStore(clock)
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.5, 100), mc=200) for i in range(3 * 60 + 2)]
    put_minutes(store, minutes)
    # Rollup items for the first two hours only (as agents/rollup.py writes them).
    for b, agg in merge_buckets(minutes[:120], 3600).items():
        store.items[("shop", "web", 3600, b)] = orjson.dumps(agg.to_record())
    live = minute(now_s - now_s % 60, rng.lognormal(3, 0.5, 40), mc=200)
    q = MetricsQuery(store, lambda a, p, s, u: [live] if s <= live.key.start_ms < u else [],
                     settings=SETTINGS, clock=clock)
    ans = await q.answer("shop", "web", 3600, T0, T0 + 4 * 3600)
    doc = orjson.loads(ans.body)
    assert not ans.final
    assert [p["ts"] for p in doc["points"]] == [T0, T0 + 3600, T0 + 7200, T0 + 3 * 3600]
    assert [p["requests"] for p in doc["points"]] == [6000, 6000, 6000, 200 + 40]
    # final buckets read the rollup items (resolution 3600); the two non-final ones merged minutes
    assert ("shop", "web", 3600, T0, T0 + 7200) in store.queries
    assert ("shop", "web", 60, T0 + 7200, T0 + 4 * 3600) in store.queries


async def test_tail_answers_are_reused_briefly_then_recomputed() -> None:
    now_s = T0 + 3600
    clock = ManualClock(now_s * 1000)
    store = MemoryStore(clock)
    q = MetricsQuery(store, settings=SETTINGS, clock=clock)
    a1 = await q.answer("shop", "web", 60, now_s - 600, now_s + 60)
    assert not a1.final and a1.points == 0
    put_minutes(store, [minute(now_s - 120, np.arange(1.0, 11.0), mc=50)])
    assert (await q.answer("shop", "web", 60, now_s - 600, now_s + 60)) is a1  # within the tail TTL
    clock.advance(1500)
    # Stale: served at once while one background task recomputes it (stale-while-revalidate) ...
    assert (await q.answer("shop", "web", 60, now_s - 600, now_s + 60)) is a1
    await asyncio.sleep(0.01)
    a3 = await q.answer("shop", "web", 60, now_s - 600, now_s + 60)  # ... whose result the next one gets
    assert a3.points == 1 and a3.etag != a1.etag
    clock.advance(int((SETTINGS.query.tail_ttl_s + STALE_GRACE_S) * 1000) + 1)
    store.items.clear()  # older than the stale grace: computed by the request itself
    assert (await q.answer("shop", "web", 60, now_s - 600, now_s + 60)).points == 0


async def test_expired_points_are_never_returned_even_from_the_cache() -> None:
    settings = SETTINGS.replace(ttl_days=1.0)
    clock = ManualClock((T0 + 7200) * 1000)
    store = MemoryStore(clock, ttl_s=settings.storage.ttl_s)
    put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50) for i in range(60)])
    q = MetricsQuery(store, settings=settings, clock=clock)
    assert (await q.answer("shop", "web", 60, T0, T0 + 3600)).points == 60
    clock.set((T0 + 86400 + 1800) * 1000)  # the first half hour has expired; the cache still holds it
    ans = await q.answer("shop", "web", 60, T0, T0 + 3600)
    assert ans.points == 29  # ts + ttl > now  <=>  ts > T0 + 1800
    assert min(p["ts"] for p in orjson.loads(ans.body)["points"]) == T0 + 1860


async def test_cache_memory_is_bounded() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    for proc in ("a", "b", "c", "d"):
        put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 11.0), proc=proc, mc=50) for i in range(120)])
    settings = SETTINGS.replace(query_cache_max_bytes=200_000)
    q = MetricsQuery(store, settings=settings, clock=clock)
    for proc in ("a", "b", "c", "d"):
        assert (await q.answer("shop", proc, 60, T0, T0 + 7200)).points == 120
        assert q.cache_bytes <= settings.query.cache_max_bytes
    n = len(store.queries)
    await q.answer("shop", "a", 60, T0, T0 + 7200)  # evicted (least recently used): read again
    assert len(store.queries) == n + 1


async def test_concurrent_identical_misses_share_one_read() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50) for i in range(60)])
    q = MetricsQuery(store, settings=SETTINGS, clock=clock)
    answers = await asyncio.gather(*(q.answer("shop", "web", 60, T0, T0 + 3600) for _ in range(20)))
    assert len({a.etag for a in answers}) == 1 and len(store.queries) == 1


async def test_store_failure_propagates_and_is_not_cached() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    store.fail_queries = 1
    q = MetricsQuery(store, settings=SETTINGS, clock=clock)
    with pytest.raises(StoreUnavailable):
        await q.answer("shop", "web", 60, T0, T0 + 3600)
    assert (await q.answer("shop", "web", 60, T0, T0 + 3600)).points == 0


@pytest.mark.parametrize("res", [60, 3600])
async def test_live_refresh_reuses_the_final_prefix_and_unchanged_tail_points_with_identical_results(
        res: int) -> None:
    """A refresh re-renders only the tail; its body and ETag equal a computation from scratch."""
    now_s = T0 + 3 * 3600 + 20 * 60 + 10
    clock = ManualClock(now_s * 1000)
    store = MemoryStore(clock)
    minutes = [minute(T0 + 60 * i, np.arange(1.0, 21.0 + i % 7), mc=50) for i in range(3 * 60 + 19)]
    put_minutes(store, minutes)
    for b, agg in merge_buckets(minutes, 3600).items():
        rec = agg.to_record()
        rec["mins"] = [m.key.start_ms // 1000 for m in minutes if b <= m.key.start_ms // 1000 < b + 3600]
        store.items[("shop", "web", 3600, b)] = orjson.dumps(rec)
    live = [minute(now_s - now_s % 60, np.arange(1.0, 6.0), mc=50)]
    counters = Counters()
    q = MetricsQuery(store, lambda a, p, s, u: [m for m in live if s <= m.key.start_ms < u], settings=SETTINGS,
                     clock=clock, counters=counters)

    async def fresh() -> tuple[bytes, str]:
        scratch = MetricsQuery(store, lambda a, p, s, u: [m for m in live if s <= m.key.start_ms < u],
                               settings=SETTINGS, clock=clock)
        a = await scratch.answer("shop", "web", res, T0, now_s + 60)
        return a.body, a.etag

    a1 = await q.answer("shop", "web", res, T0, now_s + 60)
    assert (a1.body, a1.etag) == await fresh() and not a1.final
    # The open minute changes and a new minute is stored; the edge has not moved.
    live[0] = minute(now_s - now_s % 60, np.arange(1.0, 9.0), mc=50)
    put_minutes(store, [minute(now_s - now_s % 60 - 60, np.arange(1.0, 4.0), mc=50)])
    clock.advance(1500)
    assert await q.answer("shop", "web", res, T0, now_s + 60) is a1  # stale, refreshed in the background
    await asyncio.sleep(0.01)
    a2 = await q.answer("shop", "web", res, T0, now_s + 60)
    assert a2 is not a1 and (a2.body, a2.etag) == await fresh()
    assert counters.values["query_prefix_reused"] == 1
    # At 1 min the stored tail minutes that did not change are not decoded again; the 1 h tail bucket holds
    # the open minute, so it is merged anew.
    assert counters.values["query_tail_points_reused"] >= (3 if res == 60 else 0)
    # The edge moves a minute on: the prefix is rebuilt (one more final point at 1 min) and still identical.
    clock.advance(60_000)
    now_s += 60
    live[0] = minute(now_s - now_s % 60, np.arange(1.0, 3.0), mc=50)
    q2 = await q.answer("shop", "web", res, T0, now_s + 60)
    assert (q2.body, q2.etag) == await fresh()
