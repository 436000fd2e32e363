"""Stream job: publish each ``metrics-1m`` partition's stored-through watermark, so queries know what is final.

The watermark moves to a checkpoint ``(closed_through, end offset)`` only once Faust committed that offset,
i.e. once every agent reading ``metrics-1m`` has stored the minutes before it.
Reference: docs/design/final.md#how-the-watermark-is-made
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from app.clock import Clock, SystemClock
from app.errors import PipelineError
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import MetricsStore, Progress

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

MAX_CHANGED_APPS = 1000
"""Late-minute notices kept per partition item (the oldest go first); beyond it a query process may serve
an older answer for an app until its cache entry's max age."""


class Watermarks:
    """Per partition: checkpoints of the aggregator, the stored-through watermark, late-minute notices."""

    def __init__(self, *, clock: Clock | None = None, changed_keep_ms: int = 600_000, gated: bool = False) -> None:
        """``gated``: the watermark moves only by :meth:`advance` (the publisher, once the rollup job stored
        what the committed minutes made final); otherwise with the committed offsets."""
        self.clock = clock or SystemClock()
        self.changed_keep_ms = changed_keep_ms
        self.gated = gated
        self._checkpoints: dict[int, deque[tuple[int, int]]] = {}
        self.committed_ms: dict[int, int] = {}
        """Per partition: every minute ending at or before it was processed by every agent (the sink stored
        it, the rollup job merged it into its table)."""
        self.through_ms: dict[int, int] = {}
        self.changed: dict[int, dict[str, int]] = {}
        self._dirty: set[int] = set()
        self.last_checkpoint: dict[int, tuple[int, int]] = {}
        """The newest checkpoint per partition: what a second store's writer needs (app/writer.py)."""

    def checkpoint(self, partition: int, closed_through_ms: int, end_offset: int) -> None:
        """Minutes ending at or before ``closed_through_ms`` are all at offsets below ``end_offset``.

        The time may go backwards: a backlog of old data (a replay) opens windows behind the watermark,
        and then those minutes are not stored any more than the ones after them."""
        self.last_checkpoint[partition] = (closed_through_ms, end_offset)
        q = self._checkpoints.setdefault(partition, deque())
        if q and q[-1][1] == end_offset:  # nothing emitted since: the newer reading replaces it
            q[-1] = (closed_through_ms, end_offset)
        else:
            q.append((closed_through_ms, end_offset))

    def committed(self, partition: int, committed_offset: int) -> None:
        """Every record of ``metrics-1m`` below ``committed_offset`` is processed by every agent."""
        q = self._checkpoints.get(partition)
        latest = None
        while q and q[0][1] <= committed_offset:
            latest = q.popleft()[0]
        if latest is not None:
            self.committed_ms[partition] = latest
            if not self.gated:
                self.advance(partition, latest)

    def advance(self, partition: int, through_ms: int) -> None:
        """Everything ending at or before ``through_ms`` is stored: move the published watermark there."""
        if through_ms != self.through_ms.get(partition):
            self.through_ms[partition] = through_ms
            self._dirty.add(partition)

    def adopt(self, partition: int, published: Progress) -> None:
        """Start from what a previous owner published, until this worker's own checkpoints say more."""
        if partition not in self.through_ms:
            self.through_ms[partition] = published.stored_through_ms
        mine = self.changed.setdefault(partition, {})
        for app, ms in published.changed.items():
            mine[app] = max(ms, mine.get(app, 0))

    def late(self, partition: int, app: str, minute_end_ms: int) -> bool:
        """A minute stored now: when the watermark had already passed its end, note the app (True)."""
        if minute_end_ms > self.through_ms.get(partition, -1):
            return False
        self.changed.setdefault(partition, {})[app] = self.clock.now_ms()
        self._dirty.add(partition)
        return True

    def mark_dirty(self, partitions: set[int]) -> None:
        """Publish these again next round (the last write failed)."""
        self._dirty |= partitions & self.through_ms.keys()

    def known(self) -> set[int]:
        """Partitions with a watermark or pending checkpoints."""
        return set(self.through_ms) | set(self._checkpoints) | set(self.committed_ms)

    def revoke(self, partition: int) -> None:
        self.last_checkpoint.pop(partition, None)
        self._checkpoints.pop(partition, None)
        self.committed_ms.pop(partition, None)
        self.through_ms.pop(partition, None)
        self.changed.pop(partition, None)
        self._dirty.discard(partition)

    def take(self, partitions: set[int], *, force: bool = False) -> list[Progress]:
        """Progress to publish for these partitions: the changed ones, or all known ones with ``force``."""
        now_ms = self.clock.now_ms()
        out = []
        for p in sorted(partitions):
            if p not in self.through_ms or not (force or p in self._dirty):
                continue
            changed = {a: ms for a, ms in self.changed.get(p, {}).items() if now_ms - ms < self.changed_keep_ms}
            if len(changed) > MAX_CHANGED_APPS:
                changed = dict(sorted(changed.items(), key=lambda kv: kv[1])[-MAX_CHANGED_APPS:])
            self.changed[p] = changed
            out.append(Progress(p, self.through_ms[p], now_ms, dict(changed)))
        self._dirty -= partitions
        return out


