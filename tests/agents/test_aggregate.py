"""The aggregation job's logic (agents/aggregate.py) over a mapping-backed table, with a manual clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from agents.aggregate import Aggregator, Unacked, dead_letter_record
from app.clock import ManualClock
from app.ops.stats import Counters
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey
from tables.state import WindowTableState
from tables.windows import Rejected
from tests.tables.test_windows import T0, msg, router

SETTINGS = Settings.of(grace_s=10, idle_timeout_s=30, digest_max_centroids=100)


class Harness:
    def __init__(self, table: dict[bytes, bytes], clock: ManualClock, *, fail_emit: bool = False,
                 settings: Settings = SETTINGS) -> None:
        self.emitted: list[Aggregate] = []
        self.dead: list[tuple[int, Rejected]] = []
        self.fail_emit = fail_emit
        self.counters = Counters()
        self.agg = Aggregator(settings.windows, WindowTableState(table, "observations"), emit=self.emit,
                              dead_letter=self.dead_letter, counters=self.counters, clock=clock)

    async def emit(self, aggs: Sequence[Aggregate]) -> None:
        if self.fail_emit:
            raise ConnectionError("broker down")
        self.emitted.extend(aggs)

    async def dead_letter(self, partition: int, dead: Sequence[Rejected]) -> None:
        self.dead.extend((partition, d) for d in dead)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


async def test_batches_across_partitions_emit_each_minute_once(clock: ManualClock) -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table, clock)
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1), router(T0 + 2))),
                               (1, 0, msg(router(T0 + 3, app="blog")))])
    await h.agg.process_batch([(0, 1, msg(router(T0 + 70_000))), (1, 1, msg(router(T0 + 70_000, app="blog")))])
    assert sorted((a.key.app, a.requests) for a in h.emitted) == [("blog", 1), ("shop", 2)]
    # Emitted minutes leave the table at once (closed_keep_s is 0); the progress records remain.
    assert not any(b"|w|" in k and str(T0).encode() in k for k in table)
    clock.set(T0 + 70_000 + 30_000 + 60_000)
    assert await h.agg.close_idle({0, 1}) == 2
    assert await h.agg.close_idle({0, 1}) == 0
    assert len(h.emitted) == 4
    assert h.counters.values["minutes_emitted"] == 4 and h.counters.values["windows_open"] == 0


async def test_restart_restores_open_windows_and_skips_replays(clock: ManualClock) -> None:
    table: dict[bytes, bytes] = {}
    first = Harness(table, clock)
    await first.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 2)))])
    # "Crash": a new worker with the same table sees offsets 0..1 again (uncommitted) and then offset 2.
    second = Harness(table, clock)
    res = await second.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 2))),
                                          (0, 2, msg(router(T0 + 3), router(T0 + 80_000)))])
    assert res.counts.skipped_replay == 2 and res.counts.accepted == 2
    assert [(a.key.start_ms, a.requests) for a in second.emitted] == [(T0, 3)]


async def test_emit_failure_keeps_minute_and_reloads_state(clock: ManualClock) -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table, clock, fail_emit=True)
    with pytest.raises(ConnectionError):
        await h.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 80_000)))])
    assert h.agg.partitions == {}  # in-memory state dropped: it is rebuilt from the table
    h.fail_emit = False
    # Faust redelivers the batch (offsets were not acknowledged).
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 80_000)))])
    assert [(a.key.start_ms, a.requests) for a in h.emitted] == [(T0, 1)]


async def test_bad_and_late_records_are_dead_lettered_with_source(clock: ManualClock) -> None:
    h = Harness({}, clock)
    await h.agg.process_batch([(3, 10, b"{oops"), (3, 11, msg(router(T0 + 1), {"kind": "x"}))])
    await h.agg.process_batch([(3, 12, msg(router(T0 + 80_000)))])  # closes the first minute
    await h.agg.process_batch([(3, 13, msg(router(T0 + 5)))])
    kinds = [(p, d.kind, d.offset, d.index) for p, d in h.dead]
    assert kinds == [(3, "rejected", 10, -1), (3, "rejected", 11, 1), (3, "late", 13, 0)]
    rec: dict[str, Any] = orjson.loads(dead_letter_record("observations", 3, h.dead[2][1]))
    assert rec["source"] == {"topic": "observations", "partition": 3, "offset": 13, "index": 0}
    assert rec["kind"] == "late" and rec["record"]["ts"] == T0 + 5 and rec["app"] == "shop"
    c = h.counters.values
    assert (c["observations_accepted"], c["observations_rejected"], c["observations_late"]) == (2, 2, 1)


async def test_live_view_returns_open_windows(clock: ManualClock) -> None:
    h = Harness({}, clock)
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1), router(T0 + 60_001), router(T0 + 2, dyno="worker.1")))])
    live = h.agg.live("shop", "web", T0, T0 + 120_000)
    assert sorted(a.key.start_ms for a in live) == [T0, T0 + 60_000]
    assert h.agg.live("shop", "web", T0 + 60_000, T0 + 120_000)[0].requests == 1


async def test_events_of_a_revoked_partition_are_not_applied_or_closed(clock: ManualClock) -> None:
    table: dict[bytes, bytes] = {}
    owned = {0, 1}
    h = Harness(table, clock)
    h.agg.owns = lambda p: p in owned
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1))), (1, 0, msg(router(T0 + 2, app="blog")))])
    owned.discard(1)  # rebalance: partition 1 moves to another worker while events sit in our buffer
    res = await h.agg.process_batch([(1, 1, msg(router(T0 + 80_000, app="blog"))), (0, 1, msg(router(T0 + 3)))])
    assert res.counts.accepted == 1 and 1 not in h.agg.partitions
    clock.set(T0 + 10 * 60_000)
    await h.agg.close_idle(owned, {0: 2})
    assert [(a.key.app, a.requests) for a in h.emitted] == [("shop", 2)]  # blog's minute is the new owner's


async def test_a_partition_with_messages_waiting_is_not_idle(clock: ManualClock) -> None:
    h = Harness({}, clock)
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1)))])
    clock.set(T0 + 10 * 60_000)  # long quiet, minute long over on the wall clock ...
    assert await h.agg.close_idle({0}, {0: 5}) == 0  # ... but offsets 1..4 are still to be read
    assert await h.agg.close_idle({0}, {0: None}) == 0  # highwater unknown: not idle either, ...
    assert await h.agg.close_idle({0}, {0: 1}) == 0  # ... and quiet only from when it is known again
    clock.advance(h.agg.windows.idle_timeout_ms)
    assert await h.agg.close_idle({0}, {0: 1}) == 1  # caught up and quiet: the idle partition's minute closes


async def test_a_malformed_last_message_still_lets_the_partition_go_idle(clock: ManualClock) -> None:
    h = Harness({}, clock)
    await h.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, b"{not json")])
    clock.set(T0 + 10 * 60_000)
    assert await h.agg.close_idle({0}, {0: 2}) == 1  # offset 1 was handled (dead-lettered): caught up
    res = await h.agg.process_batch([(0, 1, b"{not json")])  # redelivered: not dead-lettered twice
    assert res.counts.skipped_replay == 1 and res.counts.rejected == 0


class FakeEvent:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset


class RecordingStream:
    """Stands in for Faust's stream: records which events were acknowledged."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    async def ack(self, event: FakeEvent) -> bool:
        self.acked.append((event.partition, event.offset))
        return True


