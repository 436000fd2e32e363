"""Stored-through watermarks (agents/progress.py): made by the aggregator's closing rounds, moved by
committed offsets of metrics-1m, published to the store; and closed_through in tables/windows.py."""

from __future__ import annotations

from collections.abc import Sequence

from agents.aggregate import Aggregator
from agents.progress import Publisher, Watermarks
from app.clock import ManualClock
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import Progress
from tables.aggregate import Aggregate
from tables.state import WindowTableState
from tables.windows import IngestResult, PartitionWindows, Rejected
from tests.api.test_query import MemoryStore
from tests.tables.test_windows import T0, msg, router

SETTINGS = Settings.of(grace_s=10, idle_timeout_s=30, digest_max_centroids=100)


def test_the_watermark_moves_only_when_the_checkpoints_offset_is_committed() -> None:
    wm = Watermarks(clock=ManualClock(T0))
    wm.checkpoint(0, T0 + 60_000, end_offset=5)
    wm.checkpoint(0, T0 + 120_000, end_offset=9)
    wm.committed(0, 4)
    assert 0 not in wm.through_ms
    wm.committed(0, 5)
    assert wm.through_ms[0] == T0 + 60_000
    wm.checkpoint(0, T0 + 150_000, end_offset=9)  # nothing sent since: replaces the pending checkpoint
    wm.committed(0, 9)
    assert wm.through_ms[0] == T0 + 150_000
    assert [p.stored_through_ms for p in wm.take({0, 1})] == [T0 + 150_000]
    assert wm.take({0}) == []  # unchanged since
    assert [p.partition for p in wm.take({0}, force=True)] == [0]


def test_a_backlog_of_old_data_moves_the_watermark_back() -> None:
    """A replay opens windows behind the watermark: those minutes are not stored, so neither is anything
    after them."""
    wm = Watermarks(clock=ManualClock(T0))
    wm.checkpoint(0, T0, end_offset=3)
    wm.committed(0, 3)
    wm.checkpoint(0, T0 - 3_600_000, end_offset=3)
    wm.committed(0, 3)
    assert wm.through_ms[0] == T0 - 3_600_000 and wm.take({0})[0].stored_through_ms == T0 - 3_600_000


def test_a_minute_stored_behind_the_watermark_is_noted_for_its_app() -> None:
    clock = ManualClock(T0)
    wm = Watermarks(clock=clock, changed_keep_ms=600_000)
    wm.checkpoint(3, T0, end_offset=1)
    wm.committed(3, 1)
    assert not wm.late(3, "shop", T0 + 60_000)  # ends after the watermark: an ordinary minute
    clock.set(T0 + 5_000)
    assert wm.late(3, "shop", T0)
    assert wm.take({3})[0].changed == {"shop": T0 + 5_000}
    clock.set(T0 + 700_000)
    assert wm.take({3}, force=True)[0].changed == {}  # older than the query caches' max age: dropped


def test_a_new_owner_starts_from_the_published_value_until_its_own_checkpoints() -> None:
    wm = Watermarks(clock=ManualClock(T0))
    wm.adopt(2, Progress(2, T0, T0, {"shop": T0 - 1}))
    assert wm.through_ms[2] == T0 and wm.changed[2] == {"shop": T0 - 1}
    wm.checkpoint(2, T0 + 60_000, end_offset=3)
    wm.committed(2, 3)
    wm.adopt(2, Progress(2, T0, T0, {}))  # adopted once: its own reading wins
    assert wm.through_ms[2] == T0 + 60_000


def test_closed_through_is_the_oldest_open_window_or_the_lateness_bound() -> None:
    clock = ManualClock(T0 + 200_000)
    pw = PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=3_600_000,
                          max_message_bytes=1 << 20)
    pw.ingest(0, msg(router(T0 + 120_000), router(T0 + 5_000, app="blog")), IngestResult())
    assert pw.closed_through_ms(caught_up=True) == T0  # blog's minute at T0 is still open
    assert pw.closed_through_ms(caught_up=False) == T0
    pw.mark_closed([a for a in pw.windows.values() if a.key.app == "blog"])
    assert pw.closed_through_ms(caught_up=False) == T0 + 120_000 - 40_000  # partition watermark bound
    assert pw.closed_through_ms(caught_up=True) == T0 + 120_000  # shop's open minute


