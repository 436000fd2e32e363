"""The rollup job (agents/rollup.py) over a mapping-backed table and the in-memory store contract."""

from __future__ import annotations

import asyncio
import itertools
import math
import zlib
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.progress import Watermarks
from agents.rollup import PENDING, Rollup, catalog_key, since_key, table_key
from app.api.query import STALE_GRACE_S, Answer, MetricsQuery, merge_buckets
from app.clock import ManualClock
from app.errors import StoreError, StoreUnavailable
from app.ops.stats import Counters
from app.storage import catalog
from app.storage.protocol import MetricItem, Progress
from tables import record as records
from tables.aggregate import Aggregate, BucketKey, bucket_of
from tables.summary import BLOCK_SPAN_S, SummaryBlock, block_of, point_json
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make(clock: ManualClock | None = None) -> tuple[Rollup, dict[bytes, Any], MemoryStore, Counters, Sleeps]:
    clock = clock or ManualClock((T0 + 3 * 3600) * 1000)
    table: dict[bytes, Any] = {}
    store = MemoryStore(clock)
    counters = Counters()
    sleeps = Sleeps()
    r = Rollup(table, store, SETTINGS.storage, SETTINGS.query.replace(rollup_flush_s=60), counters,
               context_topic="metrics-1m", clock=clock, sleep=sleeps)
    return r, table, store, counters, sleeps


FAR_S = T0 + 365 * 86400


async def fold(r: Rollup, batch: list[tuple[int, bytes]], through_s: int = FAR_S) -> int:
    """The job's two halves, as a caught-up pipeline runs them: merge the batch, then store what
    ``through_s`` (every minute ending by it merged; by default all) made final."""
    n = await r.process(batch)
    await r.flush({p: through_s * 1000 for p in {0, *(p for p, _ in batch)}})
    return n


def record(a: Aggregate) -> bytes:
    return orjson.dumps(a.to_record())


def stored(store: MemoryStore, res: int, ts: int) -> Aggregate:
    return records.decode(store.items[("shop", "web", res, ts)])[0]


async def test_two_hours_of_minutes_roll_up_exactly_and_percentiles_match_raw() -> None:
    rng = np.random.default_rng(11)
    r, table, store, counters, _ = make()
    raw = [rng.lognormal(3.0 + (2.0 if i % 17 == 0 else 0.0), 0.7, rng.integers(100, 600)) for i in range(120)]
    values = [(0, record(minute(T0 + 60 * i, v))) for i, v in enumerate(raw)]
    for i in range(0, 120, 25):  # several batches, as the agent sees them
        await fold(r, values[i:i + 25])
    assert counters.values["rollup_minutes_merged"] == 3 * 120
    assert {k[2:] for k in store.items} == {(600, T0 + 600 * i) for i in range(12)} | {(3600, T0), (3600, T0 + 3600),
                                                                                      (7200, T0)}
    for res, ts, chunk in ((7200, T0, raw), (3600, T0 + 3600, raw[60:]), (600, T0 + 600, raw[10:20])):
        p = stored(store, res, ts).summary()
        exact = np.concatenate(chunk)
        assert p["ts"] == ts and p["requests"] == len(exact)
        assert p["response_ms"]["max"] == exact.max()
        assert abs(p["response_ms"]["mean"] - exact.mean()) <= 1e-9 * exact.mean()
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            want = float(np.quantile(exact, q))
            assert abs(p["response_ms"][name] - want) <= 0.01 * want, (res, name, p["response_ms"][name], want)
    # The stored item lists its minutes, so a read-back knows what it already holds.
    assert records.decode(store.items[("shop", "web", 7200, T0)])[1] == [T0 + 60 * i for i in range(120)]
    # 15 rollup buckets, 5 summary blocks (two hours of minutes, one block each of 10 min, 1 h, 2 h points),
    # since when the series' blocks are complete, and the day's process-type catalog.
    assert len(table) == 22 and orjson.loads(zlib.decompress(table[since_key("shop", "web")]))["since"] == T0
    day = catalog.day_of(T0)
    assert orjson.loads(zlib.decompress(table[catalog_key("shop", day)]))["procs"] == ["web"]
    assert await catalog.process_types(store, "shop", T0, T0 + 7200) == {"web"}
    assert {(k[2], k[3]) for k in store.blocks if k[1] != catalog.CATALOG_PROCESS_TYPE} == {
        (60, T0), (60, T0 + 3600), (600, block_of(T0, 600)), (3600, block_of(T0, 3600)), (7200, block_of(T0, 7200))}


