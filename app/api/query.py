"""Answering metric queries at 1 min / 10 min / 1 h / 2 h resolution, with in-process caches.

Where a point comes from
------------------------
A bucket is *final* once its end is ``query_settle_s`` in the past (grace + idle timeout + sink delay:
nothing can change it any more). Final points are read from the summary blocks agents/rollup.py writes
(tables/summary.py: one item per series, resolution and block span, holding the rendered points, which go
into the answer unparsed) and kept in a per-series cache, because a closed bucket is immutable. A block
span with no usable block (data written before blocks existed) falls back to the digest items: minutes as
stored by the sink, rollup items for coarser resolutions. Newer buckets (the *tail*) are built on every
read: a block point that already holds every stored minute is used as it is; otherwise the stored minutes
it lacks and the minutes still open in this worker's table are merged onto the bucket's rollup item.
Coarser points are always :meth:`Aggregate.merge` of the minutes: counts and sums add, max is max, means
are weighted, percentiles come from the merged t-digests, never from averaging percentiles.

Caches (bounded by ``query_cache_max_bytes``, least recently used evicted first)
---------------------------------------------------------------------------------
* per series ``(app, process type, resolution)``: one contiguous range of final buckets, ``ts -> point JSON``.
  A request extends the range at its ends with a DynamoDB read of just the missing part. The range is re-read
  after ``query_cache_max_age_s`` so a minute written late (worker backlog) shows up eventually.
* per answer ``(app, process type, resolution, since, until)``: the rendered body and its ETag, reused until
  the max age when the whole range is final, else for ``query_tail_ttl_s`` (the live edge moves); a stale
  live-edge answer is served while one background task recomputes it (stale-while-revalidate, at most
  ``STALE_GRACE_S``), so hot requests never wait for the tail's read and merge.
* per series and range end, the tail's stored items and rendered points: the items are re-read at most
  every ``query_tail_read_interval_s`` (sooner when the edge moved or a minute this worker held open has
  closed), and a tail bucket whose inputs are byte-for-byte the ones rendered last time is not decoded
  again (only the open minute, and a minute just written, cost a digest decode).
Identical concurrent misses share one computation. Expired points (older than the retention) are never
returned, cached or not.

Refreshing a live answer is incremental, because it runs once a second per hot range on the event loop:
the body is ``head + final points + tail points``, and the part up to the last final point (a 24 h range at
1 min is ~500 KB) only changes when the edge moves (once per bucket), the series is re-read, or a point
expires. The answer cache keeps where that prefix ends and the BLAKE2b state after hashing it, so a refresh
slices the previous body, appends the re-rendered tail and hashes only the tail bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Generic,
    Hashable,
    Iterable,
    Protocol,
    TypeVar,
)

import orjson

from app.clock import Clock, SystemClock
from app.errors import PipelineError
from app.ops.kafka import partition_of
from app.ops.stats import Counters
from app.settings import WINDOW_S, Settings
from app.storage.protocol import SUMMARY, MetricItem, MetricsStore
from tables.aggregate import RESOLUTIONS, Aggregate, BucketKey, bucket_of
from tables.summary import BLOCK_SPAN_S, SummaryBlock, block_of, point_json

log = logging.getLogger(__name__)

LiveSource = Callable[[str, str, int, int], list[Aggregate]]
"""(app, process_type, since_ms, until_ms) -> open windows held by this worker."""

RESOLUTION_NAMES = {"1m": 60, "10m": 600, "1h": 3600, "2h": 7200}
OFFLOAD_ITEMS = 32
FALLBACK_CONCURRENCY = 8
"""Digest reads in flight for the block spans of one range that have no summary block (sparse or old data)."""
"""Decoding more digests than this runs in a worker thread, so other requests keep being served."""
STALE_GRACE_S = 10.0
"""A live-edge answer older than its tail TTL is still served for this long while one background refresh
runs; older than that, the request computes it."""
_POINT_OVERHEAD_BYTES = 120
"""Approximate cost of one cached point beyond its JSON bytes (dict slot, int key, bytes header)."""


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


def decode_item(item: MetricItem) -> Aggregate:
    """A stored item's aggregate (minutes and rollups share the record; rollups add ``mins``, ignored here)."""
    return Aggregate.from_record(orjson.loads(item.payload))


