"""Stream job: ``metrics-1m`` -> 10 min / 1 h / 2 h rollup items, and the summary blocks charts read.

Minutes are merged into the changelogged table as they come; the store is written only when a bucket is
final (:meth:`Rollup.flush`, called by the watermark publisher before it publishes), so each rollup item is
written once and each open block once per ``METRICS_ROLLUP_FLUSH_S``, not every minute. Idempotent under
at-least-once input: each bucket records the minutes merged into it, and what is not stored yet stays marked
pending in the table, so a crash redoes the writes.
Reference: docs/design/rollups.md, docs/design/storage.md#store-layout-summaries-apart-from-digests
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from agents.progress import Watermarks
from app.clock import Clock, SystemClock
from app.errors import RetriableError, StoreError
from app.ops.stats import Counters
from app.retry import RetryPolicy, Sleep, retry_retriable
from app.settings import WINDOW_S, QuerySettings, Settings, StorageSettings
from app.storage import catalog
from app.storage.protocol import DIGEST, SUMMARY, MetricItem, MetricsStore
from tables import record as records
from tables.aggregate import ROLLUP_RESOLUTIONS, Aggregate, BucketKey, bucket_of
from tables.state import partition_context
from tables.summary import BLOCK_SPAN_S, SummaryBlock, block_of, point_json

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

Table = MutableMapping[bytes, Any]
BucketId = tuple[str, str, int, int]
"""(app, process type, resolution_s, bucket start s); a summary block's id has the block start instead."""
READ_CONCURRENCY = 16
ISOLATE_STREAK = 8
"""Items of a refused batch are written one by one until this many in a row are refused too: more than one
series writes per batch (3 rollup items, 4 blocks), so the cause is then not one series."""
HOUR_S = 3600
assert BLOCK_SPAN_S[WINDOW_S] == HOUR_S and HOUR_S in ROLLUP_RESOLUTIONS


PENDING = 0x01
"""First byte of a table value not stored yet, followed by its due time (8 bytes, big-endian seconds) and the
value; a stored value is the bare zlib stream (as before pending values existed, so old tables read clean)."""


def table_key(b: BucketId) -> bytes:
    return f"r|{b[0]}|{b[1]}|{b[2]}|{b[3]}".encode()


def block_key(b: BucketId) -> bytes:
    return f"s|{b[0]}|{b[1]}|{b[2]}|{b[3]}".encode()


def since_key(app: str, proc: str) -> bytes:
    return f"m|{app}|{proc}".encode()


def catalog_key(app: str, day_s: int) -> bytes:
    return f"c|{app}|{day_s}".encode()


def bucket_id(key: bytes) -> BucketId:
    _, app, proc, res, ts = key.decode().split("|")
    return app, proc, int(res), int(ts)


def pack(blob: bytes, due_s: int | None) -> bytes:
    """A table value: ``blob`` (a zlib stream), marked pending until stored when ``due_s`` is set."""
    return blob if due_s is None else bytes((PENDING,)) + due_s.to_bytes(8, "big", signed=True) + blob


def unpack(value: bytes) -> tuple[bytes, int | None]:
    """``(zlib stream, due time s or None when stored)`` of a table value."""
    if value[0] == PENDING:
        return value[9:], int.from_bytes(value[1:9], "big", signed=True)
    return value, None


class Block:
    """A summary block held in the table, with the partition whose changelog carries it and, while the store
    lacks its latest version, when it is due (the end of the oldest minute it holds that is not stored)."""

    __slots__ = ("block", "due_s", "partition")

    def __init__(self, block: SummaryBlock, partition: int, due_s: int | None = None) -> None:
        self.block = block
        self.partition = partition
        self.due_s = due_s

    def encode(self) -> bytes:
        b = self.block
        return pack(zlib.compress(orjson.dumps({"p": self.partition, "end_s": b.start_s + b.span_s,
                                                "blk": b.encode().decode()}), 1), self.due_s)

    @classmethod
    def decode(cls, raw: bytes) -> Block:
        blob, due_s = unpack(raw)
        rec = orjson.loads(zlib.decompress(blob))
        return cls(SummaryBlock.decode(rec["blk"].encode()), int(rec["p"]), due_s)

    def touch(self, due_s: int) -> None:
        self.due_s = due_s if self.due_s is None else min(self.due_s, due_s)

    def item(self, app: str, proc: str) -> MetricItem:
        b = self.block
        return MetricItem(app, proc, b.resolution_s, b.start_s, b.encode(), SUMMARY, b.span_s)