async def test_redelivered_minutes_are_not_merged_twice() -> None:
    r, _, store, counters, _ = make()
    batch = [(0, record(minute(T0 + 60 * i, np.arange(1.0, 101.0), mc=100))) for i in range(10)]
    await fold(r, batch)
    before = dict(store.items)
    puts = store.puts
    assert await fold(r, batch[3:7]) == 0  # redelivery after a restart: nothing changes, nothing written
    assert store.items == before and store.puts == puts
    assert counters.values["rollup_minutes_replayed"] == 3 * 4
    assert stored(store, 600, T0).requests == 1000


async def test_evicted_bucket_is_read_back_for_a_late_minute_and_replays_stay_idempotent() -> None:
    clock = ManualClock((T0 + 3600) * 1000)
    r, table, store, counters, _ = make(clock)
    await fold(r, [(1, record(minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50))) for i in range(9)])
    clock.set((T0 + 7200 + int(SETTINGS.query.rollup_evict_after_s) + 1) * 1000)
    assert r.evict({0}) == 0  # partition 1 is not ours: its owner evicts it
    # The buckets and the minute block go; the coarser summary blocks stay until their own span ends.
    ended = [res for res in (60, 600, 3600, 7200) if block_of(T0, res) + BLOCK_SPAN_S[res] <= T0 + 7200]
    assert 60 in ended and 7200 not in ended
    assert r.evict({1}) == 3 + len(ended) and all(k.startswith((b"s|", b"m|", b"c|")) for k in table)
    clock.set((T0 + 8 * 86400 + int(SETTINGS.query.rollup_evict_after_s) + 1) * 1000)
    # The coarser blocks and the day's catalog.
    assert r.evict({1}) == 4 - len(ended) + 1 and list(table) == [since_key("shop", "web")]
    await fold(r, [(1, record(minute(T0 + 60 * 9, np.arange(1.0, 11.0), mc=50)))])  # late minute
    # First sight: 3 buckets, 4 blocks, the 3 coarser blocks seeded from their (empty) span, and the day's
    # catalog before it is written. After eviction: the 3 buckets, 4 blocks and the catalog are read back.
    assert counters.values["rollup_store_reads"] == 3 + 4 + 3 + 1 + 3 + 4 + 1
    assert stored(store, 600, T0).requests == 100 and stored(store, 7200, T0).requests == 100
    blocks = {res: SummaryBlock.decode(store.blocks[("shop", "web", res, block_of(T0, res))])
              for res in (60, 600, 3600, 7200)}
    assert sorted(blocks[60].points) == [T0 + 60 * i for i in range(10)] and not blocks[60].partial
    assert orjson.loads(blocks[600].points[T0])["requests"] == 100
    r.evict({1})
    await fold(r, [(1, record(minute(T0, np.arange(1.0, 11.0), mc=50)))])  # an old redelivery
    assert stored(store, 600, T0).requests == 100
    assert counters.values["rollup_minutes_replayed"] == 3


async def test_dynamodb_unavailable_is_retried_and_state_is_written_only_after_success() -> None:
    """Reads of a bucket the table lacks are retried by the backoff rule; a flush the store refuses raises
    (the publisher publishes nothing and calls again), and the table marks a value stored only after the store
    accepted it."""
    r, table, store, counters, sleeps = make()
    store.fail_queries = 1
    await r.process([(0, record(minute(T0, np.arange(1.0, 11.0), mc=50)))])
    assert counters.values["rollup_retries"] == 1 and len(sleeps.calls) == 1
    assert all(0.01 <= s <= SETTINGS.storage.backoff_max_ms / 1000 for s in sleeps.calls)  # at least retry_after_s
    assert store.items == {} and all(v[0] == PENDING for k, v in table.items() if not k.startswith(b"m|"))
    store.fail_puts = 1
    with pytest.raises(StoreUnavailable):
        await r.flush({0: (T0 + 7200) * 1000})
    assert store.items == {} and all(v[0] == PENDING for k, v in table.items() if not k.startswith(b"m|"))
    written: list[int] = []
    original = table.__setitem__

    class Watch(dict[bytes, Any]):
        def __setitem__(self, k: bytes, v: Any) -> None:
            written.append(store.puts)  # puts accepted by the store when the table is written
            original(k, v)

    watch = Watch(table)
    r.table = watch
    assert await r.flush({0: (T0 + 7200) * 1000}) == {0: (T0 + 7200) * 1000}
    assert written == [1] * 8  # 3 buckets, 4 blocks and a catalog, marked stored after the successful put
    assert all(v[0] != PENDING for v in table.values())
    assert stored(store, 3600, T0).requests == 10


async def test_invalid_records_are_counted_and_skipped() -> None:
    r, _, store, counters, _ = make()
    assert await fold(r, [(0, b"{oops"), (0, b'{"res_s": 600}'),
                            (0, record(minute(T0, np.arange(1.0, 11.0), mc=50)))]) == 3
    assert counters.values["rollup_minutes_invalid"] == 2 and len(store.items) == 3


