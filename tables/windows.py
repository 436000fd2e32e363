"""Tumbling one-minute event-time windows of one input partition, with a lifecycle we own.

Faust's windowed tables close windows on a wall-clock sweep, lose expiry bookkeeping on restart and can
drop late keys silently (../shared/notes/pitfalls.md). Here instead:

* **Closing** a window ``[start, end)`` of app A happens when the first of these holds:
  1. A's event-time watermark (max ``ts`` seen for A) >= end + grace;
  2. the partition's watermark >= end + grace + idle timeout (A went quiet, others moved on);
  3. the partition received nothing for ``idle_timeout_ms`` of wall time and the wall clock is past
     end + grace (an idle partition's minute still closes). During a backlog replay the partition is
     busy, so wall time never closes windows ahead of their data.
  All three are monotonic in ``end``, so an app's windows close in order and ``closed_ms`` (the end of
  its last closed window) is the lateness boundary: an event with ``ts < closed_ms`` is late.
* **Idempotence** (at-least-once input): every window remembers the highest input offset folded into
  it, every app the highest offset applied for it, and the partition the highest offset fully applied.
  A replayed message is skipped at the first level that has seen it, so a crash between table writes
  never double counts (writes of one partition go to one changelog partition, in order).
* **Emission** exactly once per (app, process type, minute): a closed window is sent and acknowledged,
  then ``closed_ms`` is persisted, then the window is deleted. A crash between the send and the delete
  re-sends an identical record with the same key (consumers overwrite); it never re-opens the minute.

This module is pure: the caller (agents/aggregate.py) moves records to and from the Faust table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app import models
from app.clock import Clock
from tables.aggregate import Aggregate, BucketKey
from tables.digest import DEFAULT_MAX_CENTROIDS

WINDOW_MS = 60_000


@dataclass(slots=True)
class AppProgress:
    """Per app and partition: idempotence offset, event-time watermark and lateness boundary."""

    offset: int = -1
    wm_ms: int = -1
    closed_ms: int = -1

    def to_record(self) -> list[int]:
        return [self.offset, self.wm_ms, self.closed_ms]

    @classmethod
    def from_record(cls, rec: list[int]) -> "AppProgress":
        return cls(int(rec[0]), int(rec[1]), int(rec[2]))


@dataclass(slots=True)
class Counts:
    accepted: int = 0
    late: int = 0
    rejected: int = 0
    skipped_replay: int = 0


@dataclass(slots=True)
class Rejected:
    """A dead-letter entry: ``kind`` is "late" or "rejected"."""

    kind: str
    reason: str
    record: Any
    offset: int
    index: int
    app: str | None


@dataclass(slots=True)
class IngestResult:
    counts: Counts = field(default_factory=Counts)
    dead: list[Rejected] = field(default_factory=list)


class PartitionWindows:
    """Open windows, watermarks and progress of one input partition."""

    def __init__(self, partition: int, *, clock: Clock, grace_ms: int, idle_timeout_ms: int,
                 max_future_ms: int, max_message_bytes: int,
                 max_centroids: int = DEFAULT_MAX_CENTROIDS, window_ms: int = WINDOW_MS) -> None:
        self.partition = partition
        self.clock = clock
        self.grace_ms = grace_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.max_future_ms = max_future_ms
        self.max_message_bytes = max_message_bytes
        self.max_centroids = max_centroids
        self.window_ms = window_ms
        self.windows: dict[BucketKey, Aggregate] = {}
        self.apps: dict[str, AppProgress] = {}
        self.offset = -1  # every message at or below this offset is fully applied
        self.wm_ms = -1
        self.last_input_wall_ms = clock.now_ms()
        self.dirty_windows: set[BucketKey] = set()
        self.dirty_apps: set[str] = set()

    # --- input -------------------------------------------------------------------------------------
    def ingest(self, offset: int, value: bytes | None, result: IngestResult) -> None:
        """Fold one input message in. Never raises on bad data: rejects are appended to ``result``."""
        now_ms = self.clock.now_ms()
        self.last_input_wall_ms = now_ms
        if offset <= self.offset:
            result.counts.skipped_replay += 1
            return
        data = models.decode(value, self.max_message_bytes)
        if isinstance(data, models.Reject):
            result.counts.rejected += 1
            result.dead.append(Rejected("rejected", data.reason, data.record, offset, -1, None))
            return
        future_ms = now_ms + self.max_future_ms
        window_ms = self.window_ms
        apps = self.apps
        windows = self.windows
        touched: set[BucketKey] = set()
        seen_apps: set[str] = set()
        counts = result.counts
        last_app: str | None = None
        prog = AppProgress()
        for i, o in enumerate(data):
            if type(o) is not dict:
                self._reject(result, "observation must be a JSON object", o, offset, i, None)
                continue
            app: Any = o.get("app")  # a validated str from here on (checked when it changes)
            if app != last_app:
                if not models.valid_app(app):
                    self._reject(result, "app must be 1..100 characters of [A-Za-z0-9._-]", o, offset, i, None)
                    continue
                got = apps.get(app)
                if got is None:
                    got = apps[app] = AppProgress()
                prog, last_app = got, app
                seen_apps.add(app)
            if offset <= prog.offset:
                counts.skipped_replay += 1
                continue
            proc = models.process_type(o.get("dyno"))
            if proc is None:
                self._reject(result, "dyno must look like web.1", o, offset, i, app)
                continue
            ts = o.get("ts")
            if type(ts) is not int or ts < 0:
                self._reject(result, "ts must be epoch milliseconds (integer)", o, offset, i, app)
                continue
            if ts > future_ms:
                self._reject(result, f"ts is more than {self.max_future_ms} ms ahead of the wall clock",
                             o, offset, i, app)
                continue
            kind = o.get("kind")
            if kind == "router":
                reason = models.check_router(o)
            elif kind == "runtime":
                reason = models.check_runtime(o)
            elif kind == "metric":
                reason = models.check_metric(o)
            else:
                reason = "kind must be router, runtime or metric"
            if reason is not None:
                self._reject(result, reason, o, offset, i, app)
                continue
            if ts < prog.closed_ms:
                counts.late += 1
                result.dead.append(Rejected(
                    "late", f"minute already closed: ts {ts} < {prog.closed_ms} (grace {self.grace_ms} ms)",
                    models.echo(o), offset, i, app))
                continue
            key = BucketKey(app, proc, ts - ts % window_ms)
            agg = windows.get(key)
            if agg is None:
                agg = windows[key] = Aggregate(key, max_centroids=self.max_centroids)
            elif offset <= agg.offset:
                counts.skipped_replay += 1
                continue
            if kind == "router":
                agg.add_request(o["status"], o["service_ms"], o.get("code"))
            elif kind == "runtime":
                agg.add_runtime(o.get("memory_rss_mb"), o.get("memory_swap_mb"), o.get("memory_total_mb"),
                                o.get("memory_quota_mb"), o.get("load_avg_1m"))
            else:
                agg.add_metric(o["name"], o["type"], o["value"], ts)
            touched.add(key)
            counts.accepted += 1
            if ts > prog.wm_ms:
                prog.wm_ms = ts
                if ts > self.wm_ms:
                    self.wm_ms = ts
        # Stamp offsets after the whole message: several observations of one message may share a window.
        for key in touched:
            windows[key].offset = offset
        for app in seen_apps:
            apps[app].offset = offset
        self.dirty_windows |= touched
        self.dirty_apps |= seen_apps
        self.offset = offset

    def _reject(self, result: IngestResult, reason: str, record: Any, offset: int, index: int,
                app: str | None) -> None:
        result.counts.rejected += 1
        result.dead.append(Rejected("rejected", reason, models.echo(record), offset, index, app))

    # --- closing -----------------------------------------------------------------------------------
    def due(self) -> list[Aggregate]:
        """Windows to close now, oldest first."""
        now_ms = self.clock.now_ms()
        idle = now_ms - self.last_input_wall_ms >= self.idle_timeout_ms
        grace_ms = self.grace_ms
        part_limit = self.wm_ms - grace_ms - self.idle_timeout_ms
        out = []
        for key, agg in self.windows.items():
            end_ms = key.start_ms + self.window_ms
            app_wm = self.apps[key.app].wm_ms if key.app in self.apps else -1
            if (app_wm >= end_ms + grace_ms or end_ms <= part_limit
                    or (idle and now_ms >= end_ms + grace_ms)):
                out.append(agg)
        out.sort(key=lambda a: a.key.start_ms)
        return out

    def mark_closed(self, closed: list[Aggregate]) -> None:
        """After the closed windows were emitted: advance lateness boundaries, forget the windows."""
        for agg in closed:
            end_ms = agg.key.start_ms + self.window_ms
            prog = self.apps.setdefault(agg.key.app, AppProgress())
            if end_ms > prog.closed_ms:
                prog.closed_ms = end_ms
                self.dirty_apps.add(agg.key.app)
            self.windows.pop(agg.key, None)
            self.dirty_windows.discard(agg.key)

    def flush_digests(self) -> None:
        for key in self.dirty_windows:
            self.windows[key].response.digest.flush()

    def take_dirty(self) -> tuple[list[Aggregate], list[tuple[str, AppProgress]]]:
        """Windows and app progress changed since the last call, to persist once per batch."""
        wins = [self.windows[k] for k in self.dirty_windows if k in self.windows]
        apps = [(a, self.apps[a]) for a in self.dirty_apps]
        self.dirty_windows = set()
        self.dirty_apps = set()
        return wins, apps

    # --- recovery ----------------------------------------------------------------------------------
    def restore(self, windows: list[Aggregate], apps: dict[str, AppProgress], offset: int) -> None:
        """Rebuild from table state after a restart or rebalance."""
        for agg in windows:
            self.windows[agg.key] = agg
        self.apps.update(apps)
        self.offset = max(self.offset, offset)
        for agg in windows:
            last = agg.key.start_ms  # the watermark is at least the window's start
            if last > self.wm_ms:
                self.wm_ms = last
        for prog in apps.values():
            if prog.wm_ms > self.wm_ms:
                self.wm_ms = prog.wm_ms
