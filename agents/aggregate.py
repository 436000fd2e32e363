"""Stream job: ``observations`` -> one-minute windows -> ``metrics-1m`` (+ ``observations-dlq``).

Input is consumed in batches (``take_events``); each batch is folded into the partitions' open windows,
the changed state is written to the table once, then windows that became due are emitted. A wall-clock
timer closes the due windows of idle partitions. Window rules and the idempotence argument:
tables/windows.py. Table layout: tables/state.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import orjson

from app.clock import Clock, SystemClock
from app.settings import Settings
from app.stats import Counters
from tables.aggregate import Aggregate
from tables.state import WindowTableState
from tables.windows import IngestResult, PartitionWindows, Rejected

log = logging.getLogger(__name__)

FORGET_AFTER_MS = 30_000
"""How long a closed window stays in the table: longer than the sinks need to store a minute and commit
its offset (Faust commits every few seconds). A worker restarted within that time sends it again."""
Emit = Callable[[Sequence[Aggregate]], Awaitable[None]]
"""Sends closed minutes and returns once the broker acknowledged all of them."""
DeadLetter = Callable[[int, Sequence[Rejected]], Awaitable[None]]


class Aggregator:
    """Owns the open windows of the partitions this worker is assigned."""

    def __init__(self, settings: Settings, state: WindowTableState, *, emit: Emit, dead_letter: DeadLetter,
                 counters: Counters, clock: Clock | None = None,
                 owns: Callable[[int], bool] | None = None) -> None:
        self.settings = settings
        self.state = state
        self.emit = emit
        self.dead_letter = dead_letter
        self.counters = counters
        self.clock = clock or SystemClock()
        # Whether this worker owns an input partition right now. Events of a partition revoked while they
        # sat in the batch buffer must not be applied, persisted or closed here: the new owner does that.
        self.owns = owns or (lambda p: True)
        self.partitions: dict[int, PartitionWindows] = {}
        # One batch or one close at a time: both mutate the same windows.
        self.lock = asyncio.Lock()
        # Closed windows still kept in the table, per partition, with the wall time they were closed: a
        # worker restarted before the sinks stored (and committed) a minute restores it and sends it
        # again, identical and with the same key. Deleted FORGET_AFTER_MS later.
        self.closed: dict[int, list[tuple[int, Aggregate]]] = {}

    def _new(self, p: int) -> PartitionWindows:
        s = self.settings
        return PartitionWindows(p, clock=self.clock, grace_ms=s.grace_ms, idle_timeout_ms=s.idle_timeout_ms,
                                max_future_ms=s.max_future_ms, max_message_bytes=s.max_message_bytes,
                                max_centroids=s.digest_max_centroids)

    def _ensure_loaded(self, partitions: Iterable[int]) -> None:
        """Rebuild partitions we do not hold in memory from the table (after start or rebalance)."""
        missing = {p for p in partitions if p not in self.partitions}
        if not missing:
            return
        for p, (wins, apps, offset) in self.state.load_all(missing).items():
            pw = self._new(p)
            pw.restore(wins, apps, offset)
            self.partitions[p] = pw
            if wins or apps:
                log.info("partition %d restored: %d open windows, %d apps, offset %d",
                         p, len(wins), len(apps), offset)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget in-memory state of partitions another worker now owns (the table keeps it)."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.closed.pop(p, None)  # the next owner restores these and sends them once more

    async def process_batch(self, messages: Sequence[tuple[int, int, bytes | None]]) -> IngestResult:
        """Fold ``(partition, offset, value)`` messages in, persist, emit what became due."""
        result = IngestResult()
        by_partition: dict[int, list[tuple[int, bytes | None]]] = {}
        for p, offset, value in messages:
            by_partition.setdefault(p, []).append((offset, value))
        async with self.lock:
            for p in [p for p in by_partition if not self.owns(p)]:
                log.info("dropping %d buffered messages of partition %d: revoked", len(by_partition.pop(p)), p)
                self.revoke([p])
            try:
                await self._process(by_partition, result)
            except BaseException:
                # Memory may now be ahead of the table: rebuild these partitions from the table when the
                # batch is redelivered, so nothing is skipped or counted twice.
                self.revoke(by_partition)
                raise
        return result

    async def _process(self, by_partition: dict[int, list[tuple[int, bytes | None]]],
                       result: IngestResult) -> None:
        self._ensure_loaded(by_partition)
        dead_by_partition: dict[int, list[Rejected]] = {}
        for p, msgs in by_partition.items():
            pw = self.partitions[p]
            first_dead = len(result.dead)
            for offset, value in msgs:
                pw.ingest(offset, value, result)
            if len(result.dead) > first_dead:
                dead_by_partition[p] = result.dead[first_dead:]
            self.counters.inc("table_records_written", self.state.persist(pw))
        self._count(result)
        for p, dead in dead_by_partition.items():
            await self.dead_letter(p, dead)
        await self._close([self.partitions[p] for p in by_partition])

    async def close_idle(self, assigned: Iterable[int], highwaters: Mapping[int, int | None] | None = None) -> int:
        """Wall-clock pass over the partitions this worker owns (idle ones included).

        ``highwaters``: the next offset the broker holds per partition; a partition whose highwater is
        past our applied offset has messages waiting and is not idle (None: unknown, not idle).
        """
        owned = set(assigned)
        async with self.lock:
            self.revoke([p for p in self.partitions if p not in owned])
            self._ensure_loaded(owned)
            held = list(self.partitions)
            caught_up = {p: highwaters is None or (highwaters.get(p) is not None
                                                   and (highwaters.get(p) or 0) <= self.partitions[p].offset + 1)
                         for p in held}
            try:
                return await self._close([self.partitions[p] for p in held], caught_up)
            except BaseException:
                self.revoke(held)
                raise

    async def _close(self, pws: list[PartitionWindows], caught_up: Mapping[int, bool] | None = None) -> int:
        # Within a batch the partition just delivered input, so only event time can close windows here.
        due = [(pw, pw.due(caught_up=True if caught_up is None else caught_up[pw.partition])) for pw in pws]
        due = [(pw, aggs) for pw, aggs in due if aggs]
        if due:
            # 1. emitted and acknowledged ...
            await self.emit([a for _, aggs in due for a in aggs])
            now_ms = self.clock.now_ms()
            for pw, aggs in due:
                # 2. ... then the lateness boundary is persisted, 3. the window is forgotten later.
                pw.mark_closed(aggs)
                self.counters.inc("table_records_written", self.state.persist(pw))
                self.closed.setdefault(pw.partition, []).extend((now_ms, a) for a in aggs)
        cutoff_ms = self.clock.now_ms() - FORGET_AFTER_MS
        for pw in pws:
            kept = self.closed.get(pw.partition)
            if kept and kept[0][0] <= cutoff_ms:
                self.state.forget(pw, [a for t, a in kept if t <= cutoff_ms])
                self.closed[pw.partition] = [(t, a) for t, a in kept if t > cutoff_ms]
        n = sum(len(aggs) for _, aggs in due)
        self.counters.inc("minutes_emitted", n)
        self.counters.set("windows_open", sum(len(pw.windows) for pw in self.partitions.values()))
        return n

    def _count(self, result: IngestResult) -> None:
        c = result.counts
        self.counters.inc("observations_accepted", c.accepted)
        self.counters.inc("observations_late", c.late)
        self.counters.inc("observations_rejected", c.rejected)
        self.counters.inc("observations_replayed", c.skipped_replay)

    def live(self, app: str, process_type: str, since_ms: int, until_ms: int) -> list[Aggregate]:
        """Open windows of one app/process type in ``[since_ms, until_ms)`` (for the query API)."""
        out = []
        for pw in self.partitions.values():
            for agg in pw.windows.values():
                key = agg.key
                if key.app == app and key.process_type == process_type and since_ms <= key.start_ms < until_ms:
                    out.append(agg)
        return out


def dead_letter_record(topic: str, partition: int, d: Rejected) -> bytes:
    return orjson.dumps({"kind": d.kind, "reason": d.reason, "app": d.app, "record": d.record,
                         "source": {"topic": topic, "partition": partition, "offset": d.offset,
                                    "index": d.index}})


def minute_record(agg: Aggregate) -> bytes:
    return orjson.dumps(agg.to_record())


# --- Faust binding --------------------------------------------------------------------------------------
# Imported by app/__main__.py; kept below the logic so unit tests can build an Aggregator without a broker.

def bind(faust_app: Any, settings: Settings, counters: Counters) -> Aggregator:
    from app.app import dlq_topic, metrics_topic, observations_topic, windows_table

    async def emit(aggs: Sequence[Aggregate]) -> None:
        futs = [await metrics_topic.send(key=a.key.app.encode(), value=minute_record(a)) for a in aggs]
        await asyncio.gather(*futs)

    async def dead_letter(partition: int, dead: Sequence[Rejected]) -> None:
        for d in dead:
            # Not awaited one by one: Faust flushes the producer before it commits the input offsets.
            await dlq_topic.send(key=(d.app or "").encode(),
                                 value=dead_letter_record(settings.observations_topic, partition, d))

    def owns(partition: int) -> bool:
        # The consumer's current assignment: the same set Faust's commit filter uses, so offsets of
        # events we drop here are never committed by this worker (the new owner processes them).
        return any(tp.partition == partition and tp.topic == settings.observations_topic
                   for tp in faust_app.consumer.assignment())

    aggregator = Aggregator(settings, WindowTableState(windows_table, settings.observations_topic),
                            emit=emit, dead_letter=dead_letter, counters=counters, owns=owns)

    @faust_app.agent(observations_topic, name="aggregate")
    async def aggregate(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await aggregator.process_batch(
                [(e.message.partition, e.message.offset, e.value) for e in events])

    @faust_app.timer(settings.close_interval_s, name="close_idle_windows")
    async def close_idle() -> None:
        if faust_app.rebalancing or not faust_app.tables.recovery.completed.is_set():
            return
        assigned = {tp for tp in faust_app.assignor.assigned_actives() if tp.topic == settings.observations_topic}
        highwaters: dict[int, int | None] = {}
        for tp in assigned:
            try:
                highwaters[tp.partition] = faust_app.consumer.highwater(tp)
            except Exception:  # not fetched yet / assignment changing: unknown, so not idle
                highwaters[tp.partition] = None
        await aggregator.close_idle({tp.partition for tp in assigned}, highwaters)

    @faust_app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        aggregator.revoke(tp.partition for tp in revoked if tp.topic == settings.observations_topic)

    return aggregator