async def test_query_reads_rollups_written_by_the_job_same_as_merging_minutes() -> None:
    """The API's precomputed path and its read-time merge give the same points."""
    rng = np.random.default_rng(2)
    clock = ManualClock((T0 + 86400) * 1000)
    r, _, store, _, _ = make(clock)
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.8, 200), mc=300) for i in range(240)]
    await fold(r, [(0, record(m)) for m in minutes])
    for m in minutes:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    pre = MetricsQuery(store, settings=SETTINGS, clock=clock)
    merged = MetricsQuery(store, settings=SETTINGS.replace(query_use_rollups=False), clock=clock)
    for res in (600, 3600, 7200):
        a = orjson.loads((await pre.answer("shop", "web", res, T0, T0 + 4 * 3600)).body)
        b = orjson.loads((await merged.answer("shop", "web", res, T0, T0 + 4 * 3600)).body)
        assert a == b and len(a["points"]) == 4 * 3600 // res
    assert table_key(("shop", "web", 600, T0)) == b"r|shop|web|600|" + str(T0).encode()


# --- summary blocks: what the query path reads for final points ----------------------------------------

def _minute_from(start_s: int, spec: dict[str, Any]) -> Aggregate:
    a = Aggregate(BucketKey("shop", "web", start_s * 1000), max_centroids=200)
    for status, ms in spec["requests"]:
        a.add_request(status, None if ms < 0 else float(ms), f"H{status % 30}" if status >= 500 else None)
    if spec["rss"] is not None:
        a.add_runtime(spec["rss"], 0.0, spec["rss"] + 10.0, 512.0, spec["rss"] / 1000)
    for name, kind, v in spec["metrics"]:
        a.add_metric(name, kind, v, start_s * 1000 + 5)
    for source, samples in spec["addons"]:
        a.add_addon(source, samples, start_s * 1000 + 7)
    for event in spec["platform"]:
        a.add_event(event)
    return a


