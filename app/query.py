"""Answering metric queries at 1 min / 10 min / 1 h / 2 h resolution, with in-process caches.

Where a point comes from
------------------------
A bucket is *final* once its end is ``query_settle_s`` in the past (grace + idle timeout + sink delay:
nothing can change it any more). Final buckets are read from DynamoDB -- minutes as stored by the sink,
coarser resolutions from the rollup items of agents/rollup.py -- and kept in a per-series cache, because a
closed bucket is immutable. Newer buckets (the *tail*) are merged on every read from the stored minutes plus
the minutes still open in this worker's table. Coarser points are always :meth:`Aggregate.merge` of the
minutes: counts and sums add, max is max, means are weighted, percentiles come from the merged t-digests,
never from averaging percentiles.

Caches (bounded by ``query_cache_max_bytes``, least recently used evicted first)
---------------------------------------------------------------------------------
* per series ``(app, process type, resolution)``: one contiguous range of final buckets, ``ts -> point JSON``.
  A request extends the range at its ends with a DynamoDB read of just the missing part. The range is re-read
  after ``query_cache_max_age_s`` so a minute written late (worker backlog) shows up eventually.
* per answer ``(app, process type, resolution, since, until)``: the rendered body and its ETag, reused until
  the max age when the whole range is final, else for ``query_tail_ttl_s`` (the live edge moves); a stale
  live-edge answer is served while one background task recomputes it (stale-while-revalidate, at most
  ``STALE_GRACE_S``), so hot requests never wait for the tail's read and merge.
Identical concurrent misses share one computation. Expired points (older than the retention) are never
returned, cached or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Hashable, Iterable, TypeVar

import orjson

from app.clock import Clock, SystemClock
from app.settings import WINDOW_S, Settings
from app.stats import Counters
from app.store import MetricItem, MetricsStore
from tables.aggregate import Aggregate, BucketKey

log = logging.getLogger(__name__)

LiveSource = Callable[[str, str, int, int], list[Aggregate]]
"""(app, process_type, since_ms, until_ms) -> open windows held by this worker."""

RESOLUTIONS = (60, 600, 3600, 7200)
ROLLUP_RESOLUTIONS = (600, 3600, 7200)
RESOLUTION_NAMES = {"1m": 60, "10m": 600, "1h": 3600, "2h": 7200}
OFFLOAD_ITEMS = 32
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


def bucket_of(ts_s: int, resolution_s: int) -> int:
    return ts_s - ts_s % resolution_s


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

    def __len__(self) -> int:
        return len(self._d)


class _Series:
    """Final buckets of one series over the contiguous range ``[lo, hi)``: absent means no data."""

    __slots__ = ("points", "lo", "hi", "filled_ms")

    def __init__(self, points: dict[int, bytes], lo: int, hi: int, filled_ms: int) -> None:
        self.points = points
        self.lo = lo
        self.hi = hi
        self.filled_ms = filled_ms

    def size(self) -> int:
        return 200 + sum(len(b) + _POINT_OVERHEAD_BYTES for b in self.points.values())


SeriesKey = tuple[str, str, int]
AnswerKey = tuple[str, str, int, int, int]


class MetricsQuery:
    def __init__(self, store: MetricsStore, live: LiveSource | None = None, *, settings: Settings | None = None,
                 counters: Counters | None = None, clock: Clock | None = None) -> None:
        self.store = store
        self.live = live
        self.settings = settings or Settings()
        self.counters = counters
        self.clock = clock or SystemClock()
        half = self.settings.query_cache_max_bytes // 2
        self._series: ByteLRU[SeriesKey, _Series] = ByteLRU(half)
        self._answers: ByteLRU[AnswerKey, tuple[Answer, int]] = ByteLRU(half)
        """rendered answer, fresh until (ms); kept STALE_GRACE_S longer for stale-while-revalidate"""
        self._inflight: dict[AnswerKey, asyncio.Future[Answer]] = {}
        self._refreshes: set[asyncio.Future[Answer]] = set()

    @property
    def cache_bytes(self) -> int:
        return self._series.bytes + self._answers.bytes

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
        hit = self._answers.get(key, now_ms)
        if hit is not None:
            ans, fresh_until_ms = hit
            self._count("query_cache_hits")
            if fresh_until_ms <= now_ms and key not in self._inflight:
                # Stale live edge: answer now, recompute once in the background (stale-while-revalidate),
                # so no request waits for the tail's DynamoDB read and digest merging.
                task = asyncio.ensure_future(self._fill(key, now_ms))
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

    async def _fill(self, key: AnswerKey, now_ms: int) -> Answer:
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self._count("query_cache_misses")
            ans = await self._compute(*key, now_ms)
            s = self.settings
            fresh_ms = int((s.query_cache_max_age_s if ans.final else s.query_tail_ttl_s) * 1000)
            if fresh_ms > 0:
                keep_ms = fresh_ms if ans.final else fresh_ms + int(STALE_GRACE_S * 1000)
                self._answers.put(key, (ans, now_ms + fresh_ms), len(ans.body) + 300, now_ms + keep_ms)
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

    async def minutes(self, app: str, process_type: str, since_s: int, until_s: int) -> dict[str, Any]:
        """One-minute points as a document (kept for callers of the first API version)."""
        doc: dict[str, Any] = orjson.loads((await self.answer(app, process_type, WINDOW_S, since_s, until_s)).body)
        return doc

    async def _compute(self, app: str, proc: str, res: int, since: int, until: int, now_ms: int) -> Answer:
        now_s = now_ms // 1000
        edge = bucket_of(now_s - int(self.settings.query_settle_s), res)
        points: list[tuple[int, bytes]] = []
        if since < min(until, edge):
            points.extend(await self._final(app, proc, res, since, min(until, edge), now_ms))
        if max(since, edge) < until:
            points.extend(await self._tail(app, proc, res, max(since, edge), until))
        # Items expire ts + ttl after their bucket start (app/store.py); cached ones must too.
        oldest = now_s - self.settings.ttl_s
        kept = [b for ts, b in points if ts > oldest]
        head = orjson.dumps({"app": app, "process_type": proc, "resolution_s": res, "since": since,
                             "until": until})
        body = b"".join((head[:-1], b',"points":[', b",".join(kept), b"]}"))
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        return Answer(body, etag, until <= edge, res, len(kept))

    async def _final(self, app: str, proc: str, res: int, lo: int, hi: int, now_ms: int) -> list[tuple[int, bytes]]:
        skey: SeriesKey = (app, proc, res)
        s = self._series.get(skey, now_ms)
        if s is not None and now_ms - s.filled_ms > self.settings.query_cache_max_age_s * 1000:
            s = None
        if s is None or hi < s.lo or lo > s.hi:
            s = _Series(await self._fetch(app, proc, res, lo, hi), lo, hi, now_ms)
        else:
            if lo < s.lo:
                s.points.update(await self._fetch(app, proc, res, lo, s.lo))
                s.lo = lo
            if hi > s.hi:
                s.points.update(await self._fetch(app, proc, res, s.hi, hi))
                s.hi = hi
        if self.settings.query_cache_max_bytes > 0:
            self._series.put(skey, s, s.size(), s.filled_ms + int(self.settings.query_cache_max_age_s * 1000) + 1)
        return [(ts, s.points[ts]) for ts in sorted(s.points) if lo <= ts < hi]

    async def _fetch(self, app: str, proc: str, res: int, lo: int, hi: int) -> dict[int, bytes]:
        """Final points in ``[lo, hi)`` from DynamoDB: stored minutes, rollup items, or (rollups off) minutes
        merged now."""
        if res == WINDOW_S or self.settings.query_use_rollups:
            items = await self.store.query(app, proc, res, lo, hi)
            self._count("query_items_read", len(items))

            def build() -> dict[int, bytes]:
                return {it.ts_s: orjson.dumps(decode_item(it).summary()) for it in items}
        else:
            items = await self.store.query(app, proc, WINDOW_S, lo, hi)
            self._count("query_items_read", len(items))

            def build() -> dict[int, bytes]:
                merged = merge_buckets((decode_item(it) for it in items), res)
                return {b: orjson.dumps(agg.summary()) for b, agg in merged.items()}
        return await asyncio.to_thread(build) if len(items) > OFFLOAD_ITEMS else build()

    async def _tail(self, app: str, proc: str, res: int, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """Non-final buckets: stored minutes plus this worker's open minutes, merged now. For rollup
        resolutions the partial rollup item (which lists the minutes it holds) is the starting point, so only
        the few minutes it does not hold yet are read and merged."""
        base: dict[int, Aggregate] = {}
        held: set[int] = set()
        minutes_from = lo
        if res != WINDOW_S and self.settings.query_use_rollups:
            rollups = await self.store.query(app, proc, res, lo, hi)
            self._count("query_items_read", len(rollups))
            for it in rollups:
                rec = orjson.loads(it.payload)
                base[it.ts_s] = Aggregate.from_record(rec)
                held.update(int(m) for m in rec.get("mins", ()))
            # Buckets are contiguous from lo: minutes are needed from the first bucket without an item, or
            # after the newest minute the items hold.
            for b in range(lo, hi, res):
                if b not in base:
                    minutes_from = b
                    break
                mins = [m for m in held if b <= m < b + res]
                minutes_from = max(mins) + WINDOW_S if mins else b
        items = await self.store.query(app, proc, WINDOW_S, minutes_from, hi) if minutes_from < hi else []
        self._count("query_items_read", len(items))
        live = self.live(app, proc, lo * 1000, hi * 1000) if self.live is not None else []

        def build() -> list[tuple[int, bytes]]:
            minutes = {it.ts_s: decode_item(it) for it in items if it.ts_s not in held}
            # An open minute is newer than anything stored for it (a stored copy exists only in the
            # instant between emission and forgetting the window; both hold the same data).
            for agg in live:
                if agg.key.start_ms // 1000 not in held:
                    minutes[agg.key.start_ms // 1000] = agg
            if res == WINDOW_S:
                return [(ts, orjson.dumps(minutes[ts].summary())) for ts in sorted(minutes)]
            merged = merge_buckets(minutes.values(), res)
            for b, agg in base.items():
                extra = merged.get(b)
                if extra is not None:
                    agg.merge(extra)
                merged[b] = agg
            return [(b, orjson.dumps(merged[b].summary())) for b in sorted(merged)]

        # Open windows are mutated by the aggregation agent on the event loop: never touch them off it.
        return await asyncio.to_thread(build) if len(items) > OFFLOAD_ITEMS and not live else build()


Authorize = Callable[[str], Awaitable["str | None"]]
"""A read token -> the app it may read, or None when it is not a live read token."""