async def _deliver(h: Harness, unacked: Unacked, partition: int, offset: int, value: bytes) -> None:
    if await h.agg.add(partition, offset, value):
        unacked.append(FakeEvent(partition, offset), partition)


async def test_messages_are_acknowledged_only_after_their_flush(clock: ManualClock) -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table, clock)
    unacked = Unacked(h.agg)
    unacked.stream = stream = RecordingStream()
    await _deliver(h, unacked, 0, 0, msg(router(T0 + 1)))
    await _deliver(h, unacked, 0, 1, b"{oops")
    assert stream.acked == [] and not table and not h.dead  # folded in memory only
    assert h.agg.partitions[0].windows[("shop", "web", T0)].requests == 1
    await unacked.flush()
    assert stream.acked == [(0, 0), (0, 1)] and table and [d.offset for _, d in h.dead] == [1]
    assert h.counters.values["observations_accepted"] == 1


async def test_unflushed_messages_of_a_revoked_partition_are_never_acknowledged(clock: ManualClock) -> None:
    h = Harness({}, clock)
    unacked = Unacked(h.agg)
    unacked.stream = stream = RecordingStream()
    await _deliver(h, unacked, 0, 0, msg(router(T0 + 1)))
    await _deliver(h, unacked, 1, 0, msg(router(T0 + 2, app="blog")))
    h.agg.revoke([1])  # rebalance before the flush: partition 1's folded message is forgotten ...
    await _deliver(h, unacked, 1, 1, msg(router(T0 + 3, app="blog")))  # ... and it came back to us
    await unacked.flush()
    assert stream.acked == [(0, 0), (1, 1)]  # (1, 0) is read again from the committed offset