MINUTE = st.fixed_dictionaries({
    # a negative service time stands for a request without one (the router answered it: H10, H14, ...)
    "requests": st.lists(st.tuples(st.sampled_from([200, 201, 302, 404, 500, 503]), st.integers(-1, 30_000)),
                         max_size=40),
    "addons": st.lists(st.tuples(st.sampled_from(["DATABASE", "REDIS"]),
                                 st.dictionaries(st.sampled_from(["db_size_mb", "hit_rate"]), st.floats(0.0, 1e6),
                                                 min_size=1)), max_size=2),
    "platform": st.lists(st.sampled_from(["R14", "crash", "release"]), max_size=3),
    "rss": st.none() | st.floats(1.0, 4096.0),
    "metrics": st.lists(st.tuples(st.sampled_from(["db", "cache"]), st.sampled_from(["timer", "counter", "gauge"]),
                                  st.floats(0.0, 1e6)), max_size=4),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(minutes=st.lists(st.tuples(st.integers(0, 3 * 24 * 60 - 1), MINUTE), min_size=1, max_size=60,
                        unique_by=lambda t: t[0]),
       cuts=st.lists(st.integers(1, 59), max_size=5))
def test_summary_blocks_equal_what_the_digests_give(minutes: list[tuple[int, dict[str, Any]]],
                                                    cuts: list[int]) -> None:
    """For generated minutes (any batch split) and every resolution, the points read from summary blocks
    are byte-for-byte those computed from the digest items (minutes, rollup items), and equal to minutes
    merged at read time (exact counts, sums within float rounding)."""
    async def run() -> None:
        clock = ManualClock((T0 + 4 * 86400) * 1000)
        r, _, store, _, _ = make(clock)
        aggs = sorted((_minute_from(T0 + 60 * m, spec) for m, spec in minutes), key=lambda a: a.key.start_ms)
        values = [(0, record(a)) for a in aggs]
        bounds = [0, *sorted(c for c in cuts if c < len(values)), len(values)]
        for lo, hi in itertools.pairwise(bounds):
            await fold(r, values[lo:hi])
        for a in aggs:  # what the sink stores
            store.items[("shop", "web", 60, a.key.start_ms // 1000)] = record(a)
        store.queries = []
        since, until = T0 - 7 * 86400, T0 + 3 * 86400
        for res in (60, 600, 3600, 7200):
            from_blocks = await MetricsQuery(store, settings=SETTINGS, clock=clock).answer(
                "shop", "web", res, since, until)
            # Final points come from blocks alone: digests are looked for only outside the blocks' reach (before
            # the first minute, after the newest block), where there are none.
            assert not any(r == res and lo <= ts < hi for (_, _, r, ts) in store.items
                           for (_, _, res, lo, hi) in store.queries)
            assert len(store.queries) <= 2
            blocks, store.blocks = store.blocks, {}
            from_digests = await MetricsQuery(store, settings=SETTINGS, clock=clock).answer(
                "shop", "web", res, since, until)
            merged = await MetricsQuery(store, settings=SETTINGS.replace(query_use_rollups=False),
                                        clock=clock).answer("shop", "web", res, since, until)
            store.blocks, store.queries = blocks, []
            assert from_blocks.body == from_digests.body
            got, want = orjson.loads(from_blocks.body)["points"], orjson.loads(merged.body)["points"]
            assert [p["ts"] for p in got] == [p["ts"] for p in want]
            for p, q in zip(got, want, strict=True):
                assert _close(p, q), (res, p, q)

    asyncio.run(run())


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


async def test_a_range_written_before_summary_blocks_reads_from_its_digests() -> None:
    """Old items (no blocks) next to new ones: the answer is the same as from digests alone, and only the
    spans without a block read digests."""
    rng = np.random.default_rng(4)
    clock = ManualClock((T0 + 86400) * 1000)
    r, _, store, counters, _ = make(clock)
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.8, 50), mc=100) for i in range(4 * 60)]
    old, new = minutes[:120], minutes[120:]
    for m in old:  # written by a version without blocks: the sink's minutes and the rollup items
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    for res in (600, 3600, 7200):
        for b, agg in merge_buckets(old, res).items():
            rec = agg.to_record()
            rec["mins"] = [m.key.start_ms // 1000 for m in old if b <= m.key.start_ms // 1000 < b + res]
            store.items[("shop", "web", res, b)] = orjson.dumps(rec)
    await fold(r, [(0, record(m)) for m in new])
    for m in new:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    store.queries = []
    q = MetricsQuery(store, settings=SETTINGS, clock=clock, counters=counters)
    got = orjson.loads((await q.answer("shop", "web", 60, T0, T0 + 4 * 3600)).body)["points"]
    assert [p["ts"] for p in got] == [m.key.start_ms // 1000 for m in minutes]
    assert got == [orjson.loads(point_json(m)) for m in minutes]
    # Hours 0-1 have no block: one digest read for them; hours 2-3 come from their blocks.
    assert store.queries == [("shop", "web", 60, T0, T0 + 7200)]
    assert counters.values["query_digest_fallbacks"] == 1
    # The coarser blocks the new minutes touched were seeded from the old rollup items of their span: only
    # a block span wholly before the upgrade reads digests.
    store.queries = []
    for res in (600, 3600, 7200):
        doc = orjson.loads((await q.answer("shop", "web", res, T0, T0 + 4 * 3600)).body)
        assert sum(p["requests"] for p in doc["points"]) == 50 * 4 * 60
        assert doc["points"] == [orjson.loads(point_json(a)) for a in merge_buckets(minutes, res).values()]
    assert all(res == 600 and hi <= block_of(T0 + 7200, 600) for (_, _, res, _, hi) in store.queries)


async def test_a_minute_block_lacking_a_minute_of_its_hour_is_partial_until_read_back() -> None:
    """Upgrade race: the old rollup job merged a minute the sink had not stored when the block was seeded.
    The block says ``partial`` (readers use the digests) until a later batch finds the minute."""
    clock = ManualClock((T0 + 86400) * 1000)
    r, _, store, _, _ = make(clock)
    ms = [minute(T0 + 60 * i, np.arange(1.0, 21.0), mc=50) for i in range(4)]
    rec = ms[0].to_record()
    merged = Aggregate.from_record(orjson.loads(record(ms[0])))
    merged.merge(ms[1])
    rec = merged.to_record()
    rec["mins"] = [T0, T0 + 60]
    store.items[("shop", "web", 3600, T0)] = orjson.dumps(rec)  # the old job's hour bucket
    store.items[("shop", "web", 60, T0)] = record(ms[0])  # minute 1 not stored yet
    await fold(r, [(0, record(ms[2]))])
    block = SummaryBlock.decode(store.blocks[("shop", "web", 60, T0)])
    assert block.partial and sorted(block.points) == [T0, T0 + 120]
    store.items[("shop", "web", 60, T0 + 60)] = record(ms[1])  # the sink catches up
    await fold(r, [(0, record(ms[3]))])
    block = SummaryBlock.decode(store.blocks[("shop", "web", 60, T0)])
    assert not block.partial and sorted(block.points) == [T0 + 60 * i for i in range(4)]


async def test_a_partial_or_unreadable_block_is_not_trusted() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    ms = [minute(T0 + 60 * i, np.arange(1.0, 21.0), mc=50) for i in range(3)]
    for m in ms:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    store.blocks[("shop", "web", 60, T0)] = SummaryBlock(60, T0, {T0: point_json(ms[0])}, partial=True).encode()
    store.blocks[("shop", "web", 60, T0 + 3600)] = b'{"v": 99}\n{}'
    q = MetricsQuery(store, settings=SETTINGS, clock=clock)
    doc = orjson.loads((await q.answer("shop", "web", 60, T0, T0 + 7200)).body)
    assert [p["ts"] for p in doc["points"]] == [T0, T0 + 60, T0 + 120]
    assert store.queries == [("shop", "web", 60, T0, T0 + 7200)]


async def test_the_live_edge_is_served_from_block_points_and_merges_only_what_they_lack() -> None:
    """The newest buckets: a final bucket whose block point holds every stored minute is served as stored
    (no digest read); an open 10 min bucket (no rollup item yet: it is written once final) is merged from
    its stored minutes, an open 1 h one from its partial item (written at each flush boundary) and the
    minutes after it, and a minute open in this worker. Every point equals the truth (all minutes merged)."""
    rng = np.random.default_rng(8)
    now_s = T0 + 3600 + 150  # settle 300 s: the edge is at T0 + 3600 - 300 (1 min) or T0 + 3000 (10 min)
    clock = ManualClock(now_s * 1000)
    r, _, store, _, _ = make(clock)
    ms = [minute(T0 + 60 * i, rng.lognormal(3, 0.7, 80), mc=100) for i in range(63)]
    await fold(r, [(0, record(m)) for m in ms[:61]], T0 + 61 * 60)  # one minute behind the sink
    for m in ms[:62]:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    open_minute = ms[62]  # still open in this worker

    def live(app: str, proc: str, since_ms: int, until_ms: int) -> list[Aggregate]:
        return [open_minute] if since_ms <= open_minute.key.start_ms < until_ms else []

    for res in (60, 600, 3600):
        store.queries = []
        q = MetricsQuery(store, live, settings=SETTINGS, clock=clock)
        got = orjson.loads((await q.answer("shop", "web", res, T0, now_s)).body)["points"]
        assert got == [orjson.loads(point_json(a)) for a in merge_buckets(ms, res).values()], res
        edge = (now_s - 300) - (now_s - 300) % res
        minute_reads = [(lo, hi) for (_, _, r_, lo, hi) in store.queries if r_ == 60]
        # Only the minutes no stored point holds are read as digests: the one the minute block lacks, or
        # those of the open bucket; the rest of the edge is block points.
        first = bucket_of(T0 + 61 * 60, res) if res == 600 else T0 + 61 * 60  # the open 1 h one is partial
        assert minute_reads == [(first, -(-now_s // res) * res)], (res, minute_reads)
        rollup_reads = [(lo, hi) for (_, _, r_, lo, hi) in store.queries if r_ == res and res != 60]
        # One read of the edge's rollup items, beside its blocks (one round trip).
        assert rollup_reads == ([] if res == 60 else [(edge, -(-now_s // res) * res)])
        assert edge <= T0 + 61 * 60


async def test_an_item_the_store_refuses_for_good_does_not_cost_the_others() -> None:
    """One oversized block (e.g. a minute with thousands of custom metrics) is refused; the other items of
    the batch are written; a refusal of everything (permissions) stops after a few single writes."""
    r, _, store, counters, _ = make()

    class Refusing(MemoryStore):
        bad_app = "huge"
        calls = 0

        async def put_many(self, items: Any) -> None:
            self.calls += 1
            if any(i.app == self.bad_app or self.bad_app == "*" for i in items):
                raise StoreError("item over 400 KB", action="split it")
            await super().put_many(items)

    refusing = Refusing(store.clock)
    r.store = refusing
    await fold(r, [(0, record(minute(T0, np.arange(1.0, 11.0), mc=50))),
                     (0, record(minute(T0, np.arange(1.0, 11.0), mc=50, app="huge")))])
    assert {k[0] for k in refusing.items} == {"shop"} and {k[0] for k in refusing.blocks} == {"shop"}
    # huge's 3 buckets, 4 blocks and its day's catalog
    assert counters.values["rollup_failed"] == 8 and counters.values["rollup_items_written"] == 3
    refusing.bad_app, refusing.calls = "*", 0
    await fold(r, [(0, record(minute(T0 + 60, np.arange(1.0, 11.0), mc=50, app=a))) for a in ("shop", "cart")])
    # 7 items of each app and cart's new catalog (shop's already names web): one batch, then 8 single writes
    assert refusing.calls == 1 + 8 and counters.values["rollup_failed"] == 8 + 15


# --- "final" means stored (agents/progress.py) ----------------------------------------------------------

def _watermark(store: MemoryStore, through_ms: int, now_ms: int, changed: dict[str, int] | None = None) -> None:
    store.progress_items = {p: Progress(p, through_ms, now_ms, dict(changed or {}))
                            for p in range(SETTINGS.kafka.partitions)}


async def _ask_after_refresh(q: MetricsQuery, clock: ManualClock, res: int, since_s: int, until_s: int) -> Answer:
    """Once the progress interval has passed, a request starts a background re-read of the watermarks and is
    answered with the last ones; a request after that answer's freshness sees the new ones."""
    await q.answer("shop", "web", res, since_s, until_s)
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance(int((SETTINGS.query.tail_ttl_s + STALE_GRACE_S) * 1000) + 1)
    return await q.answer("shop", "web", res, since_s, until_s)


async def test_a_range_asked_before_it_was_stored_returns_the_stored_data_once_it_is() -> None:
    """Caches on, every resolution: asked while the pipeline lags (empty, live), asked once stored but before
    the watermark moved (read again, still live), asked after (final, and complete)."""
    rng = np.random.default_rng(21)
    now_s = T0 + 5 * 3600
    clock = ManualClock(now_s * 1000)
    r, _, store, _, _ = make(clock)
    _watermark(store, T0 * 1000, clock.now_ms())
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.6, 40), mc=100) for i in range(120)]
    queries = {res: MetricsQuery(store, settings=SETTINGS, clock=clock) for res in (60, 600, 3600, 7200)}
    for res, q in queries.items():
        ans = await q.answer("shop", "web", res, T0, T0 + 7200)
        assert orjson.loads(ans.body)["points"] == [] and not ans.final, res
    await fold(r, [(0, record(m)) for m in minutes])  # the sink and the rollup job catch up
    for m in minutes:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    clock.advance(int((SETTINGS.query.tail_ttl_s + STALE_GRACE_S) * 1000) + 1)  # past stale-while-revalidate
    for res, q in queries.items():
        ans = await q.answer("shop", "web", res, T0, T0 + 7200)
        assert len(orjson.loads(ans.body)["points"]) == 7200 // res and not ans.final, res
    _watermark(store, (T0 + 7200) * 1000, clock.now_ms())
    clock.advance(int((SETTINGS.query.tail_ttl_s + STALE_GRACE_S) * 1000) + 1)
    for res, q in queries.items():
        ans = await _ask_after_refresh(q, clock, res, T0, T0 + 7200)
        want = [orjson.loads(point_json(a)) for a in merge_buckets(minutes, res).values()]
        assert orjson.loads(ans.body)["points"] == want and ans.final, res


async def test_a_late_minute_drops_the_cached_answer_of_its_app() -> None:
    rng = np.random.default_rng(22)
    clock = ManualClock((T0 + 5 * 3600) * 1000)
    wm = Watermarks(clock=clock)
    r, _, store, counters, _ = make(clock)
    r.watermarks = wm
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.6, 40), mc=100) for i in range(60) if i != 30]
    await fold(r, [(0, record(m)) for m in minutes])
    wm.checkpoint(0, (T0 + 3600) * 1000, end_offset=1)
    wm.committed(0, 1)
    _watermark(store, (T0 + 3600) * 1000, clock.now_ms())
    q = MetricsQuery(store, settings=SETTINGS, clock=clock, counters=counters)
    first = await q.answer("shop", "web", 60, T0, T0 + 3600)
    assert first.final and len(orjson.loads(first.body)["points"]) == 59
    # Minute 30 arrives late (a new sender's backlog): stored behind the watermark, and noted.
    late = minute(T0 + 1800, rng.lognormal(3, 0.6, 40), mc=100)
    await fold(r, [(0, record(late))])
    assert counters.values["minutes_stored_late"] == 1 and wm.changed[0] == {"shop": clock.now_ms()}
    assert (await q.answer("shop", "web", 60, T0, T0 + 3600)).body == first.body  # within the read interval
    _watermark(store, (T0 + 3600) * 1000, clock.now_ms(), wm.changed[0])
    clock.advance(1_000)
    again = await _ask_after_refresh(q, clock, 60, T0, T0 + 3600)
    assert [p["ts"] for p in orjson.loads(again.body)["points"]] == [T0 + 60 * i for i in range(60)]
    assert counters.values["query_cache_invalidations"] >= 2  # the answer and the series range


async def test_a_watermark_moving_back_drops_final_answers_of_its_partition() -> None:
    """A replay of old data reaches a range already answered (empty) as final: the watermark moves back, the
    cached answer goes, and once the replay is stored the range answers its data."""
    rng = np.random.default_rng(23)
    clock = ManualClock((T0 + 5 * 3600) * 1000)
    r, _, store, counters, _ = make(clock)
    _watermark(store, (T0 + 7200) * 1000, clock.now_ms())
    q = MetricsQuery(store, settings=SETTINGS, clock=clock, counters=counters)
    empty = await q.answer("shop", "web", 600, T0, T0 + 3600)
    assert empty.final and orjson.loads(empty.body)["points"] == []
    clock.advance(1_000)
    _watermark(store, T0 * 1000, clock.now_ms())  # the replay's windows open behind the watermark
    assert not (await _ask_after_refresh(q, clock, 600, T0, T0 + 3600)).final
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.6, 40), mc=100) for i in range(60)]
    await fold(r, [(0, record(m)) for m in minutes])
    for m in minutes:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    clock.advance(1_000)
    _watermark(store, (T0 + 7200) * 1000, clock.now_ms())
    ans = await _ask_after_refresh(q, clock, 600, T0, T0 + 3600)
    assert ans.final and [p["requests"] for p in orjson.loads(ans.body)["points"]] == [400] * 6
    assert counters.values["query_cache_invalidations"] >= 1


# --- written once final (issue 23: write units per series-minute) ----------------------------------------

async def _minute_by_minute(r: Rollup, minutes: list[Aggregate]) -> None:
    """As the pipeline runs: each minute merged, then a flush with the watermark at its end."""
    for m in minutes:
        await r.process([(0, record(m))])
        await r.flush({0: m.key.start_ms + 60_000})


async def test_each_rollup_item_is_written_once_final_and_the_open_blocks_once_per_flush_interval() -> None:
    clock = ManualClock((T0 + 3 * 3600) * 1000)
    store = MemoryStore(clock)
    counters = Counters()
    r = Rollup({}, store, SETTINGS.storage, SETTINGS.query.replace(rollup_flush_s=600), counters,
               context_topic="metrics-1m", clock=clock)
    writes: list[tuple[int, int, str]] = []
    put_many = store.put_many

    async def counting(items: Any) -> None:
        writes.extend((i.resolution_s, i.ts_s, i.kind) for i in items)
        await put_many(items)

    store.put_many = counting  # type: ignore[method-assign]
    rng = np.random.default_rng(31)
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.7, 50), mc=100) for i in range(125)]
    await _minute_by_minute(r, minutes)
    digests = Counter((res, ts) for res, ts, kind in writes if kind == "digest")
    # A 10 min bucket is written once, when final; the open one (at 120 min) not yet. A 1 h or 2 h bucket is
    # also written partial at each 10 minute boundary while open (its live edge reads it).
    assert {k: n for k, n in digests.items() if k[0] == 600} == {(600, T0 + 600 * i): 1 for i in range(12)}
    # (The first hour: at the boundaries T0 .. T0 + 3000, then final; the second: 4200 .. 6600, as its first
    # minute came after the boundary at its start; the third's first minute came after its boundary too.)
    assert {k: n for k, n in digests.items() if k[0] != 600} == {(3600, T0): 7, (3600, T0 + 3600): 6,
                                                                 (7200, T0): 13}
    minute_blocks = [ts for res, ts, kind in writes if kind == "summary" and res == 60]
    assert minute_blocks == [T0] * 6 + [T0 + 3600] * 6  # once per 10 minutes, the hour's block
    assert len(writes) <= 12 + 24 + 12 + 12 + 2 + 1 + 3  # 10 min items, 1 h / 2 h items, blocks, seeds
    # What the watermark may say: the last boundary while minutes after it are pending.
    assert await r.flush({0: (T0 + 125 * 60) * 1000}) == {0: (T0 + 7200) * 1000}
    # The query answers every point, final ones from blocks and the open edge from minute items.
    for m in minutes:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    _watermark(store, (T0 + 7200) * 1000, clock.now_ms())
    for res in (60, 600, 3600, 7200):
        got = orjson.loads((await MetricsQuery(store, settings=SETTINGS, clock=clock).answer(
            "shop", "web", res, T0, T0 + 3 * 3600)).body)["points"]
        assert got == [orjson.loads(point_json(a)) for a in merge_buckets(minutes, res).values()], res


