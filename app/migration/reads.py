"""The read side of a migration: which store serves each app, shadow reads, and both stores' latency.

:class:`MigratingQuery` has the query engine's interface (app/api/query/); the user's answer never waits for a
shadow read nor fails because of one.
Reference: docs/operations/migration.md
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.api.query import Answer, LiveSource, MetricsQuery
from app.clock import Clock, SystemClock
from app.migration.compare import KINDS, Mismatch, compare_bodies
from app.migration.state import MigrationState, store_settings
from app.ops.stats import CounterName, Counters
from app.settings import Settings
from app.storage.backends import metrics_store
from app.storage.protocol import DIGEST, Kind, MetricItem, MetricsBackend, Progress

log = logging.getLogger("minutely.migration")

SHADOW_MAX_INFLIGHT = 16
RECENT_MISMATCHES = 200
MISMATCH_COUNTERS: dict[str, CounterName] = {
    "missing": "shadow_mismatch_missing", "extra": "shadow_mismatch_extra", "value": "shadow_mismatch_value",
    "percentile": "shadow_mismatch_percentile"}
"""Mismatch kind (app/migration/compare.py KINDS) -> its counter."""
LATENCY_KEEP_MINUTES = 60
SAMPLES_PER_MINUTE = 4_096
"""Latencies kept per store and minute (the first ones; p99 of 4,096 samples is well defined)."""


@dataclass
class _Minute:
    reads: dict[str, list[float]] = field(default_factory=dict)
    shadows: int = 0
    mismatched: int = 0
    failed: int = 0
    incomparable: int = 0


class ReadStats:
    """Per minute: each store's read latencies, and shadow comparisons with how many differed."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._minutes: dict[int, _Minute] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_MISMATCHES)

    def _minute(self) -> _Minute:
        m = self.clock.now_ms() // 60_000 * 60
        cur = self._minutes.get(m)
        if cur is None:
            cur = self._minutes[m] = _Minute()
            for old in [k for k in self._minutes if k <= m - 60 * LATENCY_KEEP_MINUTES]:
                del self._minutes[old]
        return cur

    def read(self, store: str, seconds: float) -> None:
        samples = self._minute().reads.setdefault(store, [])
        if len(samples) < SAMPLES_PER_MINUTE:
            bisect.insort(samples, seconds)

    def incomparable(self) -> None:
        """A shadow read with no point final in both stores yet (no verdict; not in the mismatch rate)."""
        self._minute().incomparable += 1

    def shadow(self, *, mismatched: bool | None) -> None:
        """One shadow comparison: differed (True), equal (False), or failed / timed out (None)."""
        m = self._minute()
        m.shadows += 1
        if mismatched is None:
            m.failed += 1
        elif mismatched:
            m.mismatched += 1

    def series(self) -> list[dict[str, Any]]:
        """Per minute, oldest first: ``{"ts", "stores": {spec: {n, p50_ms, p99_ms}}, shadows, mismatched,
        failed, incomparable}``."""
        out = []
        for ts in sorted(self._minutes):
            m = self._minutes[ts]
            stores = {s: {"n": len(v), "p50_ms": _pct(v, 0.5) * 1000, "p99_ms": _pct(v, 0.99) * 1000}
                      for s, v in sorted(m.reads.items()) if v}
            out.append({"ts": ts, "stores": stores, "shadows": m.shadows, "mismatched": m.mismatched,
                        "failed": m.failed, "incomparable": m.incomparable})
        return out

    def summary(self) -> dict[str, Any]:
        """The last hour: each store's read p50/p99 and the shadow mismatch rate."""
        reads: dict[str, list[float]] = {}
        shadows = mismatched = failed = incomparable = 0
        for m in self._minutes.values():
            for s, v in m.reads.items():
                reads.setdefault(s, []).extend(v)
            shadows, mismatched, failed = shadows + m.shadows, mismatched + m.mismatched, failed + m.failed
            incomparable += m.incomparable
        compared = shadows - failed
        return {"stores": {s: {"n": len(v), "p50_ms": _pct(sorted(v), 0.5) * 1000,
                               "p99_ms": _pct(sorted(v), 0.99) * 1000} for s, v in sorted(reads.items())},
                "shadows": shadows, "mismatched": mismatched, "failed": failed, "incomparable": incomparable,
                "mismatch_rate": mismatched / compared if compared else None}


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class TimedStore:
    """A metrics store whose reads are timed into :class:`ReadStats` under the store's spec."""

    def __init__(self, store: MetricsBackend, spec: str, stats: ReadStats) -> None:
        self.inner, self.spec, self.stats = store, spec, stats

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int,
                    kind: Kind = DIGEST) -> list[MetricItem]:
        t0 = time.perf_counter()
        items = await self.inner.query(app, process_type, resolution_s, since_s, until_s, kind)
        self.stats.read(self.spec, time.perf_counter() - t0)
        return items

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        await self.inner.put_many(items)

    async def series(self) -> list[tuple[str, str]]:
        return await self.inner.series()

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        await self.inner.put_progress(progress)

    async def progress(self) -> list[Progress]:
        return await self.inner.progress()

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def ping(self) -> None:
        await self.inner.ping()


