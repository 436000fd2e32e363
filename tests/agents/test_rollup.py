"""The rollup job (agents/rollup.py) over a mapping-backed table and the in-memory store contract."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import orjson

from agents.rollup import Rollup, table_key
from app.api.query import MetricsQuery
from app.clock import ManualClock
from app.ops.stats import Counters
from tables.aggregate import Aggregate
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
    r = Rollup(table, store, SETTINGS, counters, context_topic="metrics-1m", clock=clock, sleep=sleeps)
    return r, table, store, counters, sleeps


def record(a: Aggregate) -> bytes:
    return orjson.dumps(a.to_record())


def stored(store: MemoryStore, res: int, ts: int) -> Aggregate:
    return Aggregate.from_record(orjson.loads(store.items[("shop", "web", res, ts)]))


async def test_two_hours_of_minutes_roll_up_exactly_and_percentiles_match_raw() -> None:
    rng = np.random.default_rng(11)
    r, table, store, counters, _ = make()
    raw = [rng.lognormal(3.0 + (2.0 if i % 17 == 0 else 0.0), 0.7, rng.integers(100, 600)) for i in range(120)]
    values = [(0, record(minute(T0 + 60 * i, v))) for i, v in enumerate(raw)]
    for i in range(0, 120, 25):  # several batches, as the agent sees them
        await r.process(values[i:i + 25])
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
    assert orjson.loads(store.items[("shop", "web", 7200, T0)])["mins"] == [T0 + 60 * i for i in range(120)]
    assert len(table) == 15


async def test_redelivered_minutes_are_not_merged_twice() -> None:
    r, _, store, counters, _ = make()
    batch = [(0, record(minute(T0 + 60 * i, np.arange(1.0, 101.0), mc=100))) for i in range(10)]
    await r.process(batch)
    before = dict(store.items)
    puts = store.puts
    assert await r.process(batch[3:7]) == 0  # redelivery after a restart: nothing changes, nothing written
    assert store.items == before and store.puts == puts
    assert counters.values["rollup_minutes_replayed"] == 3 * 4
    assert stored(store, 600, T0).requests == 1000


async def test_evicted_bucket_is_read_back_for_a_late_minute_and_replays_stay_idempotent() -> None:
    clock = ManualClock((T0 + 3600) * 1000)
    r, table, store, counters, _ = make(clock)
    await r.process([(1, record(minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50))) for i in range(9)])
    clock.set((T0 + 7200 + int(SETTINGS.rollup_evict_after_s) + 1) * 1000)
    assert r.evict({0}) == 0  # partition 1 is not ours: its owner evicts it
    assert r.evict({1}) == 3 and not table
    await r.process([(1, record(minute(T0 + 60 * 9, np.arange(1.0, 11.0), mc=50)))])  # late minute
    assert counters.values["rollup_store_reads"] == 3 + 3  # first sight, then read-back after eviction
    assert stored(store, 600, T0).requests == 100 and stored(store, 7200, T0).requests == 100
    r.evict({1})
    await r.process([(1, record(minute(T0, np.arange(1.0, 11.0), mc=50)))])  # an old redelivery
    assert stored(store, 600, T0).requests == 100
    assert counters.values["rollup_minutes_replayed"] == 3


async def test_dynamodb_unavailable_is_retried_and_state_is_written_only_after_success() -> None:
    r, table, store, counters, sleeps = make()
    store.fail_puts = 2
    written: list[int] = []
    original = table.__setitem__

    class Watch(dict[bytes, Any]):
        def __setitem__(self, k: bytes, v: Any) -> None:
            written.append(store.puts)  # puts accepted by the store when the table is written
            original(k, v)

    r.table = Watch()
    await r.process([(0, record(minute(T0, np.arange(1.0, 11.0), mc=50)))])
    assert counters.values["rollup_retries"] == 2 and len(sleeps.calls) == 2
    assert written == [1, 1, 1]  # 3 buckets, all after the successful put
    assert stored(store, 3600, T0).requests == 10


async def test_invalid_records_are_counted_and_skipped() -> None:
    r, _, store, counters, _ = make()
    assert await r.process([(0, b"{oops"), (0, b'{"res_s": 600}'),
                            (0, record(minute(T0, np.arange(1.0, 11.0), mc=50)))]) == 3
    assert counters.values["rollup_minutes_invalid"] == 2 and len(store.items) == 3


async def test_query_reads_rollups_written_by_the_job_same_as_merging_minutes() -> None:
    """The API's precomputed path and its read-time merge give the same points."""
    rng = np.random.default_rng(2)
    clock = ManualClock((T0 + 86400) * 1000)
    r, _, store, _, _ = make(clock)
    minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.8, 200), mc=300) for i in range(240)]
    await r.process([(0, record(m)) for m in minutes])
    for m in minutes:
        store.items[("shop", "web", 60, m.key.start_ms // 1000)] = record(m)
    pre = MetricsQuery(store, settings=SETTINGS, clock=clock)
    merged = MetricsQuery(store, settings=replace(SETTINGS, query_use_rollups=False), clock=clock)
    for res in (600, 3600, 7200):
        a = orjson.loads((await pre.answer("shop", "web", res, T0, T0 + 4 * 3600)).body)
        b = orjson.loads((await merged.answer("shop", "web", res, T0, T0 + 4 * 3600)).body)
        assert a == b and len(a["points"]) == 4 * 3600 // res
    assert table_key(("shop", "web", 600, T0)) == b"r|shop|web|600|" + str(T0).encode()