async def test_pending_writes_survive_a_restart_and_are_never_evicted_before_stored() -> None:
    """A new worker (rebalance, restart) finds what the previous one merged but did not store in the
    changelogged table, and stores it on its first flush."""
    clock = ManualClock((T0 + 30 * 86400) * 1000)
    r, table, store, _, _ = make(clock)
    await r.process([(3, record(minute(T0 + 60 * i, np.arange(1.0, 21.0), mc=50))) for i in range(10)])
    assert r.evict({3}) == 0 and store.items == {}
    again = Rollup(table, store, SETTINGS.storage, SETTINGS.query.replace(rollup_flush_s=60), Counters(),
                   context_topic="metrics-1m", clock=clock)
    assert await again.flush({3: (T0 + 600) * 1000}) == {3: (T0 + 600) * 1000}
    assert stored(store, 600, T0).requests == 200
    # The open hour is stored partial, listing its minutes, and stays pending until it ends.
    assert records.decode(store.items[("shop", "web", 3600, T0)])[1] == [T0 + 60 * i for i in range(10)]
    assert table[table_key(("shop", "web", 3600, T0))][0] == PENDING
    assert SummaryBlock.decode(store.blocks[("shop", "web", 60, T0)]).points.keys() == {T0 + 60 * i for i in range(10)}