EngineFactory = Callable[[str, str], Awaitable[MetricsQuery]]
"""(store spec, "serve" | "shadow") -> a started engine on that store (A/A shadows get their own)."""


class MigratingQuery:
    """The query engine of a process that follows the migration state (every web process and worker)."""

    def __init__(self, settings: Settings, state: Callable[[], MigrationState], engine: EngineFactory, *,
                 stats: ReadStats, counters: Counters | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.state = state
        self.engine = engine
        self.stats = stats
        self.counters = counters
        self.clock: Clock = clock or SystemClock()
        self._shadows: set[asyncio.Future[None]] = set()

    def _count(self, name: CounterName, n: int = 1) -> None:
        if self.counters is not None:
            self.counters.inc(name, n)

    async def answer(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int) -> Answer:
        st = self.state()
        serving = st.serving(app, since_s)
        engine = await self.engine(serving, "serve")
        t0 = time.perf_counter()
        ans = await engine.answer(app, process_type, resolution_s, since_s, until_s)
        serving_ms = (time.perf_counter() - t0) * 1000
        other = st.shadow(app, since_s)
        if other is not None:
            if len(self._shadows) >= SHADOW_MAX_INFLIGHT:
                self._count("shadow_skipped")
            else:
                task = asyncio.ensure_future(self._shadow(ans, serving, other, app, process_type,
                                                          resolution_s, since_s, until_s,
                                                          both_since_s=st.both_since_ms // 1000,
                                                          serving_ms=serving_ms))
                self._shadows.add(task)
                task.add_done_callback(self._shadows.discard)
        return ans

    async def _shadow(self, ans: Answer, serving: str, other: str, app: str,
                      proc: str, res: int, since_s: int, until_s: int, *, both_since_s: int,
                      serving_ms: float) -> None:
        """Run the query on ``other``, compare, log and count; never raises."""
        self._count("shadow_reads")
        t0 = time.perf_counter()
        try:
            engine = await self.engine(other, "shadow")
            shadow_ans = await asyncio.wait_for(engine.answer(app, proc, res, since_s, until_s),
                                                self.settings.migration.shadow_timeout_s)
        except TimeoutError:
            self._count("shadow_timeouts")
            self.stats.shadow(mismatched=None)
            return
        except Exception as exc:  # noqa: BLE001  a failing shadow store must never reach the user
            self._count("shadow_failed")
            self.stats.shadow(mismatched=None)
            log.warning("shadow read of %s/%s on %s failed: %s", app, proc, other, exc)
            return
        other_ms = (time.perf_counter() - t0) * 1000
        # Only what both answers rendered as final (settled, and stored in each store): the served answer may
        # be an older render of a live range, and the other store's writer may be behind.
        cutoff_s = min(ans.final_until_s, shadow_ans.final_until_s)
        if ans.points and ans.etag == shadow_ans.etag and ans.body == shadow_ans.body:
            # Byte-identical answers (the usual case): every point equal, nothing to parse.
            self._count("shadow_points_compared", ans.points)
            self._count("shadow_matched")
            self.stats.shadow(mismatched=False)
            return
        result = compare_bodies(ans.body, shadow_ans.body, resolution_s=res, cutoff_s=cutoff_s,
                                since_s=both_since_s)
        if not result.points:  # nothing final in both yet (the settle time, a writer catching up): no verdict
            self._count("shadow_incomparable")
            self.stats.incomparable()
            return
        self._count("shadow_points_compared", result.points)
        diffs = result.mismatches
        self.stats.shadow(mismatched=bool(diffs))
        if not diffs:
            self._count("shadow_matched")
            return
        for d in diffs:
            self._count(MISMATCH_COUNTERS[d.kind])
        # One line per difference, a few per answer (a bad store must not flood the log): each minute's first
        # difference of each kind first, so a missing minute is listed beside one with many differing fields.
        first: dict[tuple[int, str], int] = {}
        for i, d in enumerate(diffs):
            first.setdefault((d.ts_s, d.kind), i)
        leading = set(first.values())
        order = sorted(leading) + [i for i in range(len(diffs)) if i not in leading]
        for d in (diffs[i] for i in order[:10]):
            self.record(app, proc, res, serving, other, d, serving_ms=serving_ms, other_ms=other_ms)

    def record(self, app: str, proc: str, res: int, serving: str, other: str, d: Mismatch, *,
               serving_ms: float, other_ms: float) -> None:
        entry = {"app": app, "process_type": proc, "resolution_s": res, "ts": d.ts_s, "kind": d.kind,
                 "field": d.field, "serving_store": serving, "serving": d.serving, "serving_ms": round(serving_ms, 2),
                 "other_store": other, "other": d.other, "other_ms": round(other_ms, 2),
                 "at_ms": self.clock.now_ms()}
        self.stats.recent.append(entry)
        log.warning("shadow mismatch %s", orjson.dumps(entry).decode())

    async def events(self, app: str, process_type: str, since_s: int, until_s: int) -> bytes:
        engine = await self.engine(self.state().serving(app, since_s), "serve")
        return await engine.events(app, process_type, since_s, until_s)

    async def process_types(self, app: str, since_s: int, until_s: int) -> list[str]:
        engine = await self.engine(self.state().serving(app, since_s), "serve")
        return await engine.process_types(app, since_s, until_s)

    async def drain(self) -> None:
        """Wait for the shadow reads in flight (tests, shutdown)."""
        while self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)

    def report(self) -> dict[str, Any]:
        """The operator view's document (``GET /migration``)."""
        st = self.state()
        return {"state": st.to_json(), "label": st.label, "summary": self.stats.summary(),
                "minutes": self.stats.series(), "recent_mismatches": list(self.stats.recent),
                "mismatch_kinds": list(KINDS)}