async def test_a_failed_flush_acknowledges_nothing(clock: ManualClock) -> None:
    h = Harness({}, clock, fail_emit=True)
    unacked = Unacked(h.agg)
    unacked.stream = stream = RecordingStream()
    await _deliver(h, unacked, 0, 0, msg(router(T0 + 1), router(T0 + 80_000)))
    with pytest.raises(ConnectionError):
        await unacked.flush()
    assert stream.acked == [] and h.agg.partitions == {}


async def test_idle_close_flushes_pending_messages_first(clock: ManualClock) -> None:
    h = Harness({}, clock)
    assert await h.agg.add(0, 0, msg(router(T0 + 1), {"kind": "x"}))
    clock.set(T0 + 10 * 60_000)
    assert await h.agg.close_idle({0}, {0: 1}) == 1
    assert [d.index for _, d in h.dead] == [1] and h.counters.values["observations_accepted"] == 1


async def test_a_message_of_a_partition_owned_elsewhere_is_dropped(clock: ManualClock) -> None:
    h = Harness({}, clock)
    h.agg.owns = lambda p: p == 0
    assert not await h.agg.add(1, 0, msg(router(T0 + 1)))
    assert 1 not in h.agg.partitions and not h.agg.pending


async def test_a_restart_soon_after_a_minute_closed_sends_it_again(clock: ManualClock) -> None:
    """With ``closed_keep_s`` (off by default) a worker restarted soon after a minute closed sends it once
    more, identical, and never reopens it."""
    table: dict[bytes, bytes] = {}
    keep = SETTINGS.replace(closed_keep_s=30.0)
    first = Harness(table, clock, settings=keep)
    await first.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 80_000)))])
    assert [(a.key.start_ms, a.requests) for a in first.emitted] == [(T0, 1)]
    clock.set(T0 + 10_000)  # "crash" within closed_keep_s of the close
    second = Harness(table, clock, settings=keep)
    res = await second.agg.process_batch([(0, 2, msg(router(T0 + 5)))])  # late for the closed minute
    assert res.counts.late == 1
    assert [(a.key.start_ms, a.requests) for a in second.emitted] == [(T0, 1)]
    assert second.emitted[0].to_record() == first.emitted[0].to_record()
    assert (second.counters.values["minutes_resent"], second.counters.values.get("minutes_emitted", 0)) == (1, 0)
    clock.set(T0 + 60_000)
    await second.agg.close_idle({0}, {0: 3})
    third = Harness(table, clock, settings=keep)  # long after: the minute was forgotten, nothing is sent again
    await third.agg.process_batch([(0, 3, msg(router(T0 + 81_000)))])
    assert all(a.key.start_ms != T0 for a in third.emitted)


async def test_by_default_a_closed_minute_is_forgotten_at_once(clock: ManualClock) -> None:
    """A restart right after a minute closed sends nothing again: metrics-1m holds the minute, and the
    restarted sinks read it from their committed offsets (app/faust_patches.py)."""
    table: dict[bytes, bytes] = {}
    first = Harness(table, clock)
    await first.agg.process_batch([(0, 0, msg(router(T0 + 1))), (0, 1, msg(router(T0 + 80_000)))])
    assert [(a.key.start_ms, a.requests) for a in first.emitted] == [(T0, 1)]
    second = Harness(table, clock)
    res = await second.agg.process_batch([(0, 2, msg(router(T0 + 5)))])  # late for the closed minute
    assert res.counts.late == 1 and second.emitted == []
    assert second.counters.values.get("minutes_resent", 0) == 0