class Bucket:
    """A rollup bucket: the merged aggregate, the minute starts (s) already merged, and whether the store
    lacks its latest version (``due_s``: its end, when it is final and written)."""

    __slots__ = ("agg", "due_s", "mins", "partition")

    def __init__(self, agg: Aggregate, mins: set[int], partition: int, due_s: int | None = None) -> None:
        self.agg = agg
        self.mins = mins
        self.partition = partition
        self.due_s = due_s

    @property
    def end_s(self) -> int:
        return self.agg.key.start_ms // 1000 + self.agg.resolution_s

    def record(self) -> dict[str, Any]:
        rec = self.agg.to_record()
        rec["mins"] = sorted(self.mins)
        return rec

    def encode(self) -> bytes:
        rec = self.record()
        rec["p"] = self.partition
        rec["end_s"] = self.end_s
        return pack(zlib.compress(orjson.dumps(rec), 1), self.due_s)

    def payload(self, version: int) -> bytes:
        """The stored item (tables/record.py)."""
        return records.encode(self.agg, mins=self.mins, version=version)

    @classmethod
    def decode(cls, raw: bytes) -> Bucket:
        blob, due_s = unpack(raw)
        rec = orjson.loads(zlib.decompress(blob))
        return cls(Aggregate.from_record(rec), {int(m) for m in rec.get("mins", ())}, int(rec["p"]), due_s)


def decode_minute(value: bytes) -> Aggregate:
    """A ``metrics-1m`` record's aggregate; ValueError when it is not one."""
    try:
        rec = orjson.loads(value)
        if not isinstance(rec, dict) or rec.get("res_s") != WINDOW_S:
            raise ValueError("not a one-minute aggregate record")
        return Aggregate.from_record(rec)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed metrics-1m record: {exc}") from None