class Engines:
    """Started query engines by store spec, made on first use: one per store serves, and A/A shadows get a
    second one on the same store (their own caches, so the comparison reads the store)."""

    def __init__(self, settings: Settings, stats: ReadStats, *, live: LiveSource | None = None,
                 counters: Counters | None = None, started: dict[str, MetricsBackend] | None = None) -> None:
        """``started``: stores the caller already started and stops itself (a worker's own store), reused
        here rather than opened twice."""
        self.settings = settings
        self.stats = stats
        self.live = live
        self.counters = counters
        self._stores: dict[str, TimedStore] = {spec: TimedStore(b, spec, stats) for spec, b in (started or {}).items()}
        self._owned: set[str] = set()
        self._engines: dict[tuple[str, str], MetricsQuery] = {}
        self._lock = asyncio.Lock()

    async def __call__(self, spec: str, role: str) -> MetricsQuery:
        engine = self._engines.get((spec, role))
        if engine is not None:
            return engine
        async with self._lock:
            engine = self._engines.get((spec, role))
            if engine is None:
                store = self._stores.get(spec)
                if store is None:
                    store = TimedStore(metrics_store(store_settings(self.settings, spec), counters=self.counters),
                                       spec, self.stats)
                    await store.start()
                    self._stores[spec] = store
                    self._owned.add(spec)
                # Gauges and cache counters describe what users are served: the shadow engines keep quiet.
                engine = MetricsQuery(store, live=self.live, settings=self.settings,
                                      counters=self.counters if role == "serve" else None)
                self._engines[(spec, role)] = engine
            return engine

    async def ping(self, spec: str) -> None:
        """Readiness of a store (started on first use)."""
        await self(spec, "serve")
        await self._stores[spec].ping()

    async def stop(self) -> None:
        for spec in self._owned:
            await self._stores.pop(spec).stop()
        self._owned.clear()
        self._engines.clear()
