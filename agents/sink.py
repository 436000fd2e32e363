"""Stream job: ``metrics-1m`` -> the store (DynamoDB or Cassandra).

A batch's offsets are acknowledged only after every minute was stored or dead-lettered: retriable errors back
off (consuming nothing meanwhile), an item refused for good goes alone to ``metrics-1m-dlq``, and an error no
item is at fault for stops the sink, not ready, until the operator fixes it. Minutes are stored in the
record format set (tables/record.py); a dead letter carries the ``metrics-1m`` record itself, replayable.
Reference: docs/design/storage.md#dynamodb-table
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from app.errors import ItemsRefused, PipelineError, RetriableError, StoreError, StoreFatal
from app.ops.stats import CounterName, Counters
from app.ops.topics import RECORD_OVERHEAD_BYTES
from app.retry import RetryPolicy, Sleep, retry_retriable
from app.settings import WINDOW_S, Settings, StorageSettings
from app.storage.protocol import MetricItem, MetricsStore
from tables import record as records
from tables.aggregate import Aggregate

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

DeadLetter = Callable[[Sequence[tuple[bytes, str]]], Awaitable[None]]
T = TypeVar("T")

ISOLATE_STREAK = 8
"""Items in a row refused one by one after which the cause is taken to be the store, not the items."""
MAX_REASON_CHARS = 2048
"""A dead-letter reason is cut to this: exception texts can quote whole requests."""
PREFIX_BYTES = 1024
"""What a truncated dead-letter record keeps of the original record."""
OFFLOAD_ITEMS = 32
"""Converting more minutes than this (~0.1 ms each) runs in a worker thread, so the event loop keeps serving."""


def decode_minute(value: bytes, record_format: int = records.VERSION) -> MetricItem:
    """A ``metrics-1m`` record -> the item stored for it, in ``record_format`` (tables/record.py: version 1 is
    the record itself). Raises ValueError when it is not one."""
    rec = orjson.loads(value)
    if not isinstance(rec, dict):
        raise ValueError("metrics-1m record must be a JSON object")
    try:
        app, proc, start_ms, res_s = rec["app"], rec["proc"], rec["start_ms"], rec["res_s"]
    except KeyError as exc:
        raise ValueError(f"metrics-1m record lacks {exc}") from None
    if not (isinstance(app, str) and isinstance(proc, str) and isinstance(start_ms, int)
            and res_s == WINDOW_S):
        raise ValueError("metrics-1m record has wrong-typed app/proc/start_ms/res_s")
    payload = value
    if record_format != 1:
        try:
            agg = Aggregate.from_record(rec)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise ValueError(f"malformed metrics-1m record: {exc!r}") from None
        payload = records.encode(agg, version=record_format)
    return MetricItem(app=app, process_type=proc, resolution_s=res_s, ts_s=start_ms // 1000, payload=payload)


def _identity(value: bytes) -> dict[str, Any]:
    """app / proc / start_ms of a record, as far as it can be read: what a truncated dead letter keeps."""
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(rec, dict):
        return {}
    return {k: rec[k] for k in ("app", "proc", "start_ms") if isinstance(rec.get(k), (str, int))}


def dead_letter_record(value: bytes, reason: str, *, topic: str, max_bytes: int) -> tuple[bytes | None, bytes]:
    """(key, value) of the ``metrics-1m-dlq`` record for a refused minute: the reason, the minute's identity
    (app, proc, start_ms), the source topic and the record itself. When that would exceed ``max_bytes`` (the
    broker would refuse it and the minute would vanish without trace) the record is replaced by its size,
    SHA-256 and first bytes, flagged ``truncated``: still identifiable, not replayable. Keyed by app, so an
    app's dead letters keep their order."""
    ident = _identity(value)
    head: dict[str, Any] = {"reason": reason[:MAX_REASON_CHARS], "topic": topic, **ident}
    full = orjson.dumps({**head, "record": value.decode("utf-8", "replace")})
    key = ident["app"].encode() if isinstance(ident.get("app"), str) else None
    if len(full) <= max_bytes:
        return key, full
    return key, orjson.dumps({**head, "truncated": True, "record_bytes": len(value),
                              "record_sha256": hashlib.sha256(value).hexdigest(),
                              "record_prefix": value[:PREFIX_BYTES].decode("utf-8", "replace")})


