"""Final buckets (app/api/query/final.py): percentile-correct merging from digests, the per-series range
cache extended by the missing part only, its re-read after the max age, and no caching across an
invalidation."""

from __future__ import annotations

import numpy as np
import orjson

from app.api.query import MetricsQuery
from app.api.query.final import FinalSeries
from app.clock import ManualClock
from app.ops.stats import Counters
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes


async def test_hourly_percentiles_merge_digests_and_match_the_raw_observations() -> None:
    """p95 over an hour == p95 of the hour's raw values (within digest error), not a mean of minute p95s."""
    rng = np.random.default_rng(3)
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    raw: list[np.ndarray] = []
    for i in range(60):
        # Minutes differ a lot (a slow period): averaging per-minute p95s would be far off.
        vals = rng.lognormal(3.0 + (1.5 if 20 <= i < 25 else 0.0), 0.6, size=rng.integers(200, 800))
        raw.append(vals)
    put_minutes(store, [minute(T0 + 60 * i, v) for i, v in enumerate(raw)])
    q = MetricsQuery(store, settings=SETTINGS.replace(query_use_rollups=False), clock=clock)
    doc = orjson.loads((await q.answer("shop", "web", 3600, T0, T0 + 3600)).body)
    assert doc["resolution_s"] == 3600 and len(doc["points"]) == 1
    p = doc["points"][0]
    everything = np.concatenate(raw)
    assert p["ts"] == T0 and p["requests"] == len(everything)
    assert p["response_ms"]["max"] == everything.max()
    assert abs(p["response_ms"]["mean"] - everything.mean()) <= 1e-9 * everything.mean()
    for name, qq in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = float(np.quantile(everything, qq))
        assert abs(p["response_ms"][name] - exact) <= 0.01 * exact, (name, p["response_ms"][name], exact)
    mean_of_p95 = float(np.mean([np.quantile(v, 0.95) for v in raw]))
    assert abs(mean_of_p95 - float(np.quantile(everything, 0.95))) > 0.05 * mean_of_p95  # the trap is real
    assert p["failed"] == sum(len(range(0, len(v), 50)) for v in raw)
    assert p["memory_mb"]["quota"] == 512.0 and p["memory_mb"]["rss_max"] == 106.0
    assert p["load"]["max"] == max(0.1 * ((T0 + 60 * i) % 11) for i in range(60))


async def test_final_ranges_are_cached_and_extended_by_the_missing_part_only() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 51.0), mc=50) for i in range(240)])
    counters = Counters()
    q = MetricsQuery(store, settings=SETTINGS, clock=clock, counters=counters)
    a1 = await q.answer("shop", "web", 60, T0, T0 + 7200)
    assert a1.final and a1.points == 120 and len(store.queries) == 1
    a2 = await q.answer("shop", "web", 60, T0, T0 + 7200)
    assert a2 is a1 and len(store.queries) == 1 and counters.values["query_cache_hits"] == 1
    await q.answer("shop", "web", 60, T0 + 3600, T0 + 3 * 3600)  # overlaps: only [T0+2h, T0+3h) is read
    assert store.queries[-1] == ("shop", "web", 60, T0 + 7200, T0 + 3 * 3600) and len(store.queries) == 2
    a4 = await q.answer("shop", "web", 60, T0 + 60, T0 + 3 * 3600)  # inside the cached range: no read
    assert len(store.queries) == 2 and a4.points == 179
    clock.advance(int(SETTINGS.query.cache_max_age_s * 1000) + 1000)  # re-checked after the max age
    await q.answer("shop", "web", 60, T0 + 60, T0 + 3 * 3600)
    assert len(store.queries) == 3


async def test_a_series_due_for_a_re_read_is_not_served_from_the_cache() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50) for i in range(10)])
    final = FinalSeries(store, lambda app: 0, query=SETTINGS.query, max_bytes=1 << 20)
    points, series = await final.points("shop", "web", 60, T0, T0 + 600, clock.now_ms())
    assert len(points) == 10 and final.cached(("shop", "web", 60), clock.now_ms()) is series
    clock.advance(int(SETTINGS.query.cache_max_age_s * 1000) + 1)
    assert final.cached(("shop", "web", 60), clock.now_ms()) is None
    await final.points("shop", "web", 60, T0, T0 + 600, clock.now_ms())  # the whole range is read again
    assert store.queries[-1] == ("shop", "web", 60, T0, T0 + 600) and len(store.queries) == 2


async def test_a_range_read_while_its_partition_was_invalidated_is_not_cached() -> None:
    clock = ManualClock((T0 + 86400) * 1000)
    store = MemoryStore(clock)
    put_minutes(store, [minute(T0 + 60 * i, np.arange(1.0, 11.0), mc=50) for i in range(10)])
    epochs = iter(range(100))  # every look moves it: the read always overlaps an invalidation
    final = FinalSeries(store, lambda app: next(epochs), query=SETTINGS.query, max_bytes=1 << 20)
    points, _ = await final.points("shop", "web", 60, T0, T0 + 600, clock.now_ms())
    assert len(points) == 10 and final.cached(("shop", "web", 60), clock.now_ms()) is None
