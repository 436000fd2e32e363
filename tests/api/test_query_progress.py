"""Watermarks and invalidation (app/api/query/progress.py), with an injected partition lookup: the first
request waits for the watermarks and later ones refresh them in the background; a late minute or a watermark
moving back drops the apps concerned and bumps their partition's epoch; a failed read keeps the last ones."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from app.api.query import MetricsQuery
from app.api.query.progress import ProgressWatch
from app.clock import ManualClock
from app.ops.stats import Counters
from app.storage.protocol import Progress
from tests.api.test_query import SETTINGS, T0, MemoryStore

PARTITION = {"shop": 1, "blog": 2, "wiki": 2}


class Forgotten:
    """A ``forget`` that records which of the known apps each invalidation dropped."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, app_matches: Callable[[str], bool]) -> int:
        hit = [a for a in sorted(PARTITION) if app_matches(a)]
        self.calls.append(hit)
        return len(hit)


def published(store: MemoryStore, through_s: int, changed: dict[int, dict[str, int]] | None = None) -> None:
    store.progress_items = {p: Progress(p, through_s * 1000, through_s * 1000, (changed or {}).get(p, {}))
                            for p in (1, 2)}


async def test_the_first_request_waits_for_the_watermarks_and_later_ones_refresh_in_the_background() -> None:
    clock = ManualClock(T0 * 1000)
    store = MemoryStore(clock)
    published(store, T0 - 60)
    watch = ProgressWatch(store, PARTITION.__getitem__, Forgotten(), query=SETTINGS.query,
                          partitions=SETTINGS.kafka.partitions)
    assert watch.stored_through_s("shop") == -1
    await watch.poll(clock.now_ms())
    assert watch.stored_through_s("shop") == T0 - 60
    published(store, T0)
    await watch.poll(clock.now_ms())  # within the interval: not read
    assert watch.stored_through_s("shop") == T0 - 60
    clock.advance(int(SETTINGS.query.progress_interval_s * 1000))
    await watch.poll(clock.now_ms())  # read in the background: this request goes on with the last ones
    assert watch.stored_through_s("shop") == T0 - 60
    await asyncio.sleep(0.01)
    assert watch.stored_through_s("shop") == T0


async def test_a_late_minute_drops_its_app_once_and_bumps_only_its_partitions_epoch() -> None:
    clock = ManualClock(T0 * 1000)
    store = MemoryStore(clock)
    published(store, T0)
    forgotten, counters = Forgotten(), Counters()
    watch = ProgressWatch(store, PARTITION.__getitem__, forgotten, query=SETTINGS.query,
                          partitions=SETTINGS.kafka.partitions, counters=counters)
    await watch.read(clock.now_ms())
    before = {app: watch.epoch(app) for app in PARTITION}
    published(store, T0, {1: {"shop": T0 * 1000}})
    await watch.read(clock.now_ms())
    assert forgotten.calls == [["shop"]] and counters.values["query_cache_invalidations"] == 1
    assert {app: watch.epoch(app) - before[app] for app in PARTITION} == {"shop": 1, "blog": 0, "wiki": 0}
    await watch.read(clock.now_ms())  # the same notice again: already applied
    assert forgotten.calls == [["shop"]]


async def test_a_watermark_moving_back_drops_every_app_of_its_partition() -> None:
    clock = ManualClock(T0 * 1000)
    store = MemoryStore(clock)
    published(store, T0)
    forgotten = Forgotten()
    watch = ProgressWatch(store, PARTITION.__getitem__, forgotten, query=SETTINGS.query,
                          partitions=SETTINGS.kafka.partitions)
    await watch.read(clock.now_ms())
    assert store.progress_items is not None
    store.progress_items[2] = Progress(2, (T0 - 3600) * 1000, T0 * 1000, {})  # a backlog of old data
    await watch.read(clock.now_ms())
    assert forgotten.calls == [["blog", "wiki"]]
    assert (watch.epoch("shop"), watch.epoch("blog"), watch.epoch("wiki")) == (0, 1, 1)
    assert watch.stored_through_s("blog") == T0 - 3600 and watch.stored_through_s("shop") == T0


async def test_a_failed_read_keeps_the_last_watermarks_until_the_next_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(T0 * 1000)
    store = MemoryStore(clock)
    published(store, T0 - 60)
    watch = ProgressWatch(store, PARTITION.__getitem__, Forgotten(), query=SETTINGS.query,
                          partitions=SETTINGS.kafka.partitions)
    await watch.poll(clock.now_ms())
    published(store, T0)
    store.fail_progress = 1
    clock.advance(int(SETTINGS.query.progress_interval_s * 1000))
    with caplog.at_level(logging.WARNING, logger="app.api.query.progress"):
        await watch.read(clock.now_ms())
    assert watch.stored_through_s("shop") == T0 - 60 and "keeping the last ones" in caplog.text
    await watch.poll(clock.now_ms())  # the failure counts as this interval's read
    await asyncio.sleep(0.01)
    assert watch.stored_through_s("shop") == T0 - 60


async def test_the_engine_finds_watermarks_with_the_injected_partition_lookup() -> None:
    clock = ManualClock(T0 * 1000)
    store = MemoryStore(clock)
    store.progress_items = {1: Progress(1, (T0 - 600) * 1000, T0 * 1000, {})}
    q = MetricsQuery(store, settings=SETTINGS, clock=clock, partition_of=PARTITION.__getitem__)
    ans = await q.answer("shop", "web", 60, T0 - 3600, T0)
    assert q.stored_through_s("shop") == T0 - 600 and q.stored_through_s("blog") == -1
    assert not ans.final and ans.final_until_s == T0 - 600  # final only up to partition 1's watermark