class Rollup:
    def __init__(self, table: Table, store: MetricsStore, storage: StorageSettings, query: QuerySettings,
                 counters: Counters, *,
                 context_topic: str, clock: Clock | None = None, sleep: Sleep = asyncio.sleep,
                 jitter: Callable[[], float] = random.random, watermarks: Watermarks | None = None) -> None:
        """``watermarks``: told of each minute stored after its partition's stored-through watermark had
        passed it (agents/progress.py), so query caches drop the app's answers."""
        self.watermarks = watermarks
        self.table = table
        self.store = store
        self.storage, self.query = storage, query
        self.counters = counters
        self.context_topic = context_topic
        self.clock = clock or SystemClock()
        self.sleep = sleep
        self.policy = RetryPolicy.from_ms(storage.backoff_base_ms, storage.backoff_max_ms, jitter=jitter)
        self._lock = asyncio.Lock()
        """Merging and flushing both read a table value, await the store, then write the value back."""
        self._pending: dict[bytes, tuple[int, int]] = {}
        """Table keys of values the store lacks -> (partition, due s); rebuilt from the table by a scan for the
        partitions this worker did not index yet (:meth:`_index`)."""
        self._indexed: set[int] = set()
        self._boundary: dict[int, int] = {}
        """Per partition, the flush boundary (s) whose open 1 h / 2 h buckets were written."""
        self._partial_through: dict[bytes, int] = {}
        """Open buckets written partial -> the newest minute the stored copy holds."""

    async def process(self, batch: Sequence[tuple[int, bytes]]) -> int:
        """Fold a batch of ``(partition, metrics-1m value)`` into the table's buckets and minute blocks;
        returns the buckets changed. Store reads (a bucket or block the table lacks) are retried while the
        store is unavailable; nothing is written to the store here (:meth:`flush` does)."""
        groups: dict[BucketId, tuple[int, list[Aggregate]]] = {}
        for partition, value in batch:
            try:
                minute = decode_minute(value)
            except ValueError as exc:
                self.counters.inc("rollup_minutes_invalid")
                log.warning("rollup: skipping a metrics-1m record on partition %d: %s", partition, exc)
                continue
            start_s = minute.key.start_ms // 1000
            for res in ROLLUP_RESOLUTIONS:
                bid = (minute.key.app, minute.key.process_type, res, bucket_of(start_s, res))
                groups.setdefault(bid, (partition, []))[1].append(minute)
        if not groups:
            return 0
        return await retry_retriable(lambda: self._apply(groups), policy=self.policy, sleep=self.sleep,
                                     on_retry=self._retrying)

    def _retrying(self, exc: RetriableError, retry: int, delay_s: float) -> None:
        self.counters.inc("rollup_retries")
        log.warning("rollup: store unavailable (%s); retry %d in %.2f s", exc, retry, delay_s)

    def _keep(self, key: bytes, partition: int, value: bytes, due_s: int | None) -> None:
        with partition_context(self.context_topic, partition):
            self.table[key] = value
        if due_s is None:
            self._pending.pop(key, None)
        else:
            self._pending[key] = (partition, due_s)

    async def _apply(self, groups: dict[BucketId, tuple[int, list[Aggregate]]]) -> int:
        async with self._lock:
            buckets = await self._load(groups)
            changed: list[tuple[BucketId, Bucket]] = []
            merged = replayed = 0
            new_minutes: set[tuple[int, str, int]] = set()
            for bid, (partition, minutes) in groups.items():
                bucket = buckets[bid]
                dirty = False
                for m in minutes:
                    start_s = m.key.start_ms // 1000
                    if start_s in bucket.mins:
                        replayed += 1
                        continue
                    bucket.agg.merge(m)
                    bucket.mins.add(start_s)
                    merged += 1
                    dirty = True
                    new_minutes.add((partition, m.key.app, m.key.start_ms + WINDOW_S * 1000))
                if dirty:
                    bucket.due_s = bucket.end_s
                    changed.append((bid, bucket))
            blocks, blocks_changed, new_since = await self._summarize(groups, buckets)
            for bid, b in changed:
                self._keep(table_key(bid), b.partition, b.encode(), b.due_s)
            for k in blocks_changed:
                self._keep(block_key(k), blocks[k].partition, blocks[k].encode(), blocks[k].due_s)
            self._catalog(groups)
            for (app, proc), (partition, since_s) in new_since.items():
                # Evicted a retention after it starts: a later batch takes it back from a stored block.
                value = {"p": partition, "end_s": since_s + self.storage.ttl_s, "since": since_s}
                with partition_context(self.context_topic, partition):
                    self.table[since_key(app, proc)] = zlib.compress(orjson.dumps(value), 1)
            if self.watermarks is not None:
                late = sum(self.watermarks.late(p, app, end_ms) for p, app, end_ms in new_minutes)
                self.counters.inc("minutes_stored_late", late)
            self.counters.inc("rollup_minutes_merged", merged)
            self.counters.inc("rollup_minutes_replayed", replayed)
            return len(changed)

    def _catalog(self, groups: dict[BucketId, tuple[int, list[Aggregate]]]) -> None:
        """Mark the days whose process-type catalog (app/storage/catalog.py) lacks a process type of these
        minutes: written with the flush that writes the minutes' blocks (due at the first new minute's end)."""
        seen: dict[tuple[str, int], tuple[int, set[str], int]] = {}
        for (app, proc, res, _), (partition, minutes) in groups.items():
            if res != HOUR_S:
                continue
            for m in minutes:
                start_s = m.key.start_ms // 1000
                _, procs, due_s = seen.get((app, catalog.day_of(start_s)), (partition, set(), start_s + WINDOW_S))
                seen[(app, catalog.day_of(start_s))] = (partition, procs | {proc}, min(due_s, start_s + WINDOW_S))
        for (app, day), (partition, procs, due_s) in seen.items():
            key = catalog_key(app, day)
            with partition_context(self.context_topic, partition):
                raw = self.table.get(key)
            known: set[str] = set()
            if raw is not None:
                blob, pending_due = unpack(raw)
                known = set(orjson.loads(zlib.decompress(blob))["procs"])
                if procs <= known:
                    continue
                due_s = due_s if pending_due is None else min(due_s, pending_due)
            value = {"p": partition, "end_s": day + catalog.DAY_S, "procs": sorted(known | procs)}
            self._keep(key, partition, pack(zlib.compress(orjson.dumps(value), 1), due_s), due_s)

    async def flush(self, through_ms: dict[int, int]) -> dict[int, int]:
        """Store what is final: for each owned partition and how far its minutes are merged (``through_ms``:
        every minute ending at or before it is in the table), write the pending buckets that ended by the
        flush boundary (``through_ms`` floored to ``METRICS_ROLLUP_FLUSH_S``) and the blocks they and the
        boundary's minutes changed, and, once per boundary, the open 1 h and 2 h buckets as partial items
        (they stay pending). Returns, per partition, the stored-through watermark that may be
        published: ``through_ms`` itself when nothing ending by it is still pending, else the boundary.
        Raises RetriableError when the store is unavailable (the publisher retries next round)."""
        flush_s = int(self.query.rollup_flush_s)
        horizon = {p: ms // 1000 // flush_s * flush_s for p, ms in through_ms.items()}
        async with self._lock:
            self._index(set(through_ms))
            due = [k for k, (p, due_s) in self._pending.items() if p in horizon and due_s <= horizon[p]]
            # At each boundary, the open 1 h and 2 h buckets too (partial, listing their minutes): a chart's
            # live edge then merges one item and the minutes after it (measured: an open 2 h bucket merged
            # from its 10 min items and minutes made the first look at 7 d 4x slower).
            moved = {p for p, h in horizon.items() if self._boundary.get(p) != h}
            partial = [k for k, (p, due_s) in self._pending.items() if p in moved and due_s > horizon[p]
                       and k.startswith(b"r|") and bucket_id(k)[2] >= HOUR_S]
            if due or partial:
                await self._write(due, partial)
            self._boundary.update((p, horizon[p]) for p in moved)
            behind = {p for p, due_s in self._pending.values() if p in through_ms and due_s <= through_ms[p] // 1000}
        return {p: horizon[p] * 1000 if p in behind else ms for p, ms in through_ms.items()}

    def _index(self, owned: set[int]) -> None:
        """Know the pending values of every owned partition: a table scan for partitions newly owned (their
        values came with the changelog, from this worker's or a previous owner's merges)."""
        self._pending = {k: v for k, v in self._pending.items() if v[0] in owned}
        self._indexed &= owned
        new = owned - self._indexed
        if not new:
            return
        for key, raw in list(self.table.items()):
            if raw is None or raw[0] != PENDING or key in self._pending:
                continue
            blob, due_s = unpack(raw)
            partition = int(orjson.loads(zlib.decompress(blob))["p"])
            if partition in new and due_s is not None:
                self._pending[key] = (partition, due_s)
        self._indexed |= new

    async def _write(self, due: list[bytes], partial: Sequence[bytes] = ()) -> None:
        """Store the ``due`` buckets and blocks, then mark them stored; and the ``partial`` (open) buckets,
        which stay pending, unless the store has them as they are."""
        opened: dict[bytes, Bucket] = {}
        for key in partial:
            with partition_context(self.context_topic, self._pending[key][0]):
                raw = self.table.get(key)
            if raw is not None:
                b = Bucket.decode(raw)
                if b.mins and self._partial_through.get(key) != max(b.mins):
                    opened[key] = b
        catalogs = [k for k in due if k.startswith(b"c|")]
        due = [k for k in due if not k.startswith(b"c|")]
        buckets: dict[BucketId, Bucket] = {}
        wanted: dict[BucketId, int] = {}
        for key in due:
            with partition_context(self.context_topic, self._pending[key][0]):
                raw = self.table.get(key)
            if raw is None:
                self._pending.pop(key, None)
                continue
            bid = bucket_id(key)
            if key.startswith(b"r|"):
                buckets[bid] = b = Bucket.decode(raw)
                wanted.setdefault((bid[0], bid[1], bid[2], block_of(bid[3], bid[2])), b.partition)
            else:
                wanted[bid] = self._pending[key][0]
        blocks = await self._load_blocks(wanted)
        for (app, proc, res, ts), b in buckets.items():
            blk = blocks[(app, proc, res, block_of(ts, res))]
            if blk.block.put(ts, point_json(b.agg), through_s=max(b.mins, default=ts)):
                blk.touch(b.end_s)
        for k, held in blocks.items():
            since = self._series_since(k[0], k[1], held.partition)
            if since is not None and held.block.since_s != since:
                held.block.since_s = since
                held.touch(k[3] + k[2])
        written_blocks = {k: b for k, b in blocks.items() if b.due_s is not None}
        items = [MetricItem(bid[0], bid[1], bid[2], bid[3], b.payload(self.storage.record_format))
                 for bid, b in buckets.items()]
        items += [b.item(k[0], k[1]) for k, b in written_blocks.items()]
        items += [MetricItem(*bucket_id(key), b.payload(self.storage.record_format)) for key, b in opened.items()]
        catalog_values = await self._load_catalogs(catalogs)
        items += [catalog.catalog_item(app, day, v["procs"]) for (app, day), (_, v) in catalog_values.items()]
        refused = set(await self._put(items))
        written = [i for i in items if i not in refused]
        self.counters.inc("rollup_items_written", sum(1 for i in written if i.kind == DIGEST))
        self.counters.inc("rollup_blocks_written", sum(1 for i in written if i.kind == SUMMARY))
        # An item refused for good is logged and counted (rollup_failed), and no longer pending: retrying it
        # every round would hold back the watermark of every app of its partition.
        for bid, b in buckets.items():
            b.due_s = None
            self._keep(table_key(bid), b.partition, b.encode(), None)
            self._partial_through.pop(table_key(bid), None)
        for k, held in written_blocks.items():
            held.due_s = None
            self._keep(block_key(k), held.partition, held.encode(), None)
        self._partial_through.update((key, max(b.mins)) for key, b in opened.items())
        for (app, day), (partition, v) in catalog_values.items():
            self._keep(catalog_key(app, day), partition, zlib.compress(orjson.dumps(v), 1), None)

    async def _load_catalogs(self, keys: Sequence[bytes]) -> dict[tuple[str, int], tuple[int, dict[str, Any]]]:
        """The pending catalog values, each with the process types the store already lists for its day (the
        table may have been rebuilt since, or evicted the day): a write never drops one."""
        out: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def load(key: bytes) -> None:
            partition = self._pending[key][0]
            with partition_context(self.context_topic, partition):
                raw = self.table.get(key)
            if raw is None:
                self._pending.pop(key, None)
                return
            _, app, day = key.decode().split("|")
            v = orjson.loads(zlib.decompress(unpack(raw)[0]))
            async with gate:
                stored = await catalog.process_types(self.store, app, int(day), int(day) + 1)
            self.counters.inc("rollup_store_reads")
            v["procs"] = sorted(set(v["procs"]) | stored)
            out[(app, int(day))] = (partition, v)

        await asyncio.gather(*(load(k) for k in keys))
        return out

    def _series_since(self, app: str, proc: str, partition: int) -> int | None:
        with partition_context(self.context_topic, partition):
            raw = self.table.get(since_key(app, proc))
        return None if raw is None else int(orjson.loads(zlib.decompress(raw))["since"])

    async def _put(self, items: list[MetricItem]) -> list[MetricItem]:
        """Write the items; returns those the store refused for good (permissions, schema, an item over the
        size limit: not retried). One bad item must not cost the batch's others, so a refused batch is written
        again item by item."""
        try:
            await self.store.put_many(items)
            return []
        except StoreError as exc:
            if len(items) == 1:
                self.counters.inc("rollup_failed")
                log.error("rollup: the store refused %s/%s res %d at %d (%s) for good: %s", items[0].app,
                          items[0].process_type, items[0].resolution_s, items[0].ts_s, items[0].kind, exc)
                return list(items)
        refused: list[MetricItem] = []
        streak = 0
        for i, item in enumerate(items):
            if streak >= ISOLATE_STREAK:  # the cause is not one item (permissions, schema): stop trying
                self.counters.inc("rollup_failed", len(items) - i)
                return refused + list(items[i:])
            bad = await self._put([item])
            refused += bad
            streak = streak + 1 if bad else 0
        return refused

    async def _summarize(self, groups: dict[BucketId, tuple[int, list[Aggregate]]], buckets: dict[BucketId, Bucket],
                         ) -> tuple[dict[BucketId, Block], set[BucketId], dict[tuple[str, str], tuple[int, int]]]:
        """Render the batch's minutes into their minute blocks (coarser points are rendered when their bucket
        is final: :meth:`_write`); returns the blocks, the ids of those that changed, and the series whose
        ``since`` the table must learn."""
        wanted: dict[BucketId, int] = {}
        for (app, proc, res, ts), (partition, _minutes) in groups.items():
            if res == HOUR_S:
                wanted.setdefault((app, proc, WINDOW_S, ts), partition)  # the hour's minute block
        blocks = await self._load_blocks(wanted)
        dirty: set[BucketId] = set()
        since, new_since = self._since(groups, blocks)
        for (app, proc, res, ts), (_, minutes) in groups.items():
            if res != HOUR_S:
                continue
            mblock = (app, proc, WINDOW_S, ts)
            held = blocks[mblock]
            for m in minutes:  # replays too: a re-emitted minute's point replaces the old one
                start_s = m.key.start_ms // 1000
                if held.block.put(start_s, point_json(m)):
                    held.touch(start_s + WINDOW_S)
                    dirty.add(mblock)
        # A minute block must hold every minute its hour bucket holds. After an upgrade (a block seeded from
        # stored minutes) one the sink had not written yet may be missing: read back until it is there.
        lacking = [k for k in blocks if self._lacks(k, blocks[k], buckets)]
        if lacking:
            sizes = {k: len(blocks[k].block.points) for k in lacking}
            await asyncio.gather(*(self._fill_minutes(blocks[k].block, k) for k in lacking))
            for k in lacking:
                if len(blocks[k].block.points) != sizes[k]:
                    blocks[k].touch(k[3] + WINDOW_S)
                    dirty.add(k)
        for k, held in blocks.items():
            partial = self._lacks(k, held, buckets)
            if partial != held.block.partial:
                held.block.partial = partial
                held.touch(k[3] + WINDOW_S)
                dirty.add(k)
            if held.block.since_s != since[k[:2]]:
                held.block.since_s = since[k[:2]]
                held.touch(k[3] + WINDOW_S)
                dirty.add(k)
        return blocks, dirty, new_since

    def _since(self, groups: dict[BucketId, tuple[int, list[Aggregate]]], blocks: dict[BucketId, Block],
               ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], tuple[int, int]]]:
        """Since when this job has put every minute of each series into its blocks (a block's ``since_s``):
        kept in the table per series; else taken from a stored block (the table was rebuilt); else this
        batch's first minute, whose blocks were just seeded from the digests. Returns it for every series,
        and (partition, since) for those the table does not hold yet."""
        first: dict[tuple[str, str], tuple[int, int]] = {}
        for (app, proc, res, _), (partition, minutes) in groups.items():
            if res == HOUR_S:
                start = min(m.key.start_ms // 1000 for m in minutes)
                if (app, proc) not in first or start < first[(app, proc)][1]:
                    first[(app, proc)] = (partition, start)
        since: dict[tuple[str, str], int] = {}
        new: dict[tuple[str, str], tuple[int, int]] = {}
        for series, (partition, start) in first.items():
            known_since = self._series_since(*series, partition)
            if known_since is not None:
                since[series] = known_since
                continue
            known = [b.block.since_s for k, b in blocks.items() if k[:2] == series and b.block.since_s is not None]
            since[series] = min(known) if known else start
            new[series] = (partition, since[series])
        return since, new

    @staticmethod
    def _lacks(k: BucketId, block: Block, buckets: dict[BucketId, Bucket]) -> bool:
        return not buckets[(k[0], k[1], HOUR_S, k[3])].mins <= block.block.points.keys()

    async def _fill_minutes(self, block: SummaryBlock, k: BucketId) -> None:
        """Put the stored minutes of a minute block's hour that it lacks."""
        items = await self.store.query(k[0], k[1], WINDOW_S, k[3], k[3] + HOUR_S)
        self.counters.inc("rollup_store_reads")
        for it in items:
            if it.ts_s not in block.points:
                try:
                    block.put(it.ts_s, point_json(records.decode(it.payload)[0]))
                except ValueError as exc:
                    log.warning("rollup: stored minute %s/%s at %d is unreadable: %s", k[0], k[1], it.ts_s, exc)

    async def _load_blocks(self, wanted: dict[BucketId, int]) -> dict[BucketId, Block]:
        """Summary blocks from the table, else the store, else new (seeded from the span's rollup items)."""
        out: dict[BucketId, Block] = {}
        missing: list[tuple[BucketId, int]] = []
        for k, partition in wanted.items():
            with partition_context(self.context_topic, partition):
                raw = self.table.get(block_key(k))
            if raw is not None:
                out[k] = Block.decode(raw)
            else:
                missing.append((k, partition))
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def read_back(k: BucketId, partition: int) -> None:
            app, proc, res, start = k
            async with gate:
                items = await self.store.query(app, proc, res, start, start + 1, SUMMARY)
                self.counters.inc("rollup_store_reads")
                if items:
                    try:
                        out[k] = Block(SummaryBlock.decode(items[0].payload), partition)
                        return
                    except ValueError as exc:
                        log.warning("rollup: summary block %s is unreadable (%s); rebuilding it", k, exc)
                block = SummaryBlock(res, start)
                if res != WINDOW_S:  # minute blocks are checked against their hour bucket instead
                    span = await self.store.query(app, proc, res, start, start + block.span_s, DIGEST)
                    self.counters.inc("rollup_store_reads")
                    for it in span:
                        agg, mins = records.decode(it.payload)
                        block.put(it.ts_s, point_json(agg), through_s=max(mins or [it.ts_s]))
                # A block the store lacks is written with its bucket's next flush.
                out[k] = Block(block, partition, start + res)

        await asyncio.gather(*(read_back(*m) for m in missing))
        return out

    async def _load(self, groups: dict[BucketId, tuple[int, list[Aggregate]]]) -> dict[BucketId, Bucket]:
        out: dict[BucketId, Bucket] = {}
        missing: list[tuple[BucketId, int, Aggregate]] = []
        for bid, (partition, minutes) in groups.items():
            with partition_context(self.context_topic, partition):
                raw = self.table.get(table_key(bid))
            if raw is not None:
                out[bid] = Bucket.decode(raw)
            else:
                missing.append((bid, partition, minutes[0]))
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def read_back(bid: BucketId, partition: int, first: Aggregate) -> None:
            async with gate:
                items = await self.store.query(bid[0], bid[1], bid[2], bid[3], bid[3] + 1)
            self.counters.inc("rollup_store_reads")
            if items:
                agg, mins = records.decode(items[0].payload)
                out[bid] = Bucket(agg, set(mins or ()), partition)
            else:
                out[bid] = Bucket(Aggregate(BucketKey(bid[0], bid[1], bid[3] * 1000), resolution_s=bid[2],
                                            max_centroids=first.max_centroids), set(), partition)

        await asyncio.gather(*(read_back(*m) for m in missing))
        return out

    def evict(self, owned: set[int]) -> int:
        """Delete stored buckets of owned partitions that ended more than ``rollup_evict_after_s`` ago (a
        pending one stays until it is stored)."""
        cutoff_s = self.clock.now_ms() // 1000 - int(self.query.rollup_evict_after_s)
        doomed: list[tuple[bytes, int]] = []
        for key, raw in list(self.table.items()):
            if raw is None or raw[0] == PENDING:
                continue
            rec = orjson.loads(zlib.decompress(raw))
            if int(rec["p"]) in owned and int(rec["end_s"]) <= cutoff_s:
                doomed.append((key, int(rec["p"])))
        for key, p in doomed:
            with partition_context(self.context_topic, p):
                if key in self.table:
                    del self.table[key]
        return len(doomed)


def bind(wiring: Wiring, settings: Settings, store: MetricsStore, counters: Counters,
         ready: asyncio.Event, watermarks: Watermarks | None = None) -> Rollup:
    from agents.alerts import owned_partitions

    faust_app, metrics_topic, rollups_table = wiring.app, wiring.metrics_topic, wiring.rollups_table

    rollup = Rollup(rollups_table, store, settings.storage, settings.query, counters,
                    context_topic=settings.kafka.metrics_topic, watermarks=watermarks)

    @faust_app.agent(metrics_topic, name="rollup")
    async def rollup_agent(stream: Any) -> None:
        async for events in stream.take_events(settings.query.rollup_batch_max, within=settings.query.rollup_within_s):
            await ready.wait()  # the store is started, and written in the migration's phase (app/writer.py)
            await rollup.process([(e.message.partition, e.value) for e in events if e.value is not None])

    @faust_app.timer(60.0, name="rollup_evict")
    async def evict() -> None:
        owned = owned_partitions(faust_app, settings.kafka.metrics_topic)
        if owned is not None:
            n = rollup.evict(owned)
            if n:
                log.info("rollup: evicted %d finished buckets from the table", n)

    return rollup