async def test_each_closing_round_checkpoints_its_partitions() -> None:
    clock = ManualClock(T0)
    wm = Watermarks(clock=clock)
    emitted: list[Aggregate] = []

    async def emit(aggs: Sequence[Aggregate]) -> None:
        emitted.extend(aggs)

    async def dead_letter(partition: int, dead: Sequence[Rejected]) -> None:
        pass

    ends = {0: 7}
    agg = Aggregator(SETTINGS.windows, WindowTableState({}, "observations"), emit=emit, dead_letter=dead_letter,
                     counters=Counters(), clock=clock, watermarks=wm, end_offset=ends.get)
    await agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 80_000)))])
    assert [a.key.start_ms for a in emitted] == [T0]
    wm.committed(0, 7)
    assert 0 not in wm.through_ms  # a batch's own closing does not know whether the partition is caught up
    await agg.close_idle({0}, {0: 5})  # messages waiting: not caught up
    wm.committed(0, 7)
    # Bounded by the partition watermark less grace and idle timeout.
    assert wm.through_ms[0] == T0 + 80_000 - 40_000
    clock.set(T0 + 60_000 + 120_000 + 40_000)
    ends[0] = 8
    await agg.close_idle({0}, {0: 2})  # caught up and idle: the open minute closes
    wm.committed(0, 8)
    assert wm.through_ms[0] == clock.now_ms() - 10_000


async def test_the_publisher_adopts_moves_and_writes_and_survives_a_store_outage() -> None:
    clock = ManualClock(T0)
    store = MemoryStore(clock)
    store.progress_items = {1: Progress(1, T0 - 60_000, T0 - 1_000, {})}
    wm = Watermarks(clock=clock)
    committed = {1: 4}
    counters = Counters()
    pub = Publisher(wm, store, counters, committed=committed.get, clock=clock)
    wm.checkpoint(1, T0, end_offset=4)
    assert await pub.publish({1}) == 1
    assert store.progress_items[1].stored_through_ms == T0
    clock.set(T0 + 90_000)
    assert counters.values["stored_through_lag_seconds"] == 0
    store.fail_progress = 1
    wm.checkpoint(1, T0 + 60_000, end_offset=6)
    committed[1] = 6
    assert await pub.publish({1}) == 0  # the store is down: nothing lost, written next round
    assert await pub.publish({1}) == 1 and store.progress_items[1].stored_through_ms == T0 + 60_000
    assert counters.values["stored_through_lag_seconds"] == 30


async def test_a_gated_watermark_moves_only_as_far_as_the_flush_stored() -> None:
    """The rollup job stores what committed minutes made final before the watermark may say so; a flush that
    fails (the store is down) publishes nothing, and the next round catches up."""
    from app.errors import StoreUnavailable

    clock = ManualClock(T0)
    store = MemoryStore(clock)
    wm = Watermarks(clock=clock, gated=True)
    committed = {0: 3}
    asked: list[dict[int, int]] = []
    failing = [1]

    async def flush(through: dict[int, int]) -> dict[int, int]:
        asked.append(dict(through))
        if failing[0]:
            failing[0] -= 1
            raise StoreUnavailable("DynamoDB throttling", retry_after_s=0.01)
        return {p: ms - ms % 600_000 for p, ms in through.items()}  # stored to the last 10 min boundary

    pub = Publisher(wm, store, Counters(), committed=committed.get, clock=clock, flush=flush)
    wm.checkpoint(0, T0 + 1_260_000, end_offset=3)
    wm.committed(0, 3)
    assert 0 not in wm.through_ms  # gated: committing alone does not move it
    assert await pub.publish({0}) == 0 and store.progress_items is None
    assert await pub.publish({0}) == 1
    assert asked == [{0: T0 + 1_260_000}] * 2
    assert store.progress_items is not None
    assert store.progress_items[0].stored_through_ms == T0 + 1_260_000 - (T0 + 1_260_000) % 600_000
