"""Stream job: ``observations`` -> one-minute windows -> ``metrics-1m`` (+ ``observations-dlq``).

Each message is folded on arrival and acknowledged only after its batch's state was flushed; a closed minute
is always sent within ``minute_max_bytes`` (degraded if it must be, so the broker never refuses it). Window
rules: tables/windows.py; state layout: tables/state.py.
Reference: docs/design/windows.md
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from agents.progress import Watermarks
from app.clock import Clock, SystemClock
from app.errors import ConfigError
from app.limits import Limits
from app.ops.stats import CounterName, Counters
from app.ops.topics import RECORD_OVERHEAD_BYTES
from app.settings import KafkaSettings, LimitSettings, Settings, WindowSettings
from tables.aggregate import Aggregate, fit_record
from tables.state import WindowTableState
from tables.windows import ADDON_SOURCES, METRIC_NAMES, PROCESS_TYPES, IngestResult, PartitionWindows, Rejected

if TYPE_CHECKING:
    from app.app import Wiring

LIMIT_COUNTERS: dict[int, CounterName] = {PROCESS_TYPES: "limit_refused_process_types",
                                          ADDON_SOURCES: "limit_refused_addon_sources",
                                          METRIC_NAMES: "limit_refused_metric_names"}

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[Aggregate]], Awaitable[None]]
"""Sends closed minutes and returns once the broker acknowledged all of them."""
DeadLetter = Callable[[int, Sequence[Rejected]], Awaitable[None]]


REFETCH_WAIT_MS = 10_000
"""How long records asked for again may take to arrive before a gap is taken as empty."""
MIN_MINUTE_BYTES = 16 * 1024
"""The smallest budget a minute the broker refused as too large is fitted to again (halving each time)."""


class Aggregator:
    """Owns the open windows of the partitions this worker is assigned."""

    def __init__(self, windows: WindowSettings, state: WindowTableState, *, emit: Emit, dead_letter: DeadLetter,
                 counters: Counters, clock: Clock | None = None,
                 owns: Callable[[int], bool] | None = None, watermarks: Watermarks | None = None,
                 end_offset: Callable[[int], int | None] | None = None,
                 refetch: Callable[[int, int], Awaitable[None]] | None = None,
                 limits: Limits | None = None,
                 topic_max_message_bytes: int = KafkaSettings().topic_max_message_bytes) -> None:
        """``watermarks`` / ``end_offset``: where each closing round records how far the partition is closed,
        and the end offset of ``metrics-1m`` that round's minutes are below (agents/progress.py).
        ``refetch(partition, offset)``: make the consumer read the partition again from ``offset`` (see
        :meth:`_contiguous`); None: offsets are taken as they come. ``limits``: per-app limits (started and
        stopped by the caller); None: the settings' defaults for every app. ``topic_max_message_bytes``: of
        metrics-1m (``settings.kafka``), which every minute must fit."""
        if windows.minute_max_bytes + RECORD_OVERHEAD_BYTES > topic_max_message_bytes:
            raise ConfigError(f"minute_max_bytes ({windows.minute_max_bytes}) must stay {RECORD_OVERHEAD_BYTES} "
                              f"bytes below topic_max_message_bytes ({topic_max_message_bytes}), or "
                              "the broker refuses the largest minutes",
                              action="lower METRICS_MINUTE_MAX_BYTES, or raise METRICS_TOPIC_MAX_MESSAGE_BYTES "
                                     "with the metrics topic's max.message.bytes")
        self.limits = limits or Limits(LimitSettings())
        self.fit_dead: dict[tuple[str, str, int], tuple[Aggregate, list[Rejected]]] = {}
        """What :meth:`encode` left out of the minutes being emitted, to dead-letter once they are sent."""
        self.refetch = refetch
        self.refetching: dict[int, tuple[int, int]] = {}
        """Per partition, the offset asked for again and the wall time it was asked (ms)."""
        self.watermarks = watermarks
        self.end_offset = end_offset
        self.windows = windows
        self.state = state
        self.emit = emit
        self.dead_letter = dead_letter
        self.counters = counters
        self.clock = clock or SystemClock()
        # Whether this worker owns an input partition right now. Events of a partition revoked while they
        # sat in the batch buffer must not be applied, persisted or closed here: the new owner does that.
        self.owns = owns or (lambda p: True)
        self.partitions: dict[int, PartitionWindows] = {}
        # Folded in since the last flush, per partition: counts and dead letters still to send.
        self.pending: dict[int, IngestResult] = {}
        self.pending_bytes = 0
        self.dropped: dict[int, int] = {}
        """Per partition, how often unflushed messages were forgotten: such messages must never be acked."""
        # One add, flush or close at a time: they mutate the same windows, and a close awaits the broker.
        self.lock = asyncio.Lock()
        # Closed windows still kept in the table, per partition, with the wall time they were closed: a
        # worker restarted before the sinks stored (and committed) a minute restores it and sends it
        # again, identical and with the same key. Deleted settings.closed_keep_ms later.
        self.closed: dict[int, list[tuple[int, Aggregate]]] = {}

    def _new(self, p: int) -> PartitionWindows:
        w = self.windows
        return PartitionWindows(p, clock=self.clock, grace_ms=w.grace_ms, idle_timeout_ms=w.idle_timeout_ms,
                                max_future_ms=w.max_future_ms, max_message_bytes=w.max_message_bytes,
                                max_centroids=w.digest_max_centroids, limits_of=self.limits.of)

    def _ensure_loaded(self, partitions: Iterable[int]) -> None:
        """Rebuild partitions we do not hold in memory from the table (after start or rebalance)."""
        missing = {p for p in partitions if p not in self.partitions}
        if not missing:
            return
        for p, (wins, apps, offset, streams) in self.state.load_all(missing).items():
            pw = self._new(p)
            pw.restore(wins, apps, offset)
            pw.restore_streams(streams)
            self.partitions[p] = pw
            if wins or apps:
                log.info("partition %d restored: %d open windows, %d apps, offset %d",
                         p, len(wins), len(apps), offset)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Forget in-memory state of partitions another worker now owns (the table keeps it).

        Messages folded in but not flushed go with it: they were never acknowledged, so whoever owns
        the partition next reads them again.
        """
        for p in list(partitions):
            self.partitions.pop(p, None)
            self.closed.pop(p, None)  # the next owner restores these and sends them once more
            if self.pending.pop(p, None) is not None:
                self.dropped[p] = self.dropped.get(p, 0) + 1

    async def add(self, partition: int, offset: int, value: bytes | None) -> bool:
        """Fold one message into its partition's open windows, as it arrives.

        Persisting, dead-lettering and closing wait for :meth:`flush`; the caller acknowledges the
        message (lets its offset be committed) only after that. Folding on arrival, instead of
        buffering a batch and folding it afterwards, keeps this process busy while the consumer
        fetches (Faust's ``take`` leaves it idle for up to ``within`` per batch). Returns False when
        the message was dropped because another worker owns its partition now.
        """
        async with self.lock:
            result = self.pending.get(partition)
            if result is None:
                if not self.owns(partition):
                    log.info("dropping a message of partition %d: revoked", partition)
                    self.revoke([partition])
                    return False
                self._ensure_loaded([partition])
                result = self.pending[partition] = IngestResult()
            if not await self._contiguous(partition, offset):
                return False
            self.partitions[partition].ingest(offset, value, result)
            self.pending_bytes += len(value or b"")
            return True

    async def _contiguous(self, partition: int, offset: int) -> bool:
        """Whether ``offset`` may be folded in: it follows the last one folded (or is a replay). A message
        past a gap means the consumer skipped records -- Faust can, when a seek at start or after a rebalance
        races its fetcher, and then counts the gap as acknowledged, so they would never be read. The
        partition is read again from the gap; what arrives past it meanwhile is dropped, unacknowledged.
        A gap still there after REFETCH_WAIT_MS holds no records (retention deleted them, or transaction
        markers): then the message is taken, and the gap logged."""
        expected = self.partitions[partition].offset + 1
        if self.refetch is None or expected == 0 or offset <= expected:
            self.refetching.pop(partition, None)
            return True
        now_ms = self.clock.now_ms()
        asked = self.refetching.get(partition)
        if asked is None or asked[0] != expected:
            self.refetching[partition] = (expected, now_ms)
            self.counters.inc("input_gaps_refetched")
            log.warning("partition %d: offset %d arrived after %d; reading from %d again (the consumer skipped "
                        "records)", partition, offset, expected - 1, expected)
        elif now_ms - asked[1] >= REFETCH_WAIT_MS:
            log.error("partition %d: offsets %d..%d could not be read again within %d s; going on from %d. "
                      "Retention deleted them (raise the topic's retention.ms: the workers fell behind it), or "
                      "a transactional producer's markers fill the gap", partition, expected, offset - 1,
                      REFETCH_WAIT_MS // 1000, offset)
            self.counters.inc("input_gaps_accepted")
            self.refetching.pop(partition, None)
            return True
        # Again for every message fetched before the seek took effect: Faust's fetch loop moves its read
        # offset past them, and would drop the records read again below it.
        await self.refetch(partition, expected)
        return False

    async def flush(self) -> IngestResult:
        """Persist what was folded in since the last flush, dead-letter its rejects, emit what is due."""
        async with self.lock:
            return await self._flush()

    async def process_batch(self, messages: Sequence[tuple[int, int, bytes | None]]) -> IngestResult:
        """:meth:`add` each ``(partition, offset, value)``, then :meth:`flush`."""
        for p, offset, value in messages:
            await self.add(p, offset, value)
        return await self.flush()

    async def _flush(self) -> IngestResult:
        pending, self.pending, self.pending_bytes = self.pending, {}, 0
        total = IngestResult()
        try:
            for p, result in pending.items():
                self.counters.inc("table_records_written", self.state.persist(self.partitions[p]))
                total.add(result)
            self._count(total)
            for p, result in pending.items():
                if result.dead:
                    await self.dead_letter(p, result.dead)
            # Only event time closes windows here: whether a partition is idle (caught up, and quiet long
            # enough) is close_idle's question, which knows the broker's highwaters.
            await self._close([self.partitions[p] for p in pending if p in self.partitions],
                              {p: False for p in pending})
        except BaseException:
            # Memory may now be ahead of the table: rebuild these partitions from the table when the
            # messages are redelivered, so nothing is skipped or counted twice.
            self.revoke(pending)
            raise
        return total

    async def close_idle(self, assigned: Iterable[int], highwaters: Mapping[int, int | None] | None = None) -> int:
        """Wall-clock pass over the partitions this worker owns (idle ones included).

        ``highwaters``: the next offset the broker holds per partition; a partition whose highwater is
        past our applied offset has messages waiting and is not idle. None: unknown (the broker unreachable,
        or not fetched lately), so not idle, and its quiet time starts again.
        """
        owned = set(assigned)
        async with self.lock:
            if self.pending:
                await self._flush()
            self.revoke([p for p in self.partitions if p not in owned])
            self._ensure_loaded(owned)
            held = list(self.partitions)
            if highwaters is not None:
                for p in held:
                    if highwaters.get(p) is None:
                        self.partitions[p].end_unknown()
            caught_up = {p: highwaters is None or (highwaters.get(p) is not None
                                                   and (highwaters.get(p) or 0) <= self.partitions[p].offset + 1)
                         for p in held}
            try:
                return await self._close([self.partitions[p] for p in held], caught_up,
                                         checkpoint=highwaters is not None)
            except BaseException:
                self.revoke(held)
                raise

    async def _close(self, pws: list[PartitionWindows], caught_up: Mapping[int, bool], *,
                     checkpoint: bool = False) -> int:
        """Emit what is due. ``checkpoint``: record how far each partition is closed (only when ``caught_up``
        comes from the broker's highwaters, so the watermark does not swing between two bounds)."""
        due = [(pw, pw.due(caught_up=caught_up[pw.partition])) for pw in pws]
        due = [(pw, aggs) for pw, aggs in due if aggs]
        resent = sum(1 for pw, aggs in due for a in aggs if pw.is_closed(a))
        if due:
            # 1. emitted and acknowledged ...
            self.fit_dead = {}
            await self.emit([a for _, aggs in due for a in aggs])
            await self._dead_letter_fitted(due)
            now_ms = self.clock.now_ms()
            for pw, aggs in due:
                # 2. ... then the lateness boundary is persisted, 3. the window is forgotten later.
                pw.mark_closed(aggs)
                pw.expire_streams()
                self.counters.inc("table_records_written", self.state.persist(pw))
                self.closed.setdefault(pw.partition, []).extend((now_ms, a) for a in aggs)
        cutoff_ms = self.clock.now_ms() - self.windows.closed_keep_ms
        for pw in pws:
            kept = self.closed.get(pw.partition)
            if kept and kept[0][0] <= cutoff_ms:
                self.state.forget(pw, [a for t, a in kept if t <= cutoff_ms])
                self.closed[pw.partition] = [(t, a) for t, a in kept if t > cutoff_ms]
        if checkpoint and self.watermarks is not None and self.end_offset is not None:
            for pw in pws:
                end = self.end_offset(pw.partition)
                if end is not None:
                    self.watermarks.checkpoint(pw.partition, pw.closed_through_ms(caught_up=caught_up[pw.partition]),
                                               end)
        n = sum(len(aggs) for _, aggs in due) - resent
        self.counters.inc("minutes_emitted", n)
        self.counters.inc("minutes_resent", resent)
        self.counters.set("windows_open", sum(len(pw.windows) for pw in self.partitions.values()))
        return n

    def encode(self, agg: Aggregate, max_bytes: int | None = None) -> bytes:
        """A closed minute as sent to metrics-1m, within ``max_bytes`` (``minute_max_bytes``): degraded when
        it is larger, never refused. What it leaves out is dead-lettered after the send (:meth:`_close`)."""
        budget = max_bytes or self.windows.minute_max_bytes
        fit = fit_record(agg.to_record(), budget)
        key = agg.key
        if not fit.degraded:
            self.fit_dead.pop((key.app, key.process_type, key.start_ms), None)
            return fit.value
        self.counters.inc("minutes_degraded")
        log.warning("minute %s/%s %d of %d bytes sent as %d (budget %d): %d digests compressed, %d names left "
                    "out (dead-lettered)", key.app, key.process_type, key.start_ms, fit.size, len(fit.value),
                    budget, fit.digests_compressed, len(fit.dropped))
        dead = [Rejected("rejected", f"minute over {budget} bytes ({fit.size} serialized): {kind} {name!r} "
                         f"({size} bytes) dropped from {key.app}/{key.process_type} minute {key.start_ms}; "
                         "keep ids out of metric names, use fewer high-cardinality timers, or raise "
                         "METRICS_MINUTE_MAX_BYTES with the metrics topic's max.message.bytes",
                         {"app": key.app, "proc": key.process_type, "start_ms": key.start_ms, kind: name,
                          "bytes": size}, agg.offset, -1, key.app)
                for kind, name, size in fit.dropped]
        self.fit_dead[(key.app, key.process_type, key.start_ms)] = (agg, dead)
        return fit.value

    async def _dead_letter_fitted(self, due: list[tuple[PartitionWindows, list[Aggregate]]]) -> None:
        fit_dead, self.fit_dead = self.fit_dead, {}
        if not fit_dead:
            return
        for pw, aggs in due:
            dead = [d for a in aggs for d in fit_dead.get((a.key.app, a.key.process_type, a.key.start_ms),
                                                          (a, []))[1]]
            if dead:
                self.counters.inc("minute_names_dropped", len(dead))
                await self.dead_letter(pw.partition, dead)

    def _count(self, result: IngestResult) -> None:
        c = result.counts
        self.counters.inc("observations_accepted", c.accepted)
        self.counters.inc("observations_late", c.late)
        self.counters.inc("observations_rejected", c.rejected)
        self.counters.inc("observations_replayed", c.skipped_replay)
        for (app, limit), n in c.refused.items():
            self.counters.inc_app(LIMIT_COUNTERS[limit], app, n)

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


def is_size_error(exc: BaseException) -> bool:
    """Whether a send failed because the record is too large (the producer's check or the broker's answer,
    possibly wrapped in Faust's ProducerSendError)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (MessageSizeTooLargeError, RecordTooLargeError)) or "MESSAGE_SIZE_TOO_LARGE" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


Send = Callable[[Aggregate, bytes], Awaitable[Awaitable[Any]]]
"""Starts sending one minute; the awaitable it returns resolves once the broker acknowledged it."""


async def send_minutes(aggs: Sequence[Aggregate], send: Send, encode: Callable[[Aggregate, int], bytes],
                       budget: int, counters: Counters) -> list[Any]:
    """Send every minute; those the broker refuses as too large are fitted to half the budget and sent again,
    down to MIN_MINUTE_BYTES. Any other error is raised (the caller's crash path: a broker problem, not one
    app's data). Returns the acknowledgements (record metadata) in no particular order."""
    todo = list(aggs)
    acks: list[Any] = []
    while True:
        started: list[tuple[Aggregate, Awaitable[Any]]] = []
        refused: list[Aggregate] = []
        for a in todo:
            try:
                started.append((a, await send(a, encode(a, budget))))
            except Exception as exc:
                if not is_size_error(exc) or budget <= MIN_MINUTE_BYTES:
                    raise
                refused.append(a)
        for a, fut in started:
            try:
                acks.append(await fut)
            except Exception as exc:
                if not is_size_error(exc) or budget <= MIN_MINUTE_BYTES:
                    raise
                refused.append(a)
        if not refused:
            return acks
        counters.inc("minutes_refused_too_large", len(refused))
        budget = max(budget // 2, MIN_MINUTE_BYTES)
        log.error("the broker refused %d minutes as too large; sending them again within %d bytes. Check that "
                  "METRICS_MINUTE_MAX_BYTES is below max.message.bytes of the metrics topic and the brokers' "
                  "message.max.bytes", len(refused), budget)
        todo = refused


class Unacked:
    """Messages folded in but not acknowledged yet.

    Acknowledging lets Faust commit a message's offset, so it happens only after the aggregator
    persisted the message's effects: a crash before that re-reads it (at-least-once), and the
    offsets kept in the table make the re-read a no-op where it was already applied.
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.stream: Any = None
        self.events: list[tuple[Any, int, int]] = []  # (event, partition, aggregator.dropped count)
        self.since_s = 0.0

    def append(self, event: Any, partition: int) -> None:
        if not self.events:
            self.since_s = time.monotonic()
        self.events.append((event, partition, self.aggregator.dropped.get(partition, 0)))

    async def flush(self) -> None:
        done, self.events = self.events, []
        await self.aggregator.flush()
        dropped = self.aggregator.dropped
        for event, partition, seen in done:
            if dropped.get(partition, 0) == seen:  # else forgotten unflushed (revoked): the next owner reads it
                await self.stream.ack(event)


# --- Faust binding --------------------------------------------------------------------------------------
# Called by the composition roots (app/worker.py); kept below the logic so unit tests can build an Aggregator
# without a broker.

def bind(wiring: Wiring, settings: Settings, counters: Counters, watermarks: Watermarks | None = None) -> Aggregator:
    from mode import Service

    from app.faust_patches import highwater

    faust_app: Any = wiring.app  # Faust's table manager and signals are typed narrower than they are
    observations_topic, metrics_topic, dlq_topic = wiring.observations_topic, wiring.metrics_topic, wiring.dlq_topic
    windows_table = wiring.windows_table

    sent_end: dict[int, int] = {}
    """Per metrics-1m partition, the offset after the last minute this worker sent (acknowledged)."""

    async def send(a: Aggregate, value: bytes) -> Awaitable[Any]:
        fut: Awaitable[Any] = await metrics_topic.send(key=a.key.app.encode(), value=value)
        return fut

    async def emit(aggs: Sequence[Aggregate]) -> None:
        for md in await send_minutes(aggs, send, aggregator.encode, settings.windows.minute_max_bytes, counters):
            sent_end[md.partition] = max(sent_end.get(md.partition, 0), md.offset + 1)

    def end_offset(partition: int) -> int | None:
        """The end of metrics-1m ``partition`` as far as this worker knows: its own acknowledged sends, and
        the consumer's highwater (records of a previous owner); None before either is known."""
        hw = highwater(faust_app, settings.kafka.metrics_topic, partition)
        known = [o for o in (hw, sent_end.get(partition)) if o is not None]
        return max(known) if known else None

    async def dead_letter(partition: int, dead: Sequence[Rejected]) -> None:
        for d in dead:
            # Not awaited one by one: Faust flushes the producer before it commits the input offsets.
            await dlq_topic.send(key=(d.app or "").encode(),
                                 value=dead_letter_record(settings.kafka.observations_topic, partition, d))

    def owns(partition: int) -> bool:
        # The consumer's current assignment: the same set Faust's commit filter uses, so offsets of
        # events we drop here are never committed by this worker (the new owner processes them).
        return any(tp.partition == partition and tp.topic == settings.kafka.observations_topic
                   for tp in faust_app.consumer.assignment())

    async def refetch(partition: int, offset: int) -> None:
        from faust.types import TP

        # In the consumer's thread, and Faust's read offset (below which it drops fetched records) with it.
        await faust_app.consumer.seek_wait({TP(settings.kafka.observations_topic, partition): offset})

    limits = Limits(settings.limits)
    limits_start: list[asyncio.Future[None]] = []

    async def start_limits() -> None:
        """Once, before the first message is folded (the overrides must apply from the start)."""
        if not limits_start:
            limits_start.append(asyncio.ensure_future(limits.start()))
        await asyncio.shield(limits_start[0])

    @faust_app.service
    class LimitsService(Service):
        """Follows the limits file while the worker runs."""

        async def on_start(self) -> None:
            await start_limits()

        async def on_stop(self) -> None:
            await limits.stop()

    aggregator = Aggregator(settings.windows, WindowTableState(windows_table, settings.kafka.observations_topic),
                            emit=emit, dead_letter=dead_letter, counters=counters, owns=owns,
                            watermarks=watermarks, end_offset=end_offset, refetch=refetch, limits=limits,
                            topic_max_message_bytes=settings.kafka.topic_max_message_bytes)

    unacked = Unacked(aggregator)

    async def flush() -> None:
        try:
            await unacked.flush()
        except Exception as exc:
            # These messages were not acknowledged, and Faust will not deliver them again in this process
            # (a crashed agent is restarted on the next messages): stop the worker, so that it restarts
            # from the committed input offsets. The offsets kept in the table make that replay idempotent.
            log.critical("aggregates could not be persisted or emitted (%r): stopping the worker so it "
                         "restarts from the committed input offsets; check the brokers", exc)
            await faust_app.crash(exc)
            raise

    @faust_app.agent(observations_topic, name="aggregate")
    async def aggregate(stream: Any) -> None:
        await start_limits()
        unacked.stream = stream = stream.noack()  # acked by Unacked.flush, once the table has them
        async for event in stream.events():
            message = event.message
            if await aggregator.add(message.partition, message.offset, event.value):
                unacked.append(event, message.partition)
            if (len(unacked.events) >= settings.windows.batch_max
                    or aggregator.pending_bytes >= settings.windows.batch_max_bytes):
                await flush()

    @faust_app.timer(settings.windows.batch_within_s / 2, name="flush_aggregates")
    async def flush_aggregates() -> None:
        # A quiet stream still gets its last messages persisted and acknowledged within batch_within_s.
        if unacked.events and time.monotonic() - unacked.since_s >= settings.windows.batch_within_s:
            await flush()

    @faust_app.timer(settings.windows.close_interval_s, name="close_idle_windows")
    async def close_idle() -> None:
        if faust_app.rebalancing or not faust_app.tables.recovery.completed.is_set():
            return
        assigned = {tp for tp in faust_app.assignor.assigned_actives() if tp.topic == settings.kafka.observations_topic}
        # Unknown or stale (not fetched yet, assignment changing, broker unreachable): not idle.
        now_ms = int(time.time() * 1000)  # aiokafka's fetch times are the system clock's
        highwaters = {tp.partition: highwater(faust_app, tp.topic, tp.partition, fresh_at_ms=now_ms)
                      for tp in assigned}
        await aggregator.close_idle({tp.partition for tp in assigned}, highwaters)

    @faust_app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        aggregator.revoke(tp.partition for tp in revoked if tp.topic == settings.kafka.observations_topic)

    return aggregator