def merge_buckets(minutes: Iterable[Aggregate], resolution_s: int) -> dict[int, Aggregate]:
    """Minutes merged into buckets of ``resolution_s``; the inputs are not modified (beyond flushing)."""
    out: dict[int, Aggregate] = {}
    for m in minutes:
        b = bucket_of(m.key.start_ms // 1000, resolution_s)
        agg = out.get(b)
        if agg is None:
            agg = out[b] = Aggregate(BucketKey(m.key.app, m.key.process_type, b * 1000),
                                     resolution_s=resolution_s, max_centroids=m.max_centroids)
        agg.merge(m)
    return out


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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries with a size and an expiry; least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[K, tuple[V, int, int]] = OrderedDict()

    def get(self, key: K, now_ms: int) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[2] <= now_ms:
            self.pop(key)
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V, size: int, expires_ms: int) -> None:
        self.pop(key)
        if size > self.max_bytes:
            return
        self._d[key] = (value, size, expires_ms)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s, _) = self._d.popitem(last=False)
            self.bytes -= s

    def pop(self, key: K) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= old[1]

    def pop_where(self, pred: Callable[[K], bool]) -> int:
        """Drop every entry whose key matches; returns how many."""
        doomed = [k for k in self._d if pred(k)]
        for k in doomed:
            self.pop(k)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._d)


class _Series:
    """Final buckets of one series over the contiguous range ``[lo, hi)``: absent means no data."""

    __slots__ = ("points", "lo", "hi", "filled_ms", "version")

    def __init__(self, points: dict[int, bytes], lo: int, hi: int, filled_ms: int) -> None:
        self.points = points
        self.lo = lo
        self.hi = hi
        self.filled_ms = filled_ms
        self.version = 0
        """Bumped whenever points change, so a rendered prefix knows it is out of date."""

    def size(self) -> int:
        return 200 + sum(len(b) + _POINT_OVERHEAD_BYTES for b in self.points.values())


SeriesKey = tuple[str, str, int]
AnswerKey = tuple[str, str, int, int, int]


@dataclass(frozen=True, slots=True)
class _Prefix:
    """The part of an answer's body that a live refresh can reuse: ``body[:length]`` is the head and the
    final points, ``hasher`` has hashed exactly that."""

    body: bytes
    length: int
    count: int
    """Final points in the prefix."""
    series: _Series | None
    version: int
    final_hi: int
    first_ts: int | None
    """Oldest point kept; once it is past the retention the prefix must be rebuilt."""
    hasher: Any

    def reusable(self, series: _Series | None, final_hi: int, oldest_s: int) -> bool:
        """``series``: the series now in the cache (None when absent, due for a re-read, or not needed)."""
        return (series is self.series and (series is None or series.version == self.version)
                and final_hi == self.final_hi and (self.first_ts is None or self.first_ts > oldest_s))


class _TailCache:
    """The live edge of one series and range end, as last read and rendered.

    * ``base`` / ``through``: the points the summary blocks hold for the edge's buckets (rendered, used as
      they are), and the newest minute each holds;
    * ``rollups``: rollup digest items, read only for a bucket a point cannot serve (stored or open minutes
      it does not hold yet, or no block), with ``held`` (the minutes they hold);
    * ``minutes``: the stored minute items after what the points and rollups hold, read at ``read_ms``
      for the edge ``lo``;
    * ``points``: bucket start -> (the stored payloads it was made from, its rendered point);
    * ``open_ts``: minutes that were open in this worker; ``pending``: minutes that closed since and were
      not found in the store yet (the sink writes them a moment after they close).
    """

    __slots__ = ("points", "base", "through", "rollups", "minutes", "held", "lo", "read_ms", "open_ts", "pending")

    def __init__(self) -> None:
        self.points: dict[int, tuple[tuple[bytes, ...], bytes]] = {}
        self.base: dict[int, bytes] = {}
        self.through: dict[int, int] = {}
        self.rollups: dict[int, bytes] = {}
        self.minutes: dict[int, bytes] = {}
        self.held: frozenset[int] = frozenset()
        self.lo = -1
        self.read_ms = -1
        self.open_ts: frozenset[int] = frozenset()
        self.pending: frozenset[int] = frozenset()

    def holds(self, minute_s: int, res: int) -> bool:
        """Whether the stored starting point of the minute's bucket (rollup item or block point) has it."""
        b = bucket_of(minute_s, res)
        if b in self.rollups:
            return minute_s in self.held
        return b in self.base and minute_s <= self.through[b]

    def size(self) -> int:
        return (300 + sum(len(p) + _POINT_OVERHEAD_BYTES for _, p in self.points.values())
                + sum(len(p) + _POINT_OVERHEAD_BYTES
                      for p in (*self.base.values(), *self.rollups.values(), *self.minutes.values()))
                + 8 * (len(self.held) + len(self.through)))