def refetching(clock: ManualClock) -> tuple[Aggregator, list[tuple[int, int]], Counters]:
    """An aggregator whose consumer seeks are recorded."""
    seeks: list[tuple[int, int]] = []
    counters = Counters()

    async def refetch(partition: int, offset: int) -> None:
        seeks.append((partition, offset))

    async def emit(aggs: Sequence[Aggregate]) -> None:
        pass

    async def dead_letter(partition: int, dead: Sequence[Rejected]) -> None:
        pass

    agg = Aggregator(SETTINGS.windows, WindowTableState({}, "observations"), emit=emit, dead_letter=dead_letter,
                     counters=counters, clock=clock, refetch=refetch)
    return agg, seeks, counters


async def test_skipped_offsets_are_read_again_before_anything_past_them(clock: ManualClock) -> None:
    """The consumer delivered 0..1, then skipped to 5 (Faust can, when a seek races its fetcher: found by the
    crash loop in tests/integration/test_worker_faults.py, where a minute lost a fetch's worth of records)."""
    agg, seeks, counters = refetching(clock)
    assert await agg.add(0, 0, msg(router(T0 + 1)))
    assert await agg.add(0, 1, msg(router(T0 + 2)))
    assert not await agg.add(0, 5, msg(router(T0 + 6)))  # past a gap: not folded, not to be acknowledged
    assert not await agg.add(0, 6, msg(router(T0 + 7)))  # fetched before the seek: dropped, and seek again
    assert seeks == [(0, 2), (0, 2)] and counters.snapshot()["input_gaps_refetched"] == 1
    for offset in range(2, 7):  # read again from the gap, in order
        assert await agg.add(0, offset, msg(router(T0 + 1 + offset)))
    assert await agg.add(0, 3, msg(router(T0 + 4)))  # a replay is still just skipped
    await agg.flush()
    [window] = agg.partitions[0].windows.values()
    assert window.summary()["requests"] == 7 and len(seeks) == 2


async def test_a_gap_that_holds_no_records_is_taken_after_the_wait(clock: ManualClock) -> None:
    """Retention deleted offsets 2..4 before this worker read them: after the re-read brings nothing but the
    same offset again, the message is taken (and the gap counted as data lost)."""
    agg, seeks, counters = refetching(clock)
    assert await agg.add(0, 1, msg(router(T0 + 1)))
    assert not await agg.add(0, 5, msg(router(T0 + 6)))
    clock.advance(9_999)
    assert not await agg.add(0, 5, msg(router(T0 + 6)))  # still waiting for 2..4
    clock.advance(1)
    assert await agg.add(0, 5, msg(router(T0 + 6)))
    assert seeks == [(0, 2), (0, 2)] and counters.snapshot()["input_gaps_accepted"] == 1
    assert await agg.add(0, 6, msg(router(T0 + 7)))  # and on from there


# --- a minute always fits (security review C2) and per-app limits (H1) -----------------------------------

