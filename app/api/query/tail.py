"""The live edge: buckets not final yet, built on every read from the store and this worker's open minutes.

Stored items are re-read at most every ``query_tail_read_interval_s``; a bucket whose inputs did not change is
not decoded again.
Reference: docs/api.md#caching
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from app.api.query.cache import POINT_OVERHEAD_BYTES, AnswerKey, ByteLRU
from app.api.query.points import OFFLOAD_ITEMS, decode_item, merge_buckets
from app.clock import Clock
from app.ops.stats import CounterName, Counters
from app.settings import WINDOW_S, QuerySettings
from app.storage.protocol import SUMMARY, MetricItem, MetricsStore
from tables import record as records
from tables.aggregate import Aggregate, bucket_of
from tables.summary import SummaryBlock, block_of, point_json

LiveSource = Callable[[str, str, int, int], list[Aggregate]]
"""(app, process_type, since_ms, until_ms) -> open windows held by this worker."""


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

    __slots__ = ("base", "held", "lo", "minutes", "open_ts", "pending", "points", "read_ms", "rollups", "through")

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
        return (300 + sum(len(p) + POINT_OVERHEAD_BYTES for _, p in self.points.values())
                + sum(len(p) + POINT_OVERHEAD_BYTES
                      for p in (*self.base.values(), *self.rollups.values(), *self.minutes.values()))
                + 8 * (len(self.held) + len(self.through)))


class LiveTail:
    """The non-final buckets of a range, and the per-series cache that makes refreshing them cheap.

    ``live``: this worker's open windows (None: a process with no stream jobs); ``epoch``: app -> its
    partition's invalidation epoch (:class:`ProgressWatch.epoch`), so a tail read while it moved is not
    cached."""

    def __init__(self, store: MetricsStore, live: LiveSource | None, epoch: Callable[[str], int], *,
                 query: QuerySettings, counters: Counters | None = None, clock: Clock, max_bytes: int) -> None:
        self.store = store
        self.live = live
        self.epoch = epoch
        self.query = query
        self.counters = counters
        self.clock = clock
        self.cache: ByteLRU[AnswerKey, _TailCache] = ByteLRU(max_bytes)
        """keyed (app, process type, resolution, 0, until): a tail depends on its range end"""

    def _count(self, name: CounterName, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

    async def points(self, app: str, proc: str, res: int, lo: int, hi: int) -> list[tuple[int, bytes]]:
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
        epoch = self.epoch(app)
        now_ms = self.clock.now_ms()
        cached = self.cache.get(tkey, now_ms) or _TailCache()
        live = self.live(app, proc, lo * 1000, hi * 1000) if self.live is not None else []
        open_now = frozenset(agg.key.start_ms // 1000 for agg in live)
        waiting = (cached.open_ts - open_now) | cached.pending  # closed here, maybe not in DynamoDB yet
        # A minute newly open here, in a bucket served by its block point alone, needs that bucket's digest.
        unmergeable = any(bucket_of(m, res) in cached.base and bucket_of(m, res) not in cached.rollups
                          and not cached.holds(m, res) for m in open_now) and res != WINDOW_S
        t = _TailCache()
        if (cached.lo != lo or waiting or unmergeable
                or now_ms - cached.read_ms >= self.query.tail_read_interval_s * 1000
                or self.query.cache_max_bytes <= 0):
            await self._read(t, cached, app, proc, res, lo, hi, open_now)
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
                        agg = records.decode(base_payloads[b])[0]
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
        if self.query.cache_max_bytes > 0 and epoch == self.epoch(app):
            self.cache.put(tkey, t, t.size(), now_ms + int(self.query.cache_max_age_s * 1000))
        points = {**fresh, **reuse}
        return [(b, points[b]) for b in sorted(points)]

    async def _read(self, t: _TailCache, cached: _TailCache, app: str, proc: str, res: int, lo: int,
                         hi: int, open_now: frozenset[int]) -> None:
        """The stored items of the live edge into ``t``: block points; rollup items for the buckets a point
        cannot serve; then the minutes neither holds."""
        rollups_on = res == WINDOW_S or self.query.use_rollups
        coarse = res != WINDOW_S and self.query.use_rollups
        # The edge's blocks and rollup items in one round trip: a coarse bucket past the watermark has no
        # block point (its point is rendered once final), only its rollup item (partial while open).
        reads: list[Awaitable[list[MetricItem]]] = []
        if rollups_on:
            reads.append(self.store.query(app, proc, res, block_of(lo, res), hi, SUMMARY))
        if coarse:
            reads.append(self.store.query(app, proc, res, lo, hi))
        found = await asyncio.gather(*reads)
        blocks = found[0] if rollups_on else []
        stored_rollups = {it.ts_s: it.payload for it in found[1]} if coarse else {}
        self._count("query_items_read", sum(map(len, found)))
        for it in blocks:
            try:
                block = SummaryBlock.decode(it.payload)
            except ValueError:
                continue  # FinalSeries logs unreadable blocks; here the digests serve
            if not block.partial:
                for ts, p in block.between(lo, hi):
                    t.base[ts] = p
                    t.through[ts] = block.holds_through(ts)
        held: set[int] = set()

        def use_rollups(buckets: list[int]) -> None:
            """Serve these buckets from their rollup items (those that have one)."""
            for b in buckets:
                payload = stored_rollups.get(b)
                if payload is None:
                    continue
                t.rollups[b] = payload
                if cached.rollups.get(b) == payload:  # parsing a 2 h digest costs ~1 ms: only if new
                    held.update(m for m in cached.held if b <= m < b + res)
                else:
                    held.update(records.decode(payload)[1] or ())

        if coarse:
            use_rollups([b for b in range(lo, hi, res) if b not in t.base])
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
        if coarse:
            # A block point that lacks a stored or open minute is merged from its rollup item instead.
            use_rollups(sorted({bucket_of(m, res) for m in (*t.minutes, *open_now) if lo <= m < hi
                                and bucket_of(m, res) in t.base and m > t.through[bucket_of(m, res)]}))
        t.held = frozenset(held)
        t.lo = lo