class QueryEngine(Protocol):
    """What the HTTP API asks of a query engine: :class:`MetricsQuery` on one store, or the migration's
    composition of several (app/migration/reads.py)."""

    async def answer(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int) -> Answer:
        ...

    async def events(self, app: str, process_type: str, since_s: int, until_s: int) -> bytes:
        ...

    async def minutes(self, app: str, process_type: str, since_s: int, until_s: int) -> dict[str, Any]:
        ...


class MetricsQuery:
    def __init__(self, store: MetricsStore, live: LiveSource | None = None, *, settings: Settings | None = None,
                 counters: Counters | None = None, clock: Clock | None = None) -> None:
        self.store = store
        self.live = live
        self.settings = settings or Settings()
        self.counters = counters
        self.clock = clock or SystemClock()
        eighth = self.settings.query_cache_max_bytes // 8
        self._series: ByteLRU[SeriesKey, _Series] = ByteLRU(4 * eighth)
        self._answers: ByteLRU[AnswerKey, tuple[Answer, int, _Prefix | None]] = ByteLRU(3 * eighth)
        """rendered answer, fresh until (ms), reusable prefix; kept STALE_GRACE_S longer for
        stale-while-revalidate"""
        self._tails: ByteLRU[AnswerKey, _TailCache] = ByteLRU(eighth)
        """keyed (app, process type, resolution, 0, until): a tail depends on its range end"""
        self._inflight: dict[AnswerKey, asyncio.Future[Answer]] = {}
        self._refreshes: set[asyncio.Future[Answer]] = set()
        self._through_ms: dict[int, int] = {}
        """Stored-through watermark per metrics-1m partition, as last read (agents/progress.py)."""
        self._progress_read_ms = -1
        self._progress_reading: asyncio.Future[None] | None = None
        self._progress_tasks: set[asyncio.Future[None]] = set()
        self._warned_partitions = False
        self._seen_changes: dict[str, int] = {}
        """app -> the newest late-minute notice already applied to the caches"""
        self._epochs: dict[int, int] = {}
        """partition -> bumped when cached answers of its apps are dropped, so computations started before
        do not cache what they read"""

    @property
    def cache_bytes(self) -> int:
        return self._series.bytes + self._answers.bytes + self._tails.bytes

    def _count(self, name: str, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

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
        if now_ms - self._progress_read_ms >= self.settings.progress_interval_s * 1000:
            if self._progress_read_ms < 0:
                await self._read_progress(now_ms)  # nothing known yet: wait for the first read
            elif self._progress_reading is None:
                # Refreshed in the background: requests go on with the last watermarks (at most one interval
                # old); answers computed meanwhile are not cached past a change the refresh finds.
                reading = asyncio.ensure_future(self._read_progress(now_ms))
                self._progress_tasks.add(reading)
                reading.add_done_callback(self._progress_tasks.discard)
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

    async def _read_progress(self, now_ms: int) -> None:
        """Refresh the stored-through watermarks (one small store read, shared by concurrent requests) and
        drop the cached answers of apps that got a late minute, or whose partition's watermark moved back.
        A failed read keeps the last watermarks until the next interval."""
        if self._progress_reading is not None:
            await asyncio.shield(self._progress_reading)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress_reading = fut
        try:
            progress = await self.store.progress()
            self._progress_read_ms = now_ms
            beyond = [pr.partition for pr in progress if pr.partition >= self.settings.partitions]
            if beyond and not self._warned_partitions:
                self._warned_partitions = True
                log.error("the workers publish watermarks of partitions %s, beyond METRICS_PARTITIONS=%d: set "
                          "METRICS_PARTITIONS on this process to the topics' partition count, or apps are "
                          "mapped to the wrong partition's watermark", beyond, self.settings.partitions)
            for pr in progress:
                if pr.stored_through_ms < self._through_ms.get(pr.partition, -1):
                    self._invalidate_partition(pr.partition)  # moved back: a backlog of old data
                self._through_ms[pr.partition] = pr.stored_through_ms
                for app, changed_ms in pr.changed.items():
                    if changed_ms > self._seen_changes.get(app, -1):
                        self._seen_changes[app] = changed_ms
                        self._invalidate(app)
            keep_ms = int(self.settings.query_cache_max_age_s * 1000)
            self._seen_changes = {a: ms for a, ms in self._seen_changes.items() if now_ms - ms < 2 * keep_ms}
            if self.counters is not None and progress:
                self.counters.set("query_watermark_lag_seconds",
                                  max(0, now_ms - min(pr.stored_through_ms for pr in progress)) // 1000)
        except PipelineError as exc:
            self._progress_read_ms = now_ms  # retried next interval; meanwhile the old watermarks hold
            log.warning("could not read the stored-through watermarks (%s); keeping the last ones", exc)
        finally:
            self._progress_reading = None
            fut.set_result(None)

    def _epoch(self, app: str) -> int:
        return self._epochs.get(partition_of(app, self.settings.partitions), 0)

    def _invalidate(self, app: str) -> None:
        """A late minute of ``app`` was stored: nothing cached for it may be served again."""
        p = partition_of(app, self.settings.partitions)
        self._epochs[p] = self._epochs.get(p, 0) + 1
        n = sum(cache.pop_where(lambda k: k[0] == app) for cache in (self._series, self._answers, self._tails))
        self._count("query_cache_invalidations", n)

    def _invalidate_partition(self, partition: int) -> None:
        """A partition's watermark moved back (a backlog of old data): its apps' final answers may be stale."""
        self._epochs[partition] = self._epochs.get(partition, 0) + 1
        parts = self.settings.partitions
        n = sum(cache.pop_where(lambda k: partition_of(k[0], parts) == partition)
                for cache in (self._series, self._answers, self._tails))
        self._count("query_cache_invalidations", n)

    def stored_through_s(self, app: str) -> int:
        """The stored-through watermark of ``app``'s partition in seconds; -1 before one is known."""
        ms = self._through_ms.get(partition_of(app, self.settings.partitions), -1)
        return ms // 1000 if ms >= 0 else -1

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
            epoch = self._epoch(key[0])
            ans, prefix = await self._compute(*key, now_ms, prev)
            s = self.settings
            fresh_ms = int((s.query_cache_max_age_s if ans.final else s.query_tail_ttl_s) * 1000)
            if fresh_ms > 0 and epoch == self._epoch(key[0]):
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

    async def minutes(self, app: str, process_type: str, since_s: int, until_s: int) -> dict[str, Any]:
        """One-minute points as a document (kept for callers of the first API version)."""
        doc: dict[str, Any] = orjson.loads((await self.answer(app, process_type, WINDOW_S, since_s, until_s)).body)
        return doc

    async def _compute(self, app: str, proc: str, res: int, since: int, until: int, now_ms: int,
                       prev: _Prefix | None = None) -> tuple[Answer, _Prefix]:
        now_s = now_ms // 1000
        # Final: settled, and stored (the app's partition's stored-through watermark has passed its end).
        edge = bucket_of(min(now_s - int(self.settings.query_settle_s), max(self.stored_through_s(app), 0)), res)
        # Items expire ts + ttl after their bucket start (app/storage/dynamodb.py); cached ones must too.
        oldest = now_s - self.settings.ttl_s
        final_hi = min(until, edge)
        # The live edge is read while the final part is: the two store reads overlap.
        tail_task = (asyncio.ensure_future(self._tail(app, proc, res, max(since, edge), until))
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
        series = self._live_series((app, proc, res), now_ms) if since < final_hi else None
        if prev is not None and prev.reusable(series, final_hi, oldest):
            prefix = prev
            self._count("query_prefix_reused")
        else:
            points: list[tuple[int, bytes]] = []
            used: _Series | None = None
            version = 0
            if since < final_hi:
                points, used = await self._final(app, proc, res, since, final_hi, now_ms)
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

    def _live_series(self, skey: SeriesKey, now_ms: int) -> _Series | None:
        """The cached final range of a series, unless it is due for a re-read."""
        s = self._series.get(skey, now_ms)
        if s is not None and now_ms - s.filled_ms > self.settings.query_cache_max_age_s * 1000:
            return None
        return s

    async def _final(self, app: str, proc: str, res: int, lo: int, hi: int,
                     now_ms: int) -> tuple[list[tuple[int, bytes]], _Series]:
        skey: SeriesKey = (app, proc, res)
        epoch = self._epoch(app)
        s = self._series.get(skey, now_ms)
        if s is not None and now_ms - s.filled_ms > self.settings.query_cache_max_age_s * 1000:
            s = None
        if s is None or hi < s.lo or lo > s.hi:
            s = _Series(await self._fetch(app, proc, res, lo, hi), lo, hi, now_ms)
        else:
            if lo < s.lo:
                s.points.update(await self._fetch(app, proc, res, lo, s.lo))
                s.lo = lo
                s.version += 1
            if hi > s.hi:
                s.points.update(await self._fetch(app, proc, res, s.hi, hi))
                s.hi = hi
                s.version += 1
        if self.settings.query_cache_max_bytes > 0 and epoch == self._epoch(app):
            self._series.put(skey, s, s.size(), s.filled_ms + int(self.settings.query_cache_max_age_s * 1000) + 1)
        return [(ts, s.points[ts]) for ts in sorted(s.points) if lo <= ts < hi], s

    async def _fetch(self, app: str, proc: str, res: int, lo: int, hi: int) -> dict[int, bytes]:
        """Final points in ``[lo, hi)``: the summary blocks of the range (tables/summary.py), read as stored.
        A block span without a usable block falls back to the digests (written before blocks existed, a
        ``partial`` block), unless a later block vouches that the span had no data; with rollups off,
        coarser points are merged from minutes."""
        if res != WINDOW_S and not self.settings.query_use_rollups:
            return await self._fetch_digests(app, proc, res, lo, hi)
        span_s = BLOCK_SPAN_S[res]
        first = bucket_of(lo, span_s)
        items = await self.store.query(app, proc, res, first, hi, SUMMARY)
        self._count("query_items_read", len(items))
        points: dict[int, bytes] = {}
        covered: set[int] = set()
        blocks: list[SummaryBlock] = []
        for it in items:
            try:
                block = SummaryBlock.decode(it.payload)
            except ValueError as exc:
                log.warning("summary block %s/%s res %d at %d unreadable, using its digests: %s",
                            app, proc, res, it.ts_s, exc)
                continue
            blocks.append(block)
            if not block.partial:
                covered.add(it.ts_s)
                points.update(block.between(lo, hi))
        gaps: list[tuple[int, int]] = []
        for b in range(first, hi, span_s):
            if b in covered or any(block.vouches_empty(b) for block in blocks):
                continue
            g_lo, g_hi = max(lo, b), min(hi, b + span_s)
            if gaps and gaps[-1][1] == g_lo:
                gaps[-1] = (gaps[-1][0], g_hi)
            else:
                gaps.append((g_lo, g_hi))
        if gaps:
            self._count("query_digest_fallbacks", len(gaps))
            gate = asyncio.Semaphore(FALLBACK_CONCURRENCY)

            async def fallback(g_lo: int, g_hi: int) -> dict[int, bytes]:
                async with gate:
                    return await self._fetch_digests(app, proc, res, g_lo, g_hi)

            for part in await asyncio.gather(*(fallback(*g) for g in gaps)):
                points.update(part)
        return points

    async def _fetch_digests(self, app: str, proc: str, res: int, lo: int, hi: int) -> dict[int, bytes]:
        """Points in ``[lo, hi)`` computed from digest items: minutes, rollup items, or (rollups off)
        minutes merged now."""
        if res == WINDOW_S or self.settings.query_use_rollups:
            items = await self.store.query(app, proc, res, lo, hi)
            self._count("query_items_read", len(items))

            def build() -> dict[int, bytes]:
                return {it.ts_s: point_json(decode_item(it)) for it in items}
        else:
            items = await self.store.query(app, proc, WINDOW_S, lo, hi)
            self._count("query_items_read", len(items))

            def build() -> dict[int, bytes]:
                merged = merge_buckets((decode_item(it) for it in items), res)
                return {b: point_json(agg) for b, agg in merged.items()}
        return await asyncio.to_thread(build) if len(items) > OFFLOAD_ITEMS else build()

    async def _tail(self, app: str, proc: str, res: int, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """Non-final buckets: the points the summary blocks hold, plus the stored minutes they do not hold
        yet and this worker's open minutes, merged now. A bucket with nothing beyond its block point is
        served as stored; one with more starts from its rollup item (which lists the minutes it holds), so
        only the few minutes it does not hold are read and merged.

        Incremental, because hot ranges refresh this every ``query_tail_ttl_s`` on the event loop: the stored
        items are re-read at most every ``query_tail_read_interval_s`` (a DynamoDB call costs a few ms of
        loop time; stored minutes change once a minute), at once when the edge moved or a minute this worker
        held open has closed, and until that minute is found; a bucket whose stored inputs are byte-for-byte
        the ones rendered last time is not decoded again."""
        tkey: AnswerKey = (app, proc, res, 0, hi)
        epoch = self._epoch(app)
        now_ms = self.clock.now_ms()
        cached = self._tails.get(tkey, now_ms) or _TailCache()
        live = self.live(app, proc, lo * 1000, hi * 1000) if self.live is not None else []
        open_now = frozenset(agg.key.start_ms // 1000 for agg in live)
        waiting = (cached.open_ts - open_now) | cached.pending  # closed here, maybe not in DynamoDB yet
        # A minute newly open here, in a bucket served by its block point alone, needs that bucket's digest.
        unmergeable = any(bucket_of(m, res) in cached.base and bucket_of(m, res) not in cached.rollups
                          and not cached.holds(m, res) for m in open_now) and res != WINDOW_S
        t = _TailCache()
        if (cached.lo != lo or waiting or unmergeable
                or now_ms - cached.read_ms >= self.settings.query_tail_read_interval_s * 1000
                or self.settings.query_cache_max_bytes <= 0):
            await self._read_tail(t, cached, app, proc, res, lo, hi, open_now)
            t.read_ms = now_ms
            t.pending = frozenset(ts for ts in waiting if lo <= ts < hi and ts not in t.minutes
                                  and not t.holds(ts, res))
        else:
            t.base, t.through, t.rollups, t.minutes, t.held, t.lo, t.read_ms = (
                cached.base, cached.through, cached.rollups, cached.minutes, cached.held, cached.lo, cached.read_ms)
            t.pending = cached.pending
        t.open_ts = open_now
        rendered = cached.points
        stored = {ts: p for ts, p in t.minutes.items() if not t.holds(ts, res)}
        open_ts = {ts for ts in open_now if not t.holds(ts, res)}
        # What each bucket is made of: its rollup item or block point, and stored minutes (an open minute
        # changes every time).
        inputs: dict[int, list[bytes]] = {b: [t.rollups.get(b, p)] for b, p in t.base.items()}
        inputs.update((b, [p]) for b, p in t.rollups.items())
        for ts in sorted(stored):
            inputs.setdefault(bucket_of(ts, res), []).append(stored[ts])
        dirty = {bucket_of(ts, res) for ts in open_ts}
        reuse = {b: rendered[b][1] for b, parts in inputs.items()
                 if b not in dirty and b in rendered and rendered[b][0] == tuple(parts)}
        self._count("query_tail_points_reused", len(reuse))
        wanted = {b for b in inputs.keys() | dirty if b not in reuse}
        decode = sum(len(inputs.get(b, ())) for b in wanted)
        base_points, base_payloads = t.base, t.rollups

        def build() -> dict[int, bytes]:
            minutes = {ts: decode_item(MetricItem(app, proc, WINDOW_S, ts, p)) for ts, p in stored.items()
                       if bucket_of(ts, res) in wanted}
            # An open minute is newer than anything stored for it (a stored copy exists only in the
            # instant between emission and forgetting the window; both hold the same data).
            for agg in live:
                if agg.key.start_ms // 1000 in open_ts:
                    minutes[agg.key.start_ms // 1000] = agg
            if res == WINDOW_S:
                out = {ts: point_json(m) for ts, m in minutes.items()}
            else:
                merged = merge_buckets(minutes.values(), res)
                out = {}
                for b in wanted:
                    extra = merged.get(b)
                    if b in base_payloads:
                        agg = Aggregate.from_record(orjson.loads(base_payloads[b]))
                        if extra is not None:
                            agg.merge(extra)
                        out[b] = point_json(agg)
                    elif extra is not None and b not in base_points:
                        out[b] = point_json(extra)
            # A block point with nothing to add is the answer as stored.
            out.update((b, base_points[b]) for b in wanted if b not in out and b in base_points)
            return out

        # Open windows are mutated by the aggregation agent on the event loop: never touch them off it.
        fresh = await asyncio.to_thread(build) if decode > OFFLOAD_ITEMS and not live else build()
        t.points.update((b, rendered[b]) for b in reuse)
        t.points.update((b, (tuple(inputs[b]), p)) for b, p in fresh.items() if b in inputs and b not in dirty)
        if self.settings.query_cache_max_bytes > 0 and epoch == self._epoch(app):
            self._tails.put(tkey, t, t.size(), now_ms + int(self.settings.query_cache_max_age_s * 1000))
        points = {**fresh, **reuse}
        return [(b, points[b]) for b in sorted(points)]

    async def _read_tail(self, t: _TailCache, cached: _TailCache, app: str, proc: str, res: int, lo: int,
                         hi: int, open_now: frozenset[int]) -> None:
        """The stored items of the live edge into ``t``: block points; rollup items for the buckets a point
        cannot serve; then the minutes neither holds."""
        rollups_on = res == WINDOW_S or self.settings.query_use_rollups
        if rollups_on:
            blocks = await self.store.query(app, proc, res, block_of(lo, res), hi, SUMMARY)
            self._count("query_items_read", len(blocks))
            for it in blocks:
                try:
                    block = SummaryBlock.decode(it.payload)
                except ValueError:
                    continue  # _fetch logs unreadable blocks; here the digests serve
                if not block.partial:
                    for ts, p in block.between(lo, hi):
                        t.base[ts] = p
                        t.through[ts] = block.holds_through(ts)
        held: set[int] = set()

        async def read_rollups(buckets: list[int]) -> None:
            """Rollup digest items for these buckets (one Query over their span)."""
            if not buckets:
                return
            items = await self.store.query(app, proc, res, min(buckets), max(buckets) + 1)
            self._count("query_items_read", len(items))
            for it in items:
                if it.ts_s not in buckets:
                    continue
                t.rollups[it.ts_s] = it.payload
                if cached.rollups.get(it.ts_s) == it.payload:  # parsing a 2 h digest costs ~1 ms: only if new
                    held.update(m for m in cached.held if it.ts_s <= m < it.ts_s + res)
                else:
                    held.update(int(m) for m in orjson.loads(it.payload).get("mins", ()))

        if res != WINDOW_S and self.settings.query_use_rollups:
            await read_rollups([b for b in range(lo, hi, res) if b not in t.base])
        # Buckets are contiguous from lo: minutes are needed from the first bucket with neither, or after
        # the newest minute they hold.
        minutes_from = lo
        for b in range(lo, hi, res):
            if b in t.base:
                minutes_from = t.through[b] + WINDOW_S
            elif b in t.rollups:
                mins = [m for m in held if b <= m < b + res]
                minutes_from = max(mins) + WINDOW_S if mins else b
            else:
                minutes_from = b
                break
        items = await self.store.query(app, proc, WINDOW_S, minutes_from, hi) if minutes_from < hi else []
        self._count("query_items_read", len(items))
        t.minutes = {it.ts_s: it.payload for it in items}
        if res != WINDOW_S and rollups_on:
            # A block point that lacks a stored or open minute is merged from its rollup item instead.
            extend = sorted({bucket_of(m, res) for m in (*t.minutes, *open_now) if lo <= m < hi
                             and bucket_of(m, res) in t.base and m > t.through[bucket_of(m, res)]})
            await read_rollups(extend)
        t.held = frozenset(held)
        t.lo = lo

Authorize = Callable[[str], Awaitable["str | None"]]
"""A read token -> the app it may read, or None when it is not a live read token."""
