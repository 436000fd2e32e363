"""Tumbling one-minute event-time windows of one input partition, with a lifecycle we own.

The closing rules are monotonic in a minute's end, so an app's minutes close in order; every window, app and
partition records the input offsets it applied, so a replayed message never counts twice; each (app, process
type, minute) is emitted once. Pure: agents/aggregate.py moves records to and from the Faust table.
Reference: docs/design/windows.md
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import not_
from typing import Any, cast

import msgspec

from app import models
from app.clock import Clock
from app.limits import AppLimits
from tables.aggregate import Aggregate, BucketKey
from tables.digest import DEFAULT_MAX_CENTROIDS
from tables.streams import MAX_STREAMS_PER_APP, STREAM_IDLE_MS, StreamPoint, counter_delta, histogram_delta

WINDOW_MS = 60_000
COLUMN_MIN = 16
"""Router requests in a message from which the column-wise fold pays for its setup."""
WinKey = tuple[str, str, int]
"""(app, process type, window start ms): a plain tuple hashes far faster than a dataclass on the hot path."""
LIMIT_DEAD_LETTERS = 100
"""Refusals dead-lettered per (app, minute, limit); past it they are counted only (limit_refused_*)."""
STREAM_SCAN_EVERY_MS = 60_000
"""Watermark progress between two scans for quiet streams (:meth:`PartitionWindows.expire_streams`)."""
StreamKey = tuple[str, str]
"""(app, stream id) of a cumulative stream (tables/streams.py)."""
PROCESS_TYPES, ADDON_SOURCES, METRIC_NAMES = 0, 1, 2
"""Which limit refused an observation (index into Counts.refused)."""
_UNLIMITED = AppLimits(ingest_rate_bytes_s=0.0, ingest_burst_bytes=0, inflight_bytes_per_token=0,
                       max_process_types=1 << 30, max_addon_sources=1 << 30, max_metric_names=1 << 30)


@dataclass(slots=True)
class AppProgress:
    """Per app and partition: idempotence offset, event-time watermark and lateness boundary."""

    offset: int = -1
    wm_ms: int = -1
    closed_ms: int = -1

    def to_record(self) -> list[int]:
        return [self.offset, self.wm_ms, self.closed_ms]

    @classmethod
    def from_record(cls, rec: list[int]) -> AppProgress:
        return cls(int(rec[0]), int(rec[1]), int(rec[2]))


@dataclass(slots=True)
class Counts:
    accepted: int = 0
    late: int = 0
    rejected: int = 0
    skipped_replay: int = 0
    refused: dict[tuple[str, int], int] = field(default_factory=dict)
    """Of ``rejected``: refused by a limit, per (app, PROCESS_TYPES | ADDON_SOURCES | METRIC_NAMES)."""

    def refused_by_limit(self) -> list[int]:
        """All apps' refusals, indexed by PROCESS_TYPES, ADDON_SOURCES, METRIC_NAMES."""
        out = [0, 0, 0]
        for (_, limit), n in self.refused.items():
            out[limit] += n
        return out


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

    def add(self, other: IngestResult) -> None:
        c, o = self.counts, other.counts
        c.accepted += o.accepted
        c.late += o.late
        c.rejected += o.rejected
        c.skipped_replay += o.skipped_replay
        for k, n in o.refused.items():
            c.refused[k] = c.refused.get(k, 0) + n
        self.dead.extend(other.dead)