async def test_an_open_two_hour_bucket_is_merged_from_its_partial_item() -> None:
    """The live edge of a 2 h chart: the open bucket's partial item and the minutes after it."""
    rng = np.random.default_rng(32)
    now_s = T0 + 95 * 60
    clock = ManualClock(now_s * 1000)
    r, _, store, _, _ = make(clock)
    ms = [minute(T0 + 60 * i, rng.lognormal(3, 0.7, 30), mc=100) for i in range(95)]
    await fold(r, [(0, record(m)) for m in ms], T0 + 95 * 60)
    for m in ms:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    _watermark(store, (T0 + 90 * 60) * 1000, clock.now_ms())
    want = [orjson.loads(point_json(a)) for a in merge_buckets(ms, 7200).values()]
    # The open bucket's partial item (written at the last boundary) holds every minute: nothing else is read.
    store.queries = []
    got = orjson.loads((await MetricsQuery(store, settings=SETTINGS, clock=clock).answer(
        "shop", "web", 7200, T0, now_s)).body)["points"]
    assert got == want
    assert [(res, lo) for (_, _, res, lo, _) in store.queries] == [(7200, T0), (60, T0 + 95 * 60)]
    # Without it (a partial write the store refused): the bucket's minutes, the same answer.
    del store.items[("shop", "web", 7200, T0)]
    store.queries = []
    got = orjson.loads((await MetricsQuery(store, settings=SETTINGS, clock=clock).answer(
        "shop", "web", 7200, T0, now_s)).body)["points"]
    assert got == want
    assert [(lo, hi) for (_, _, res, lo, hi) in store.queries if res == 60] == [(T0, T0 + 7200)]