def _timers(app: str, ts: int, names: int, values: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(1)
    return [{"kind": "metric", "app": app, "dyno": "web.1", "ts": ts, "name": f"t.{n}", "type": "timer",
             "value": rng.uniform(0, 1000)} for n in range(names) for _ in range(values)]


async def test_an_oversize_minute_is_emitted_degraded_and_its_dropped_names_dead_lettered(clock: ManualClock
                                                                                          ) -> None:
    settings = SETTINGS.replace(minute_max_bytes=8_000, digest_max_centroids=1000)
    sent: list[bytes] = []

    async def emit(aggs: Sequence[Aggregate]) -> None:
        sent.extend(h.agg.encode(a) for a in aggs)

    h = Harness({}, clock, settings=settings)
    h.agg.emit = emit
    await h.agg.process_batch([(0, 0, msg(*_timers("big", T0 + 1, 8, 600))),
                               (0, 1, msg(router(T0 + 2, app="shop"))),
                               (0, 2, msg(router(T0 + 80_000, app="big"), router(T0 + 80_000, app="shop")))])
    assert len(sent) == 2 and all(len(v) <= 8_000 for v in sent)
    by_app = {orjson.loads(v)["app"]: orjson.loads(v) for v in sent}
    assert by_app["shop"]["st"] == [0, 1, 0, 0, 0]  # the other app's minute: as it was
    kept = set(by_app["big"].get("tim", {}))
    assert len(kept) < 8 and all(by_app["big"]["tim"][k]["n"] == 600 for k in kept)
    dead = [d for _, d in h.dead]
    assert {d.record["metric"] for d in dead} == {f"t.{n}" for n in range(8)} - kept
    assert all(d.app == "big" and "minute over 8000 bytes" in d.reason and "METRICS_MINUTE_MAX_BYTES" in d.reason
               for d in dead)
    assert h.counters.values["minutes_degraded"] == 1
    assert h.counters.values["minute_names_dropped"] == len(dead)


async def test_a_size_error_on_send_is_fitted_smaller_and_sent_again() -> None:
    from aiokafka.errors import MessageSizeTooLargeError
    from faust.exceptions import ProducerSendError

    from agents.aggregate import MIN_MINUTE_BYTES, send_minutes

    agg = Aggregator(SETTINGS.windows, WindowTableState({}, "observations"),
                     emit=lambda a: None,  # type: ignore[arg-type,return-value]
                     dead_letter=lambda p, d: None, counters=Counters())  # type: ignore[arg-type,return-value]
    big = Aggregate(BucketKey("big", "web", T0))
    for r in _timers("big", T0, 4, 3_000):
        big.add_metric(r["name"], "timer", r["value"], T0)
    small = Aggregate(BucketKey("shop", "web", T0))
    small.add_request(200, 5.0, None)
    sizes: list[tuple[str, int]] = []

    async def ack(n: int) -> int:
        return n

    async def broker_refuses_over_100k(a: Aggregate, value: bytes) -> Any:
        sizes.append((a.key.app, len(value)))
        if len(value) > 300_000:  # the producer's own check: raised at once, wrapped by Faust
            raise ProducerSendError("send failed") from MessageSizeTooLargeError()
        if len(value) > 100_000:  # the broker's answer: the acknowledgement fails
            async def refused() -> int:
                raise MessageSizeTooLargeError()
            return refused()
        return ack(len(value))

    counters = Counters()
    acks = await send_minutes([big, small], broker_refuses_over_100k, agg.encode, 900 * 1024, counters)
    assert len(acks) == 2
    assert [app for app, _ in sizes].count("shop") == 1  # sent once: the others' minutes are not held back
    assert sizes[-1][0] == "big" and sizes[-1][1] <= 100_000
    assert counters.values["minutes_refused_too_large"] >= 2 and agg.fit_dead  # names left out, to dead-letter
    assert MIN_MINUTE_BYTES < 100_000

    async def other_error(a: Aggregate, value: bytes) -> Any:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):  # not a size error: the caller's crash path, as before
        await send_minutes([small], other_error, agg.encode, 900 * 1024, counters)


async def test_limits_come_from_the_injected_limits_per_app(clock: ManualClock, tmp_path: Any) -> None:
    from app.limits import Limits

    path = tmp_path / "limits.yaml"
    path.write_text("overrides:\n  shop:\n    max_process_types: 3\n")
    settings = SETTINGS.replace(limit_process_types=1, limits_file=str(path))
    limits = Limits(settings.limits)
    await limits.start()
    try:
        h = Harness({}, clock, settings=settings)
        h.agg = Aggregator(settings.windows, WindowTableState({}, "observations"), emit=h.emit,
                           dead_letter=h.dead_letter, counters=h.counters, clock=clock, limits=limits)
        res = await h.agg.process_batch([(0, 0, msg(*[router(T0 + i, app=a, dyno=f"p{i}.1")
                                                      for a in ("shop", "blog") for i in range(4)]))])
        assert res.counts.refused_by_limit() == [1 + 3, 0, 0]
        assert h.counters.values["limit_refused_process_types"] == 4
        assert {(d.app, d.reason.split(":")[0]) for _, d in h.dead} == {
            ("shop", f"more than 3 process types in minute {T0} of shop"),
            ("blog", f"more than 1 process types in minute {T0} of blog")}
    finally:
        await limits.stop()


def test_minute_budget_must_stay_below_the_topic_limit() -> None:
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="METRICS_MINUTE_MAX_BYTES"):
        Aggregator(SETTINGS.replace(minute_max_bytes=1024 * 1024).windows, WindowTableState({}, "observations"),
                   emit=lambda a: None, dead_letter=lambda p, d: None,  # type: ignore[arg-type,return-value]
                   counters=Counters())
