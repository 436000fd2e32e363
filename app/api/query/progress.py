"""When cached answers may be trusted: the stored-through watermarks agents/progress.py publishes per
metrics-1m partition, the late-minute notices that come with them, and an epoch per partition."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.errors import PipelineError
from app.ops.stats import CounterName, Counters
from app.settings import QuerySettings
from app.storage.protocol import MetricsStore

log = logging.getLogger(__name__)

PartitionOf = Callable[[str], int]
"""app -> the metrics-1m partition its minutes are produced to (the producer's partitioner), whose watermark
says how far the app is stored."""

Forget = Callable[[Callable[[str], bool]], int]
"""Drop every cached entry of the apps the predicate matches; returns how many."""


class ProgressWatch:
    """The stored-through watermark per partition, as last read, re-read every ``progress_interval_s``.

    A late minute of an app, or a partition's watermark moving back (a backlog of old data), calls ``forget``
    for the apps concerned and bumps their partition's epoch: a computation that started before reads the
    epoch again before caching, and does not cache what it read."""

    def __init__(self, store: MetricsStore, partition_of: PartitionOf, forget: Forget, *, query: QuerySettings,
                 partitions: int, counters: Counters | None = None) -> None:
        """``partitions``: of metrics-1m (METRICS_PARTITIONS), to notice watermarks of partitions beyond it."""
        self.store = store
        self.partition_of = partition_of
        self.forget = forget
        self.query = query
        self.partitions = partitions
        self.counters = counters
        self._through_ms: dict[int, int] = {}
        """Stored-through watermark per metrics-1m partition, as last read (agents/progress.py)."""
        self._read_ms = -1
        self._reading: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._warned_partitions = False
        self._seen_changes: dict[str, int] = {}
        """app -> the newest late-minute notice already applied to the caches"""
        self._epochs: dict[int, int] = {}
        """partition -> bumped when cached answers of its apps are dropped"""

    def _count(self, name: CounterName, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

    async def poll(self, now_ms: int) -> None:
        """Called by every request: the first one waits for the watermarks, later ones start a refresh once
        the interval has passed and go on with the last watermarks (at most one interval old); answers
        computed meanwhile are not cached past a change the refresh finds."""
        if now_ms - self._read_ms >= self.query.progress_interval_s * 1000:
            if self._read_ms < 0:
                await self.read(now_ms)  # nothing known yet: wait for the first read
            elif self._reading is None:
                reading = asyncio.ensure_future(self.read(now_ms))
                self._tasks.add(reading)
                reading.add_done_callback(self._tasks.discard)

    async def read(self, now_ms: int) -> None:
        """Refresh the stored-through watermarks (one small store read, shared by concurrent requests) and
        drop the cached answers of apps that got a late minute, or whose partition's watermark moved back.
        A failed read keeps the last watermarks until the next interval."""
        if self._reading is not None:
            await asyncio.shield(self._reading)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reading = fut
        try:
            progress = await self.store.progress()
            self._read_ms = now_ms
            beyond = [pr.partition for pr in progress if pr.partition >= self.partitions]
            if beyond and not self._warned_partitions:
                self._warned_partitions = True
                log.error("the workers publish watermarks of partitions %s, beyond METRICS_PARTITIONS=%d: set "
                          "METRICS_PARTITIONS on this process to the topics' partition count, or apps are "
                          "mapped to the wrong partition's watermark", beyond, self.partitions)
            for pr in progress:
                if pr.stored_through_ms < self._through_ms.get(pr.partition, -1):
                    self.invalidate_partition(pr.partition)  # moved back: a backlog of old data
                self._through_ms[pr.partition] = pr.stored_through_ms
                for app, changed_ms in pr.changed.items():
                    if changed_ms > self._seen_changes.get(app, -1):
                        self._seen_changes[app] = changed_ms
                        self.invalidate(app)
            keep_ms = int(self.query.cache_max_age_s * 1000)
            self._seen_changes = {a: ms for a, ms in self._seen_changes.items() if now_ms - ms < 2 * keep_ms}
            if self.counters is not None and progress:
                self.counters.set("query_watermark_lag_seconds",
                                  max(0, now_ms - min(pr.stored_through_ms for pr in progress)) // 1000)
        except PipelineError as exc:
            self._read_ms = now_ms  # retried next interval; meanwhile the old watermarks hold
            log.warning("could not read the stored-through watermarks (%s); keeping the last ones", exc)
        finally:
            self._reading = None
            fut.set_result(None)

    def epoch(self, app: str) -> int:
        """Compared before and after a read: a change means the read may predate an invalidation."""
        return self._epochs.get(self.partition_of(app), 0)

    def invalidate(self, app: str) -> None:
        """A late minute of ``app`` was stored: nothing cached for it may be served again."""
        p = self.partition_of(app)
        self._epochs[p] = self._epochs.get(p, 0) + 1
        self._count("query_cache_invalidations", self.forget(lambda a: a == app))

    def invalidate_partition(self, partition: int) -> None:
        """A partition's watermark moved back (a backlog of old data): its apps' final answers may be stale."""
        self._epochs[partition] = self._epochs.get(partition, 0) + 1
        self._count("query_cache_invalidations", self.forget(lambda a: self.partition_of(a) == partition))

    def stored_through_s(self, app: str) -> int:
        """The stored-through watermark of ``app``'s partition in seconds; -1 before one is known."""
        ms = self._through_ms.get(self.partition_of(app), -1)
        return ms // 1000 if ms >= 0 else -1
