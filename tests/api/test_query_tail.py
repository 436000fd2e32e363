"""The live tail (app/api/query/tail.py): starting from the partial rollup item, and when the stored items of
the edge are read again (the interval, a minute that closed in this worker)."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson

from app.api.query import MetricsQuery, merge_buckets
from app.clock import ManualClock
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes


async def test_tail_starts_from_the_partial_rollup_item_and_merges_only_newer_minutes() -> None:
    now_s = T0 + 3600 + 20 * 60 + 10  # 20 minutes into the second hour: that 1 h bucket is not final
    clock = ManualClock(now_s * 1000)
    store = MemoryStore(clock)
    minutes = [minute(T0 + 3600 + 60 * i, np.arange(1.0, 21.0), mc=50) for i in range(19)]
    put_minutes(store, minutes)
    partial = merge_buckets(minutes[:15], 3600)[T0 + 3600]  # the rollup job has merged 15 of them so far
    rec = partial.to_record()
    rec["mins"] = [m.key.start_ms // 1000 for m in minutes[:15]]
    store.items[("shop", "web", 3600, T0 + 3600)] = orjson.dumps(rec)
    live = minute(T0 + 3600 + 19 * 60, np.arange(1.0, 6.0), mc=50)
    q = MetricsQuery(store, lambda a, p, s, u: [live] if s <= live.key.start_ms < u else [],
                     settings=SETTINGS, clock=clock)
    doc = orjson.loads((await q.answer("shop", "web", 3600, T0 + 3600, T0 + 7200)).body)
    assert [p["requests"] for p in doc["points"]] == [19 * 20 + 5]
    assert store.queries[-1] == ("shop", "web", 60, T0 + 3600 + 15 * 60, T0 + 7200)  # only the 4 newer minutes


async def test_live_refresh_reads_dynamodb_every_interval_or_when_a_minute_closed_here() -> None:
    settings = SETTINGS.replace(query_tail_read_interval_s=5.0)
    now_s = T0 + 3600 + 10
    clock = ManualClock(now_s * 1000)
    store = MemoryStore(clock)
    put_minutes(store, [minute(now_s - 10 - 60 * i, np.arange(1.0, 11.0), mc=50) for i in range(1, 4)])
    open_minute = minute(now_s - 10, np.arange(1.0, 6.0), mc=50)
    live = [open_minute]
    q = MetricsQuery(store, lambda a, p, s, u: [m for m in live if s <= m.key.start_ms < u], settings=settings,
                     clock=clock)
    rng = ("shop", "web", 60, now_s - 240, now_s + 60)

    async def refresh(ms: int) -> int:
        clock.advance(ms)
        await q.answer(*rng)  # stale: refreshed in the background
        await asyncio.sleep(0.01)
        return (await q.answer(*rng)).points

    assert (await q.answer(*rng)).points == 4 and len(store.queries) == 1
    # Another worker's sink stores a minute: within the interval only the open minute is re-rendered ...
    put_minutes(store, [minute(now_s - 10 - 240, np.arange(1.0, 3.0), mc=50)])
    assert await refresh(1500) == 4 and len(store.queries) == 1
    # ... and the interval after the last read, DynamoDB is read again.
    assert await refresh(4000) == 5 and len(store.queries) == 2
    # The open minute closes here: read at once, and on every refresh until the sink has stored it.
    live.clear()
    assert await refresh(1100) == 4 and len(store.queries) == 3
    put_minutes(store, [open_minute])
    assert await refresh(1100) == 5 and len(store.queries) == 4
    assert await refresh(1100) == 5 and len(store.queries) == 4  # found: back to the interval
