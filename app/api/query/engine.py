"""Answering metric queries at 1 min / 10 min / 1 h / 2 h resolution, with in-process caches.

:class:`MetricsQuery` composes ProgressWatch, FinalSeries and LiveTail. Coarser points merge the minutes
(percentiles from merged t-digests, never averaged), and only a range that is final is cached as final.
Reference: docs/api.md#caching, docs/design/final.md
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from app.api.query.cache import AnswerKey, ByteLRU
from app.api.query.final import FinalSeries, Series
from app.api.query.progress import PartitionOf, ProgressWatch
from app.api.query.tail import LiveSource, LiveTail
from app.clock import Clock, SystemClock
from app.ops.kafka import partition_of as kafka_partition_of
from app.ops.stats import CounterName, Counters
from app.settings import WINDOW_S, Settings
from app.storage import catalog
from app.storage.protocol import MetricsStore
from tables.aggregate import RESOLUTIONS, bucket_of

log = logging.getLogger(__name__)

RESOLUTION_NAMES = {"1m": 60, "10m": 600, "1h": 3600, "2h": 7200}
STALE_GRACE_S = 10.0
"""A live-edge answer older than its tail TTL is still served for this long while one background refresh
runs; older than that, the request computes it."""


def auto_resolution(span_s: int) -> int:
    """The platform's choice by range: 1 min up to 2 h, 10 min below 72 h, 1 h from 72 h, 2 h from 7 days
    (and up to the 30-day retention: 360 points)."""
    if span_s <= 2 * 3600:
        return 60
    if span_s < 72 * 3600:
        return 600
    if span_s < 7 * 86400:
        return 3600
    return 7200


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    etag: str
    final: bool
    """Every bucket of the range is final: the body will not change (cache it long)."""
    resolution_s: int
    points: int
    final_until_s: int = 0
    """Buckets ending at or before this were final when the answer was computed (a served answer may be an
    older render: a migration's shadow comparison trusts no more of it than this)."""


@dataclass(frozen=True, slots=True)
class _Prefix:
    """The part of an answer's body that a live refresh can reuse: ``body[:length]`` is the head and the
    final points, ``hasher`` has hashed exactly that."""

    body: bytes
    length: int
    count: int
    """Final points in the prefix."""
    series: Series | None
    version: int
    final_hi: int
    first_ts: int | None
    """Oldest point kept; once it is past the retention the prefix must be rebuilt."""
    hasher: Any

    def reusable(self, series: Series | None, final_hi: int, oldest_s: int) -> bool:
        """``series``: the series now in the cache (None when absent, due for a re-read, or not needed)."""
        return (series is self.series and (series is None or series.version == self.version)
                and final_hi == self.final_hi and (self.first_ts is None or self.first_ts > oldest_s))


class QueryEngine(Protocol):
    """What the HTTP API asks of a query engine: :class:`MetricsQuery` on one store, or the migration's
    composition of several (app/migration/reads.py)."""

    async def answer(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int) -> Answer:
        ...

    async def events(self, app: str, process_type: str, since_s: int, until_s: int) -> bytes:
        ...

    async def process_types(self, app: str, since_s: int, until_s: int) -> list[str]:
        ...


class MetricsQuery:
    """``partition_of``: app -> the metrics-1m partition whose watermark covers it; by default Kafka's
    partitioner over ``settings.kafka.partitions``, as the producers use."""

    def __init__(self, store: MetricsStore, live: LiveSource | None = None, *, settings: Settings | None = None,
                 counters: Counters | None = None, clock: Clock | None = None,
                 partition_of: PartitionOf | None = None) -> None:
        self.store = store
        self.live = live
        self.settings = settings or Settings()
        self.counters = counters
        self.clock = clock or SystemClock()
        parts = self.settings.kafka.partitions
        self.progress = ProgressWatch(store, partition_of or (lambda app: kafka_partition_of(app, parts)),
                                      self._forget, query=self.settings.query, partitions=parts, counters=counters)
        eighth = self.settings.query.cache_max_bytes // 8
        self.final = FinalSeries(store, self.progress.epoch, query=self.settings.query, counters=counters,
                                 max_bytes=4 * eighth)
        self._answers: ByteLRU[AnswerKey, tuple[Answer, int, _Prefix | None]] = ByteLRU(3 * eighth)
        """rendered answer, fresh until (ms), reusable prefix; kept STALE_GRACE_S longer for
        stale-while-revalidate"""
        self.tail = LiveTail(store, live, self.progress.epoch, query=self.settings.query, counters=counters,
                             clock=self.clock, max_bytes=eighth)
        self._catalog: ByteLRU[tuple[str, int, int], list[str]] = ByteLRU(eighth // 8)
        self._inflight: dict[AnswerKey, asyncio.Future[Answer]] = {}
        self._refreshes: set[asyncio.Future[Answer]] = set()

    @property
    def cache_bytes(self) -> int:
        return self.final.cache.bytes + self._answers.bytes + self.tail.cache.bytes

    def _count(self, name: CounterName, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

    def _forget(self, app_matches: Callable[[str], bool]) -> int:
        """Every cache's entries of the matching apps dropped (each key starts with the app)."""
        return sum(cache.pop_where(lambda k: app_matches(k[0]))
                   for cache in (self.final.cache, self._answers, self.tail.cache, self._catalog))

    def stored_through_s(self, app: str) -> int:
        """The stored-through watermark of ``app``'s partition in seconds; -1 before one is known."""
        return self.progress.stored_through_s(app)

    async def answer(self, app: str, process_type: str, resolution_s: int, since_s: int,
                     until_s: int) -> Answer:
        """Points for buckets overlapping ``[since_s, until_s)`` at ``resolution_s``, oldest first."""
        if resolution_s not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}")
        res = resolution_s
        since = bucket_of(since_s, res)
        until = -(-until_s // res) * res
        key: AnswerKey = (app, process_type, res, since, until)
        now_ms = self.clock.now_ms()
        await self.progress.poll(now_ms)
        hit = self._answers.get(key, now_ms)
        if hit is not None:
            ans, fresh_until_ms, prefix = hit
            self._count("query_cache_hits")
            if fresh_until_ms <= now_ms and key not in self._inflight:
                # Stale live edge: answer now, recompute once in the background (stale-while-revalidate),
                # so no request waits for the tail's DynamoDB read and digest merging.
                task = asyncio.ensure_future(self._fill(key, now_ms, prefix))
                self._refreshes.add(task)
                task.add_done_callback(self._refresh_done)
            return ans
        pending = self._inflight.get(key)
        if pending is not None:  # an identical request is being computed: share it
            self._count("query_cache_hits")
            return await asyncio.shield(pending)
        return await self._fill(key, now_ms)

    def _refresh_done(self, task: asyncio.Future[Answer]) -> None:
        self._refreshes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background refresh of a cached answer failed (the next request retries): %s",
                        task.exception())

    async def _fill(self, key: AnswerKey, now_ms: int, prev: _Prefix | None = None) -> Answer:
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self._count("query_cache_misses")
            epoch = self.progress.epoch(key[0])
            ans, prefix = await self._compute(*key, now_ms, prev)
            s = self.settings
            fresh_ms = int((s.query.cache_max_age_s if ans.final else s.query.tail_ttl_s) * 1000)
            if fresh_ms > 0 and epoch == self.progress.epoch(key[0]):
                keep_ms = fresh_ms if ans.final else fresh_ms + int(STALE_GRACE_S * 1000)
                self._answers.put(key, (ans, now_ms + fresh_ms, None if ans.final else prefix),
                                  len(ans.body) + 300, now_ms + keep_ms)
            fut.set_result(ans)
            return ans
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._inflight[key]
            if self.counters is not None:
                self.counters.set("query_cache_bytes", self.cache_bytes)

    async def events(self, app: str, process_type: str, since_s: int, until_s: int) -> bytes:
        """Alert and autoscaling events with ``since_s <= ts < until_s`` as the /events document, oldest first
        (agents/events.py stores them per minute). Not cached: one small Query per dashboard refresh."""
        from app.storage.events import EVENTS_RESOLUTION_S, events_of

        items = await self.store.query(app, process_type, EVENTS_RESOLUTION_S, bucket_of(since_s, WINDOW_S),
                                       until_s)
        self._count("query_items_read", len(items))
        events = [e for e in events_of(items) if since_s <= e["ts"] < until_s]
        return orjson.dumps({"app": app, "process_type": process_type, "since": since_s, "until": until_s,
                             "events": events})

    async def process_types(self, app: str, since_s: int, until_s: int) -> list[str]:
        """The process types ``app`` had in the days overlapping ``[since_s, until_s)``, sorted
        (app/storage/catalog.py); kept for the tail TTL, as a new process type appears at the live edge."""
        key = (app, catalog.day_of(since_s), catalog.day_of(until_s - 1))
        now_ms = self.clock.now_ms()
        hit = self._catalog.get(key, now_ms)
        if hit is not None:
            return hit
        found = sorted(await catalog.process_types(self.store, app, since_s, until_s))
        ttl_ms = int(max(self.settings.query.tail_ttl_s, 1.0) * 1000)
        self._catalog.put(key, found, 100 + sum(len(p) + 50 for p in found), now_ms + ttl_ms)
        return found

    async def _compute(self, app: str, proc: str, res: int, since: int, until: int, now_ms: int,
                       prev: _Prefix | None = None) -> tuple[Answer, _Prefix]:
        now_s = now_ms // 1000
        # Final: settled, and stored (the app's partition's stored-through watermark has passed its end).
        edge = bucket_of(min(now_s - int(self.settings.query.settle_s), max(self.stored_through_s(app), 0)), res)
        # Items expire ts + ttl after their bucket start (app/storage/dynamodb.py); cached ones must too.
        oldest = now_s - self.settings.storage.ttl_s
        final_hi = min(until, edge)
        # The live edge is read while the final part is: the two store reads overlap.
        tail_task = (asyncio.ensure_future(self.tail.points(app, proc, res, max(since, edge), until))
                     if max(since, edge) < until else None)
        try:
            prefix = await self._final_prefix(app, proc, res, since, until, now_ms, final_hi, oldest, prev)
            tail_points = await tail_task if tail_task is not None else []
        finally:
            if tail_task is not None and not tail_task.done():
                tail_task.cancel()
                await asyncio.gather(tail_task, return_exceptions=True)
        tail = [b for ts, b in tail_points if ts > oldest]
        rest = b"".join((b"," if prefix.count and tail else b"", b",".join(tail), b"]}"))
        body = prefix.body[:prefix.length] + rest if len(prefix.body) != prefix.length else prefix.body + rest
        hasher = prefix.hasher.copy()
        hasher.update(rest)
        etag = '"' + hasher.hexdigest() + '"'
        # The new body starts with the same prefix: keep a reference to it, not to the old body.
        prefix = _Prefix(body, prefix.length, prefix.count, prefix.series, prefix.version, prefix.final_hi,
                         prefix.first_ts, prefix.hasher)
        return Answer(body, etag, until <= edge, res, prefix.count + len(tail), max(since, edge)), prefix

    async def _final_prefix(self, app: str, proc: str, res: int, since: int, until: int, now_ms: int,
                            final_hi: int, oldest: int, prev: _Prefix | None) -> _Prefix:
        """The head and final points of an answer's body, reused from ``prev`` when nothing changed."""
        series = self.final.cached((app, proc, res), now_ms) if since < final_hi else None
        if prev is not None and prev.reusable(series, final_hi, oldest):
            prefix = prev
            self._count("query_prefix_reused")
        else:
            points: list[tuple[int, bytes]] = []
            used: Series | None = None
            version = 0
            if since < final_hi:
                points, used = await self.final.points(app, proc, res, since, final_hi, now_ms)
                version = used.version  # no await since the points were taken: they match this version
            kept = [(ts, b) for ts, b in points if ts > oldest]
            head = orjson.dumps({"app": app, "process_type": proc, "resolution_s": res, "since": since,
                                 "until": until})
            body = b"".join((head[:-1], b',"points":[', b",".join(b for _, b in kept)))
            # Reused only while this very series object (same version) is the cached one: a range too large to
            # cache, or re-read after the max age, renders the prefix again.
            prefix = _Prefix(body, len(body), len(kept), used, version, final_hi,
                             kept[0][0] if kept else None, hashlib.blake2b(body, digest_size=12))
        return prefix