async def test_the_process_type_catalog_names_every_process_type_of_each_day_even_after_a_table_rebuild() -> None:
    """One catalog item per (app, day) lists the process types that had a minute that day; a new process type
    rewrites it, an old one does not, and a rebuilt table (or an evicted day) adds to the stored list."""
    r, _, store, _, _ = make()
    written: list[MetricItem] = []
    put_many = store.put_many

    async def logged(items: Any) -> None:
        written.extend(items)
        await put_many(items)

    store.put_many = logged  # type: ignore[method-assign]
    await fold(r, [(0, record(minute(T0, np.arange(1.0, 11.0), mc=50)))])
    assert [i.process_type for i in written].count(catalog.CATALOG_PROCESS_TYPE) == 1
    await fold(r, [(0, record(minute(T0 + 60, np.arange(1.0, 11.0), mc=50)))])  # web again: no catalog write
    assert [i.process_type for i in written].count(catalog.CATALOG_PROCESS_TYPE) == 1
    await fold(r, [(0, record(minute(T0 + 120, np.arange(1.0, 11.0), mc=50, proc="worker")))])
    assert await catalog.process_types(store, "shop", T0, T0 + 60) == {"web", "worker"}
    # Another worker with an empty table (a lost changelog) sees a third process type the same day.
    fresh, _, _, _, _ = make(store.clock)
    fresh.store = store
    await fold(fresh, [(0, record(minute(T0 + 180, np.arange(1.0, 11.0), mc=50, proc="clock")))])
    assert await catalog.process_types(store, "shop", T0, T0 + 60) == {"web", "worker", "clock"}
    # The next day has its own item; a range over both days reads both.
    next_day = catalog.day_of(T0) + catalog.DAY_S
    await fold(fresh, [(0, record(minute(next_day, np.arange(1.0, 11.0), mc=50, proc="release")))])
    assert await catalog.process_types(store, "shop", next_day, next_day + 60) == {"release"}
    assert await catalog.process_types(store, "shop", T0, next_day + 60) == {"web", "worker", "clock", "release"}
    assert await catalog.process_types(store, "other", T0, next_day + 60) == set()