Flush = Callable[[dict[int, int]], Awaitable[dict[int, int]]]
"""partition -> committed through (ms) in; partition -> stored through (ms) out (agents/rollup.py ``flush``)."""


class Publisher:
    """Moves watermarks with the committed offsets and writes them to the store.

    ``flush``: with a gated :class:`Watermarks`, called each round with the committed times; it stores what
    they made final (rollup items, summary blocks) and says how far each partition is stored."""

    def __init__(self, watermarks: Watermarks, store: MetricsStore, counters: Counters, *,
                 committed: Callable[[int], int | None], clock: Clock | None = None,
                 flush: Flush | None = None) -> None:
        self.flush = flush
        self.watermarks = watermarks
        self.store = store
        self.counters = counters
        self.committed = committed
        self.clock = clock or SystemClock()
        self._adopted: set[int] = set()
        self._last_full_ms = 0

    async def publish(self, owned: set[int]) -> int:
        """One round; returns the partitions written. Store errors are logged and retried next round."""
        wm = self.watermarks
        for p in wm.known() - owned:
            wm.revoke(p)
        self._adopted &= owned
        try:
            if owned - self._adopted:
                published = {pr.partition: pr for pr in await self.store.progress()}
                for p in owned - self._adopted:
                    if p in published:
                        wm.adopt(p, published[p])
                self._adopted |= owned
            for p in owned:
                offset = self.committed(p)
                if offset is not None:
                    wm.committed(p, offset)
            if self.flush is not None:
                stored = await self.flush({p: wm.committed_ms[p] for p in owned if p in wm.committed_ms})
                for p, through_ms in stored.items():
                    wm.advance(p, through_ms)
            now_ms = self.clock.now_ms()
            # Rewritten at least every 30 s even when nothing moved, so its age shows a stuck pipeline only.
            force = now_ms - self._last_full_ms >= 30_000
            progress = wm.take(owned, force=force)
            if progress:
                await self.store.put_progress(progress)
            if force:
                self._last_full_ms = now_ms
        except PipelineError as exc:
            log.warning("progress: could not publish the stored-through watermarks (%s); retrying", exc)
            wm.mark_dirty(owned)
            return 0
        lag = [now_ms - wm.through_ms[p] for p in owned if p in wm.through_ms]
        if lag:
            self.counters.set("stored_through_lag_seconds", max(lag) // 1000)
        return len(progress)


def bind(wiring: Wiring, settings: Settings, store: MetricsStore, counters: Counters, ready: asyncio.Event,
         watermarks: Watermarks, flush: Flush | None = None) -> Publisher:
    from agents.alerts import owned_partitions
    from app.faust_patches import committed_offset

    faust_app = wiring.app

    def committed(partition: int) -> int | None:
        return committed_offset(faust_app, settings.kafka.metrics_topic, partition)

    publisher = Publisher(watermarks, store, counters, committed=committed, flush=flush)

    @faust_app.timer(settings.query.progress_interval_s, name="publish_progress")
    async def publish() -> None:
        if not ready.is_set():
            return
        owned = owned_partitions(faust_app, settings.kafka.metrics_topic)
        if owned is not None:
            await publisher.publish(owned)

    return publisher


def bind_checkpoint_sender(wiring: Wiring, settings: Settings, watermarks: Watermarks,
                           wanted: Callable[[], bool]) -> None:
    """The aggregating worker's half of a second store's watermark: while ``wanted`` (a migration writes a
    store this worker does not), send each owned partition's newest checkpoint to the compacted
    ``checkpoints_topic``, into the same partition number, about once a second when it changed."""
    from agents.alerts import owned_partitions

    faust_app, checkpoints_topic = wiring.app, wiring.checkpoints_topic
    sent: dict[int, tuple[int, int]] = {}

    @faust_app.timer(settings.query.progress_interval_s, name="send_checkpoints")
    async def send() -> None:
        if not wanted():
            sent.clear()
            return
        owned = owned_partitions(faust_app, settings.kafka.metrics_topic)
        for p in sorted(owned or ()):
            cp = watermarks.last_checkpoint.get(p)
            if cp is not None and sent.get(p) != cp:
                await checkpoints_topic.send(key=str(p).encode(), value=orjson.dumps(cp), partition=p)
                sent[p] = cp


def bind_checkpoint_reader(wiring: Wiring, watermarks: Watermarks) -> None:
    """A store writer's half (app/writer.py): the aggregating workers' checkpoints, partition by partition
    (co-partitioned with ``metrics-1m``, so a writer reads those of the partitions it stores)."""
    @wiring.app.agent(wiring.checkpoints_topic, name="checkpoints")
    async def read(stream: Any) -> None:
        async for event in stream.events():
            try:
                closed_through_ms, end_offset = orjson.loads(event.value)
                watermarks.checkpoint(event.message.partition, int(closed_through_ms), int(end_offset))
            except (ValueError, TypeError) as exc:
                log.error("skipping an unreadable checkpoint record (%s): %r", exc, event.value)