class PartitionWindows:
    """Open windows, watermarks and progress of one input partition."""

    def __init__(self, partition: int, *, clock: Clock, grace_ms: int, idle_timeout_ms: int,
                 max_future_ms: int, max_message_bytes: int,
                 max_centroids: int = DEFAULT_MAX_CENTROIDS, window_ms: int = WINDOW_MS,
                 column_min: int = COLUMN_MIN, limits_of: Callable[[str], AppLimits] | None = None) -> None:
        """``limits_of(app)``: that app's limits now (app/limits.py ``Limits.of``); None: no limits."""
        self.partition = partition
        self.clock = clock
        self.grace_ms = grace_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.max_future_ms = max_future_ms
        self.max_message_bytes = max_message_bytes
        self.max_centroids = max_centroids
        self.window_ms = window_ms
        self.column_min = column_min
        self.limits_of: Callable[[str], AppLimits] = limits_of or (lambda app: _UNLIMITED)
        self.windows: dict[WinKey, Aggregate] = {}
        self.procs: dict[tuple[str, int], int] = {}
        """Open windows per (app, minute start), the add-on series not counted: its distinct process types."""
        self.refused: dict[tuple[str, int, int], int] = {}
        """Refusals per (app, minute start, limit) of minutes still open: bounds their dead letters."""
        self.apps: dict[str, AppProgress] = {}
        self.offset = -1  # every message at or below this offset is fully applied
        self.wm_ms = -1
        self.busy_wall_ms = clock.now_ms()
        """Wall time the partition last had input or was not known to be caught up: quiet (idle) is counted
        from here, so a broker outage (end offsets unknown) never passes for idleness."""
        self.dirty_windows: set[WinKey] = set()
        self.dirty_apps: set[str] = set()
        self.streams: dict[StreamKey, StreamPoint] = {}
        """The last point of each cumulative stream (tables/streams.py)."""
        self.stream_counts: dict[str, int] = {}
        self.dirty_streams: set[StreamKey] = set()
        self.gone_streams: set[StreamKey] = set()
        self.streams_scanned_wm_ms = -STREAM_SCAN_EVERY_MS

    # --- input -------------------------------------------------------------------------------------
    def ingest(self, offset: int, value: bytes | None, result: IngestResult) -> None:
        """Fold one input message in. Never raises on bad data: rejects are appended to ``result``."""
        now_ms = self.clock.now_ms()
        self.busy_wall_ms = now_ms
        if offset <= self.offset:
            result.counts.skipped_replay += 1
            return
        # Every record rule that needs no window state (names, clock skew, fields) is checked by the decode.
        decoded = models.decode(value, self.max_message_bytes, now_ms=now_ms, max_future_ms=self.max_future_ms)
        if isinstance(decoded, models.Reject):
            result.counts.rejected += 1
            result.dead.append(Rejected("rejected", decoded.reason, decoded.record, offset, -1, None))
            self.offset = offset  # handled: a replay must not dead-letter it twice, and idleness needs it
            return
        if decoded.rejects:
            self._rejected(offset, decoded.rejects, result)
        obs = decoded.observations
        touched: dict[WinKey, Aggregate] = {}
        seen_apps: set[str] = set()
        rest: Sequence[int] = range(len(obs))
        if len(obs) >= self.column_min:
            rest = self._fold_routers(offset, decoded, touched, seen_apps, result.counts)
        if rest:
            self._fold_each(offset, decoded, rest, touched, seen_apps, result)
        # Stamp offsets after the whole message: several observations of one message share a window.
        for key, agg in touched.items():
            agg.offset = offset
            self.dirty_windows.add(key)
        for app in seen_apps:
            self.apps[app].offset = offset
        self.dirty_apps |= seen_apps
        self.offset = offset

    def _rejected(self, offset: int, rejects: list[models.Reject], result: IngestResult) -> None:
        """Records the decode refused: dead-lettered, unless their app already applied this offset (a
        replay after a crash between table writes: they were dead-lettered the first time)."""
        apps = self.apps
        counts = result.counts
        for rej in rejects:
            if rej.app is not None and (prog := apps.get(rej.app)) is not None and offset <= prog.offset:
                counts.skipped_replay += 1
                continue
            counts.rejected += 1
            result.dead.append(Rejected("rejected", rej.reason, rej.record, offset, rej.index, rej.app))

    def _fold_routers(self, offset: int, decoded: models.Decoded, touched: dict[WinKey, Aggregate],
                      seen_apps: set[str], counts: Counts) -> Sequence[int]:
        """Fold a message's router requests column by column; returns the positions left to fold one by one.

        A batched message is one app's requests over a few seconds: one app, one process type, one
        window (two at a minute boundary). Each field is pulled out once (a comprehension or C-level
        ``map``) and folded per window in bulk (``list.extend``, ``Counter``): about 2x cheaper than
        :meth:`_fold_each`'s ~40 bytecodes per request. Anything unusual -- several apps, a late
        timestamp, a window that already holds this offset, a new process type past the app's limit --
        leaves the whole message to :meth:`_fold_each`, which counts each case exactly. Both paths give
        identical aggregates (tests/tables/test_windows.py).
        """
        Router = models.Router
        obs = decoded.observations
        n = len(obs)
        everything = range(n)
        is_router = decoded.router_mask or [o.__class__ is Router for o in obs]  # the decode's, when it made one
        n_routers = is_router.count(True)
        if n_routers < self.column_min:
            return everything
        rest: Sequence[int] = ()
        routers: list[Any] = obs
        if n_routers != n:
            routers = list(compress(obs, is_router))
            rest = list(compress(everything, map(not_, is_router)))
        apps = decoded.apps if n_routers == n or len(decoded.apps) == 1 else {o.app for o in routers}
        if len(apps) != 1:
            return everything
        (app,) = apps
        prog = self.apps.get(app)
        if prog is not None and offset <= prog.offset:
            return everything
        ts_ms = decoded.ts_ms
        if not ts_ms:
            ts_ms = [o.ts for o in routers]
        elif n_routers != n:
            ts_ms = list(compress(ts_ms, is_router))
        lo_ms, hi_ms = min(ts_ms), max(ts_ms)
        if prog is not None and lo_ms < prog.closed_ms:
            return everything
        proc_of = decoded.process_types
        procs = set(proc_of.values())
        if len(procs) != 1 and n_routers != n:  # other kinds' dynos in the message: the routers' own
            procs = {proc_of[d] for d in {o.dyno for o in routers}}
        window_ms = self.window_ms
        groups: dict[WinKey, list[int] | None]
        if len(procs) == 1 and lo_ms // window_ms == hi_ms // window_ms:
            groups = {(app, procs.pop(), lo_ms - lo_ms % window_ms): None}  # None: all of them
        else:
            positions: dict[WinKey, list[int]] = {}
            for i, o in enumerate(routers):
                k = (app, proc_of[o.dyno], o.ts - o.ts % window_ms)
                got = positions.get(k)
                if got is None:
                    positions[k] = [i]
                else:
                    got.append(i)
            groups = dict(positions)
        windows = self.windows
        new_procs: dict[int, int] = {}
        for key in groups:
            agg = windows.get(key)
            if agg is None:
                if key[1] != models.APP_SERIES:
                    new_procs[key[2]] = new_procs.get(key[2], 0) + 1
            elif offset <= agg.offset:
                return everything
        if new_procs:
            limit = self.limits_of(app).max_process_types
            open_procs = self.procs
            for start_ms, n in new_procs.items():
                if open_procs.get((app, start_ms), 0) + n > limit:
                    return everything  # _fold_each refuses the extra ones, with the reason
        # From here on the message is applied: nothing below can fail or fall back.
        if prog is None:
            prog = self.apps[app] = AppProgress()
        services = [o.service_ms for o in routers]
        unserved = None in services  # router errors without a service time: counted, never timed
        statuses = [o.status for o in routers]
        codes = [o.code for o in routers]
        with_code = codes.count(None) != n_routers
        for key, pos in groups.items():
            agg = windows.get(key)
            if agg is None:
                agg = windows[key] = Aggregate(BucketKey(*key), max_centroids=self.max_centroids)
                if key[1] != models.APP_SERIES:
                    pk = (app, key[2])
                    self.procs[pk] = self.procs.get(pk, 0) + 1
            touched[key] = agg
            if pos is None:
                agg.response.pending.extend([v for v in services if v is not None] if unserved else services)
                by_status = Counter(statuses)
            else:
                agg.response.pending.extend([v for i in pos if (v := services[i]) is not None])
                by_status = Counter([statuses[i] for i in pos])
            status = agg.status
            for code_, count in by_status.items():
                status[code_ // 100] += count
                if code_ >= 500:
                    agg.failed += count
            if with_code:
                errors = agg.errors
                for code, count in Counter(filter(None, codes if pos is None else [codes[i] for i in pos])).items():
                    errors[code] = errors.get(code, 0) + count
        counts.accepted += n_routers
        seen_apps.add(app)
        if hi_ms > prog.wm_ms:
            prog.wm_ms = hi_ms
            if hi_ms > self.wm_ms:
                self.wm_ms = hi_ms
        return rest

    def _fold_each(self, offset: int, decoded: models.Decoded, positions: Iterable[int],
                   touched: dict[WinKey, Aggregate], seen_apps: set[str], result: IngestResult) -> None:
        """Fold valid observations (models.decode checked them) one at a time, with every rule that needs
        window state: replays, lateness, per-app limits.

        Written flat on purpose: local names, tuple keys, one list append per request; counts, sums,
        max and digests are folded once per batch (Timer.flush).
        """
        obs = decoded.observations
        indexes = decoded.indexes
        proc_of = decoded.process_types
        window_ms = self.window_ms
        apps = self.apps
        windows = self.windows
        slots: dict[WinKey, tuple[Aggregate, Any, list[int]]] = {}
        counts = result.counts
        accepted = 0
        last_app: str | None = None
        prog = AppProgress()
        limits_of = self.limits_of
        lim = _UNLIMITED
        procs = self.procs
        APP_SERIES = models.APP_SERIES
        Router = models.Router
        Runtime = models.Runtime
        Metric = models.Metric
        Addon = models.Addon
        Histogram = models.Histogram
        streams, stream_counts = self.streams, self.stream_counts
        for i in positions:
            o = obs[i]
            app = o.app
            if app != last_app:
                got = apps.get(app)
                if got is None:
                    got = apps[app] = AppProgress()
                prog, last_app = got, app
                lim = limits_of(app)
                seen_apps.add(app)
            if offset <= prog.offset:
                counts.skipped_replay += 1
                continue
            cls = o.__class__
            proc = APP_SERIES if cls is Addon else proc_of[o.dyno]  # type: ignore[union-attr]
            ts = o.ts
            if ts < prog.closed_ms:
                counts.late += 1
                result.dead.append(Rejected(
                    "late", f"minute already closed: ts {ts} < {prog.closed_ms} (grace {self.grace_ms} ms)",
                    models.echo(o), offset, i if indexes is None else indexes[i], app))
                continue
            if (cls is Metric or cls is Histogram) and o.stream is not None:  # type: ignore[union-attr]
                sk = (app, o.stream)  # type: ignore[union-attr]
                last = streams.get(sk)
                if last is None and stream_counts.get(app, 0) >= MAX_STREAMS_PER_APP:
                    self._reject(result, f"more than {MAX_STREAMS_PER_APP} cumulative streams of {app} in this "
                                 "partition: a new one is refused until old ones go quiet for "
                                 f"{STREAM_IDLE_MS // 60_000} min; send delta temporality, or keep ids out of "
                                 "attributes", o, offset, i, indexes, app)
                    continue
                delta, point = (counter_delta(last, o) if cls is Metric  # type: ignore[arg-type]
                                else histogram_delta(last, o))  # type: ignore[arg-type]
                if point is not None:
                    if last is None:
                        stream_counts[app] = stream_counts.get(app, 0) + 1
                    streams[sk] = point
                    self.dirty_streams.add(sk)
                if delta is None:  # a baseline or a repeat: nothing to fold
                    accepted += 1
                    continue
                o = (msgspec.structs.replace(o, value=delta, stream=None, start=None)
                     if cls is Metric else cast(models.Histogram, delta))
            if cls is Histogram and not o.count:  # type: ignore[union-attr]
                accepted += 1  # an idle stream's interval: no minute to open for it
                continue
            key = (app, proc, ts - ts % window_ms)
            slot = slots.get(key)
            if slot is None:
                agg = touched.get(key) or windows.get(key)
                if agg is None:
                    if proc != APP_SERIES:
                        pk = (app, key[2])
                        n = procs.get(pk, 0)
                        if n >= lim.max_process_types:
                            self._refuse(result, PROCESS_TYPES, o, offset, i, indexes, key, lim)
                            continue
                        procs[pk] = n + 1
                    agg = windows[key] = Aggregate(BucketKey(*key), max_centroids=self.max_centroids)
                elif offset <= agg.offset:
                    counts.skipped_replay += 1
                    continue
                slot = slots[key] = (agg, agg.response.pending.append, agg.status)
                touched[key] = agg
            if cls is Router:
                service = o.service_ms  # type: ignore[union-attr]
                if service is not None:
                    slot[1](service)
                status: int = o.status  # type: ignore[union-attr,assignment]
                slot[2][status // 100] += 1
                if status >= 500:
                    slot[0].failed += 1
                if o.code is not None:  # type: ignore[union-attr]
                    errs = slot[0].errors
                    errs[o.code] = errs.get(o.code, 0) + 1  # type: ignore[union-attr]
            elif cls is Runtime:
                r: models.Runtime = o  # type: ignore[assignment]
                slot[0].add_runtime(r.memory_rss_mb, r.memory_swap_mb, r.memory_total_mb, r.memory_quota_mb,
                                    r.load_avg_1m)
            elif cls is Metric:
                m: models.Metric = o  # type: ignore[assignment]
                agg = slot[0]
                if (len(agg.timers) + len(agg.counters) + len(agg.gauges) >= lim.max_metric_names
                        and m.name not in agg.timers and m.name not in agg.counters and m.name not in agg.gauges):
                    self._refuse(result, METRIC_NAMES, o, offset, i, indexes, key, lim)
                    continue
                agg.add_metric(m.name, m.type, m.value, ts)
            elif cls is Histogram:
                h: models.Histogram = o  # type: ignore[assignment]
                agg = slot[0]
                if (h.name is not None and len(agg.timers) + len(agg.counters) + len(agg.gauges)
                        >= lim.max_metric_names and h.name not in agg.timers and h.name not in agg.counters
                        and h.name not in agg.gauges):
                    self._refuse(result, METRIC_NAMES, o, offset, i, indexes, key, lim)
                    continue
                agg.add_histogram(h.name, h.status, h.count, h.sum, h.bounds, h.counts, h.min, h.max)
            elif cls is Addon:
                a: models.Addon = o  # type: ignore[assignment]
                addons = slot[0].addons
                if a.source not in addons and len(addons) >= lim.max_addon_sources:
                    self._refuse(result, ADDON_SOURCES, o, offset, i, indexes, key, lim)
                    continue
                slot[0].add_addon(a.source, a.samples, ts)
            else:
                slot[0].add_event(o.name)  # type: ignore[union-attr,arg-type]
            accepted += 1
            if ts > prog.wm_ms:
                prog.wm_ms = ts
                if ts > self.wm_ms:
                    self.wm_ms = ts
        counts.accepted += accepted

    def _reject(self, result: IngestResult, reason: str, record: Any, offset: int, i: int,
                indexes: list[int] | None, app: str | None) -> None:
        result.counts.rejected += 1
        index = i if indexes is None else indexes[i]
        result.dead.append(Rejected("rejected", reason, models.echo(record), offset, index, app))

    def _refuse(self, result: IngestResult, limit: int, record: Any, offset: int, i: int,
                indexes: list[int] | None, key: WinKey, lim: AppLimits) -> None:
        """An observation past one of its app's limits: counted always, dead-lettered only the first
        LIMIT_DEAD_LETTERS times per (app, minute, limit) -- no reason, echo or record beyond that."""
        counts = result.counts
        app, proc, start_ms = key
        counts.refused[app, limit] = counts.refused.get((app, limit), 0) + 1
        k = (app, start_ms, limit)
        n = self.refused[k] = self.refused.get(k, 0) + 1
        if n > LIMIT_DEAD_LETTERS:
            counts.rejected += 1
            return
        if limit == PROCESS_TYPES:
            reason = (f"more than {lim.max_process_types} process types in minute {start_ms} of {app}: dyno "
                      f"{record.dyno!r} refused. Process types come from dyno names: keep ids out of them, or "
                      f"raise max_process_types for {app} in METRICS_LIMITS_FILE (default "
                      "METRICS_LIMIT_PROCESS_TYPES)")
        elif limit == ADDON_SOURCES:
            reason = (f"more than {lim.max_addon_sources} add-on sources in minute {start_ms} of {app}: source "
                      f"{record.source!r} refused; raise max_addon_sources for {app} in METRICS_LIMITS_FILE "
                      "(default METRICS_LIMIT_ADDON_SOURCES)")
        else:
            reason = (f"more than {lim.max_metric_names} distinct custom metric names in minute {start_ms} of "
                      f"{app}/{proc}: {record.name!r} refused; keep ids out of metric names, or raise "
                      f"max_metric_names for {app} in METRICS_LIMITS_FILE (default METRICS_MAX_METRIC_NAMES)")
        if n == LIMIT_DEAD_LETTERS:
            reason += (f"; further refusals of this limit in this minute are only counted "
                       f"(limit_refused_{('process_types', 'addon_sources', 'metric_names')[limit]})")
        self._reject(result, reason, record, offset, i, indexes, app)

    # --- closing -----------------------------------------------------------------------------------
    def due(self, *, caught_up: bool = True) -> list[Aggregate]:
        """Windows to close now, oldest first.

        ``caught_up`` is False while the partition has messages waiting (a backlog, or the pause of a
        restart or rebalance): then it is not idle, however long nothing arrived.
        """
        now_ms = self.clock.now_ms()
        idle = caught_up and now_ms - self.busy_wall_ms >= self.idle_timeout_ms
        grace_ms = self.grace_ms
        part_limit = self.wm_ms - grace_ms - self.idle_timeout_ms
        out = []
        for agg in self.windows.values():
            key = agg.key
            end_ms = key.start_ms + self.window_ms
            prog = self.apps.get(key.app)
            app_wm = prog.wm_ms if prog is not None else -1
            if (app_wm >= end_ms + grace_ms or end_ms <= part_limit
                    or (prog is not None and end_ms <= prog.closed_ms)  # closed before a restart: send again
                    or (idle and now_ms >= end_ms + grace_ms)):
                out.append(agg)
        out.sort(key=lambda a: (a.key.start_ms, a.key.app, a.key.process_type))  # deterministic order
        return out

    def end_unknown(self) -> None:
        """The broker's end offset cannot be known now (unreachable, or not fetched lately): producers may be
        holding this partition's data, so it is not quiet, and its quiet time starts again from now."""
        self.busy_wall_ms = self.clock.now_ms()

    def closed_through_ms(self, *, caught_up: bool) -> int:
        """An event time before which every window of this partition that arrives in order is closed.

        No window ending after it can still be open (the oldest open window starts at or after it). While
        caught up, new events older than ``now - grace`` are late for every app that has progressed past
        them; with a backlog, the partition watermark minus grace and idle timeout bounds what rule 2 has
        closed. A minute opened behind it anyway (a new app's old data) is a late minute, which the sinks
        report (agents/progress.py)."""
        bound = (self.clock.now_ms() - self.grace_ms if caught_up
                 else self.wm_ms - self.grace_ms - self.idle_timeout_ms)
        for agg in self.windows.values():
            if agg.key.start_ms < bound:
                bound = agg.key.start_ms
        return bound

    def is_closed(self, agg: Aggregate) -> bool:
        """Whether this window's minute was closed before (restored after a restart: sent again)."""
        prog = self.apps.get(agg.key.app)
        return prog is not None and agg.key.start_ms + self.window_ms <= prog.closed_ms

    def mark_closed(self, closed: list[Aggregate]) -> None:
        """After the closed windows were emitted: advance lateness boundaries, forget the windows."""
        for agg in closed:
            end_ms = agg.key.start_ms + self.window_ms
            prog = self.apps.setdefault(agg.key.app, AppProgress())
            if end_ms > prog.closed_ms:
                prog.closed_ms = end_ms
                self.dirty_apps.add(agg.key.app)
            k = (agg.key.app, agg.key.process_type, agg.key.start_ms)
            if self.windows.pop(k, None) is not None and k[1] != models.APP_SERIES:
                pk = (k[0], k[2])
                left = self.procs.get(pk, 0) - 1
                if left > 0:
                    self.procs[pk] = left
                else:
                    self.procs.pop(pk, None)
            self.dirty_windows.discard(k)
        if self.refused:  # forget the refusals of minutes now closed (a late event is refused as late)
            apps, window_ms = self.apps, self.window_ms
            self.refused = {k: n for k, n in self.refused.items()
                            if (seen := apps.get(k[0])) is None or k[1] + window_ms > seen.closed_ms}

    def take_dirty(self) -> tuple[list[Aggregate], list[tuple[str, AppProgress]]]:
        """Windows and app progress changed since the last call, to persist once per batch."""
        wins = [self.windows[k] for k in self.dirty_windows if k in self.windows]
        apps = [(a, self.apps[a]) for a in self.dirty_apps]
        self.dirty_windows = set()
        self.dirty_apps = set()
        return wins, apps

    def take_dirty_streams(self) -> tuple[list[tuple[StreamKey, StreamPoint]], list[StreamKey]]:
        """Streams changed and streams forgotten since the last call."""
        changed = [(k, self.streams[k]) for k in self.dirty_streams if k in self.streams]
        gone = list(self.gone_streams)
        self.dirty_streams = set()
        self.gone_streams = set()
        return changed, gone

    def expire_streams(self) -> int:
        """Forget streams quiet for STREAM_IDLE_MS of their app's event time; returns how many. A scan of
        every stream, so at most once per minute of the partition's watermark (windows close far more often)."""
        if not self.streams or self.wm_ms - self.streams_scanned_wm_ms < STREAM_SCAN_EVERY_MS:
            return 0
        self.streams_scanned_wm_ms = self.wm_ms
        apps = self.apps
        old = [k for k, p in self.streams.items()
               if (prog := apps.get(k[0])) is not None and prog.wm_ms - p.ts_ms > STREAM_IDLE_MS]
        for k in old:
            del self.streams[k]
            left = self.stream_counts.get(k[0], 1) - 1
            if left > 0:
                self.stream_counts[k[0]] = left
            else:
                self.stream_counts.pop(k[0], None)
            self.dirty_streams.discard(k)
            self.gone_streams.add(k)
        return len(old)

    def restore_streams(self, streams: dict[StreamKey, StreamPoint]) -> None:
        for k, point in streams.items():
            if k not in self.streams:
                self.stream_counts[k[0]] = self.stream_counts.get(k[0], 0) + 1
            self.streams[k] = point

    # --- recovery ----------------------------------------------------------------------------------
    def restore(self, windows: list[Aggregate], apps: dict[str, AppProgress], offset: int) -> None:
        """Rebuild from table state after a restart or rebalance."""
        for agg in windows:
            k = (agg.key.app, agg.key.process_type, agg.key.start_ms)
            if k not in self.windows and k[1] != models.APP_SERIES:
                self.procs[(k[0], k[2])] = self.procs.get((k[0], k[2]), 0) + 1
            self.windows[k] = agg
        self.apps.update(apps)
        self.offset = max(self.offset, offset)
        for agg in windows:
            last = agg.key.start_ms  # the watermark is at least the window's start
            if last > self.wm_ms:
                self.wm_ms = last
        for prog in apps.values():
            if prog.wm_ms > self.wm_ms:
                self.wm_ms = prog.wm_ms