def _describe(item: MetricItem) -> str:
    return f"{item.app}/{item.process_type} res {item.resolution_s} at {item.ts_s}"


class StoreWriter:
    """``put_many`` with the failure policy of the module docstring, shared by the sink and the events job:
    retriable errors back off, fatal ones halt (``check`` fails) and retry slowly, refused items are
    isolated one by one and returned."""

    def __init__(self, store: MetricsStore, storage: StorageSettings, counters: Counters, *, job: str,
                 retries_counter: CounterName, sleep: Sleep = asyncio.sleep,
                 jitter: Callable[[], float] = random.random, fatal_retry_s: float | None = None) -> None:
        self.store = store
        self.storage = storage
        self.counters = counters
        self.job = job
        self.retries_counter = retries_counter
        self.sleep = sleep
        self.policy = RetryPolicy.from_ms(storage.backoff_base_ms, storage.backoff_max_ms, jitter=jitter)
        self.fatal_retry_s = storage.fatal_retry_s if fatal_retry_s is None else fatal_retry_s
        self.halted: StoreFatal | None = None
        """The error the job stopped on; None while it writes."""

    async def check(self) -> None:
        """Readiness: fails while the job is stopped on an error only the operator can fix."""
        if self.halted is not None:
            raise PipelineError(f"{self.job} stopped consuming (nothing committed, retrying every "
                                f"{self.fatal_retry_s:g} s): {self.halted}")

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()`` until it succeeds or an item is refused (StoreError, raised); retriable and fatal
        errors are waited out."""
        while True:
            try:
                result = await retry_retriable(fn, policy=self.policy, sleep=self.sleep, on_retry=self._retrying)
            except StoreFatal as exc:
                await self.halt(exc)
                continue
            if self.halted is not None:
                log.warning("%s: the store accepts writes again; consuming resumes (was: %s)", self.job, self.halted)
                self.halted = None
            return result

    def _retrying(self, exc: RetriableError, retry: int, delay_s: float) -> None:
        self.counters.inc(self.retries_counter)
        log.warning("%s: store unavailable (%s); retry %d in %.2f s", self.job, exc, retry, delay_s)

    async def halt(self, exc: StoreFatal) -> None:
        """Stop (the caller holds the batch, so nothing is committed past it) until the next attempt."""
        self.counters.inc(self.retries_counter)
        if self.halted is None:
            log.error("%s: STOPPED consuming: %s -- nothing is dead-lettered or committed; retrying every %g s "
                      "until this is fixed", self.job, exc, self.fatal_retry_s)
        else:
            log.warning("%s: still stopped: %s; retry in %g s", self.job, exc, self.fatal_retry_s)
        self.halted = exc
        await self.sleep(self.fatal_retry_s)

    async def put(self, items: Sequence[MetricItem]) -> list[tuple[MetricItem, StoreError]]:
        """Store ``items``; returns those refused for good with the reason, every other one is stored."""
        if not items:
            return []
        try:
            await self.call(lambda: self.store.put_many(items))
            return []
        except ItemsRefused as exc:  # the others were written
            return list(exc.refused)
        except StoreError as exc:
            if len(items) == 1:
                return [(items[0], exc)]
            log.warning("%s: the store refused a batch of %d (%s); writing it item by item to find the bad ones",
                        self.job, len(items), exc)
        return await self._isolate(items)

    async def _isolate(self, items: Sequence[MetricItem]) -> list[tuple[MetricItem, StoreError]]:
        refused: list[tuple[MetricItem, StoreError]] = []
        streak: list[tuple[MetricItem, StoreError]] = []
        i = 0
        while i < len(items):
            got = await self.put([items[i]])
            i += 1
            if not got:
                refused += streak  # a neighbour was stored: those were bad items indeed
                streak = []
                continue
            streak += got
            if len(streak) >= ISOLATE_STREAK:
                last = streak[-1][1]
                await self.halt(StoreFatal(f"{len(streak)} items in a row refused one by one, the last: {last}",
                                           action=last.action or "the cause is the store or its schema, not "
                                                                 "the items: fix it"))
                i -= len(streak)  # not the items' fault: try them again
                streak = []
        return refused + streak


class Sink:
    def __init__(self, store: MetricsStore, storage: StorageSettings, *, dead_letter: DeadLetter, counters: Counters,
                 sleep: Sleep = asyncio.sleep, fatal_retry_s: float | None = None) -> None:
        self.store = store
        self.storage = storage
        self.dead_letter = dead_letter
        self.counters = counters
        self.writer = StoreWriter(store, storage, counters, job="sink", retries_counter="sink_retries",
                                  sleep=sleep, fatal_retry_s=fatal_retry_s)

    async def check(self) -> None:
        await self.writer.check()

    def _decode(self, values: Sequence[bytes]) -> tuple[list[MetricItem], dict[MetricItem, bytes],
                                                          list[tuple[bytes, str]]]:
        """The items to store, the ``metrics-1m`` record of each (what a dead letter carries,
        whatever the stored format), and the records that are no minutes."""
        items: list[MetricItem] = []
        source: dict[MetricItem, bytes] = {}
        bad: list[tuple[bytes, str]] = []
        fmt = self.storage.record_format
        for v in values:
            try:
                item = decode_minute(v, fmt)
            except ValueError as exc:  # orjson.JSONDecodeError is one
                bad.append((v, f"not a metrics-1m record: {exc}"))
                continue
            items.append(item)
            source[item] = v
        return items, source, bad

    async def write(self, values: Sequence[bytes]) -> int:
        """Store a batch of minutes; returns (the number stored) when every one is stored or dead-lettered."""
        if len(values) > OFFLOAD_ITEMS:
            items, source, bad = await asyncio.to_thread(self._decode, values)
        else:
            items, source, bad = self._decode(values)
        started = time.monotonic()
        refused = await self.writer.put(items)
        for item, why in refused:
            log.error("sink: the store refused %s for good (dead-lettered): %s", _describe(item), why)
            bad.append((source[item], str(why)))
        written = len(items) - len(refused)
        if written:
            self.counters.inc("sink_items_written", written)
            self.counters.observe("sink_batch_seconds", time.monotonic() - started)
        if bad:
            self.counters.inc("sink_dead_lettered", len(bad))
            await self.dead_letter(bad)
        return written


def bind(wiring: Wiring, settings: Settings, store: MetricsStore, counters: Counters,
         ready: asyncio.Event) -> Sink:
    from app.ops.health import register_check

    faust_app, metrics_topic, sink_dlq_topic = wiring.app, wiring.metrics_topic, wiring.sink_dlq_topic

    max_bytes = settings.kafka.max_batch_bytes - RECORD_OVERHEAD_BYTES  # below the brokers' message.max.bytes

    async def dead_letter(bad: Sequence[tuple[bytes, str]]) -> None:
        for value, reason in bad:
            key, record = dead_letter_record(value, reason, topic=settings.kafka.metrics_topic, max_bytes=max_bytes)
            await sink_dlq_topic.send(key=key, value=record)

    sink = Sink(store, settings.storage, dead_letter=dead_letter, counters=counters)
    register_check("sink", sink.check)

    @faust_app.agent(metrics_topic, name="sink")
    async def sink_agent(stream: Any) -> None:
        async for values in stream.take(settings.storage.sink_batch_max, within=settings.storage.sink_within_s):
            # Set once the store's client is started, and while a migration writes this store (app/writer.py).
            await ready.wait()
            await sink.write(values)

    return sink
