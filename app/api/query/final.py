"""Final buckets, cached per series: final once stored and ``query_settle_s`` old, so each is read once.

A series caches one contiguous range of final points, extended at its ends and re-read after
``query_cache_max_age_s`` (a minute stored late shows up).
Reference: docs/design/final.md#where-points-come-from
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.api.query.cache import POINT_OVERHEAD_BYTES, ByteLRU, SeriesKey
from app.api.query.points import OFFLOAD_ITEMS, decode_item, merge_buckets
from app.ops.stats import CounterName, Counters
from app.settings import WINDOW_S, QuerySettings
from app.storage.protocol import SUMMARY, MetricsStore
from tables.aggregate import bucket_of
from tables.summary import BLOCK_SPAN_S, SummaryBlock, point_json

log = logging.getLogger(__name__)

FALLBACK_CONCURRENCY = 8
"""Digest reads in flight for the block spans of one range that have no summary block (sparse or old data)."""


class Series:
    """Final buckets of one series over the contiguous range ``[lo, hi)``: absent means no data."""

    __slots__ = ("filled_ms", "hi", "lo", "points", "version")

    def __init__(self, points: dict[int, bytes], lo: int, hi: int, filled_ms: int) -> None:
        self.points = points
        self.lo = lo
        self.hi = hi
        self.filled_ms = filled_ms
        self.version = 0
        """Bumped whenever points change, so a rendered prefix knows it is out of date."""

    def size(self) -> int:
        return 200 + sum(len(b) + POINT_OVERHEAD_BYTES for b in self.points.values())


class FinalSeries:
    """The per-series cache of final points, and the reads that fill it.

    ``epoch``: app -> its partition's invalidation epoch (:class:`ProgressWatch.epoch`); a range read while
    it moved is returned but not cached."""

    def __init__(self, store: MetricsStore, epoch: Callable[[str], int], *, query: QuerySettings,
                 counters: Counters | None = None, max_bytes: int) -> None:
        self.store = store
        self.epoch = epoch
        self.query = query
        self.counters = counters
        self.cache: ByteLRU[SeriesKey, Series] = ByteLRU(max_bytes)

    def _count(self, name: CounterName, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

    def cached(self, skey: SeriesKey, now_ms: int) -> Series | None:
        """The cached final range of a series, unless it is due for a re-read."""
        s = self.cache.get(skey, now_ms)
        if s is not None and now_ms - s.filled_ms > self.query.cache_max_age_s * 1000:
            return None
        return s

    async def points(self, app: str, proc: str, res: int, lo: int, hi: int,
                     now_ms: int) -> tuple[list[tuple[int, bytes]], Series]:
        """The final points in ``[lo, hi)``, oldest first, and the series they were taken from."""
        skey: SeriesKey = (app, proc, res)
        epoch = self.epoch(app)
        s = self.cached(skey, now_ms)
        if s is None or hi < s.lo or lo > s.hi:
            s = Series(await self._fetch(app, proc, res, lo, hi), lo, hi, now_ms)
        else:
            if lo < s.lo:
                s.points.update(await self._fetch(app, proc, res, lo, s.lo))
                s.lo = lo
                s.version += 1
            if hi > s.hi:
                s.points.update(await self._fetch(app, proc, res, s.hi, hi))
                s.hi = hi
                s.version += 1
        if self.query.cache_max_bytes > 0 and epoch == self.epoch(app):
            self.cache.put(skey, s, s.size(), s.filled_ms + int(self.query.cache_max_age_s * 1000) + 1)
        return [(ts, s.points[ts]) for ts in sorted(s.points) if lo <= ts < hi], s

    async def _fetch(self, app: str, proc: str, res: int, lo: int, hi: int) -> dict[int, bytes]:
        """Final points in ``[lo, hi)``: the summary blocks of the range (tables/summary.py), read as stored.
        A block span without a usable block falls back to the digests (written before blocks existed, a
        ``partial`` block), unless a later block vouches that the span had no data; with rollups off,
        coarser points are merged from minutes."""
        if res != WINDOW_S and not self.query.use_rollups:
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
        if res == WINDOW_S or self.query.use_rollups:
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
