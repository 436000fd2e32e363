"""Shadow reads and read cutover (app/migration/reads.py) on in-memory stores, time driven by hand."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import numpy as np
import orjson
import pytest

from app.api.query import MetricsQuery
from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.migration import state as sm
from app.migration.compare import compare_points
from app.migration.reads import MigratingQuery, ReadStats, TimedStore
from app.ops.stats import Counters
from app.storage.protocol import MetricItem
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes

S = SETTINGS.replace(store="cassandra")
A, B = "cassandra:minutely", "dynamodb:minutely-metrics"


def point(ts: int, **fields: object) -> dict[str, object]:
    return {"ts": ts, "requests": 10, "response_ms": {"p50": 10.0, "p99": 50.0, "max": 70.0, "mean": 12.5},
            **fields}


def test_compare_exact_fields_percentile_tolerance_and_missing_points() -> None:
    a = [point(0), point(60), point(120), point(180)]
    b = [point(0), point(60, requests=11),
         {**point(120), "response_ms": {"p50": 10.05, "p99": 52.0, "max": 70.0, "mean": 12.5 + 1e-12}}]
    result = compare_points(a, b, resolution_s=60, cutoff_s=240)
    assert result.points == 4
    diffs = result.mismatches
    assert [(d.kind, d.ts_s, d.field) for d in diffs] == [
        ("value", 60, "requests"), ("percentile", 120, "response_ms.p99"), ("missing", 180, "")]
    assert [d.kind for d in compare_points([*b, point(240)], a, resolution_s=60, cutoff_s=300).mismatches] == \
        ["value", "percentile", "extra", "missing"]
    # The open minute and anything past the cutoff, or before both stores hold every minute, are not compared.
    assert compare_points(a, b, resolution_s=60, cutoff_s=180, since_s=120).mismatches == [
        d for d in compare_points(a, b, resolution_s=60, cutoff_s=180).mismatches if d.ts_s >= 120]
    assert compare_points(a, [], resolution_s=60, cutoff_s=60).mismatches == [
        d for d in compare_points(a, [], resolution_s=60, cutoff_s=240).mismatches if d.ts_s == 0]
    assert compare_points(a, b, resolution_s=60, cutoff_s=0).points == 0


class Fixture:
    def __init__(self, *, shadow_pct: int, cutover_pct: int = 0, aa: bool = False) -> None:
        self.clock = ManualClock((T0 + 7200) * 1000)
        self.stores = {A: MemoryStore(self.clock), B: MemoryStore(self.clock)}
        rng = np.random.default_rng(5)
        minutes = [minute(T0 + 60 * i, rng.lognormal(3, 0.5, 300)) for i in range(90)]
        for s in self.stores.values():
            put_minutes(s, minutes)
        st = sm.start(sm.initial(S), S, "dynamodb", backfill=False, now_ms=T0 * 1000)
        st = sm.shadow(st, shadow_pct, aa=aa, now_ms=T0 * 1000)
        self.state = sm.cutover(st, cutover_pct, now_ms=T0 * 1000) if cutover_pct else st
        self.stats = ReadStats(self.clock)
        self.counters = Counters()
        self.engines: dict[tuple[str, str], MetricsQuery] = {}

        async def engine(spec: str, role: str) -> MetricsQuery:
            key = (spec, role)
            if key not in self.engines:
                self.engines[key] = MetricsQuery(TimedStore(self.stores[spec], spec, self.stats),  # type: ignore[arg-type]
                                                 settings=S, clock=self.clock)
            return self.engines[key]

        self.query = MigratingQuery(S, lambda: self.state, engine, stats=self.stats, counters=self.counters,
                                    clock=self.clock)

    async def ask(self, app: str = "shop") -> dict[str, object]:
        ans = await self.query.answer(app, "web", 60, T0, T0 + 5400)
        await self.query.drain()
        return orjson.loads(ans.body)  # type: ignore[no-any-return]


async def test_equal_stores_compare_clean_and_both_latencies_are_recorded() -> None:
    f = Fixture(shadow_pct=100)
    doc = await f.ask()
    assert len(doc["points"]) == 90  # type: ignore[arg-type]
    c = f.counters.snapshot()
    assert c["shadow_reads"] == 1 and c["shadow_matched"] == 1 and c["shadow_mismatch_value"] == 0
    assert c["shadow_points_compared"] == 90
    summary = f.stats.summary()
    assert set(summary["stores"]) == {A, B} and summary["mismatch_rate"] == 0.0


async def test_a_divergent_item_is_logged_counted_and_listed_but_the_user_gets_the_serving_store(
        caplog: pytest.LogCaptureFixture) -> None:
    f = Fixture(shadow_pct=100)
    # One minute differs in the other store: a request more.
    bad = minute(T0 + 600, np.array([5.0] * 301))
    put_minutes(f.stores[B], [bad])
    del f.stores[B].items[("shop", "web", 60, T0 + 1200)]  # and one is missing there
    with caplog.at_level(logging.WARNING, logger="minutely.migration"):
        doc = await f.ask()
    assert doc["points"][10]["requests"] == 300  # type: ignore[index]  # from the serving store
    c = f.counters.snapshot()
    assert c["shadow_mismatch_value"] >= 1 and c["shadow_mismatch_missing"] == 1
    kinds = {(r["kind"], r["ts"]) for r in f.stats.recent}
    assert ("value", T0 + 600) in kinds and ("missing", T0 + 1200) in kinds
    line = next(r.getMessage() for r in caplog.records if "shadow mismatch" in r.getMessage())
    entry = orjson.loads(line.split(" ", 2)[2])
    assert entry["app"] == "shop" and entry["serving_store"] == A and entry["other_store"] == B
    assert entry["serving_ms"] >= 0 and entry["other_ms"] >= 0  # both latencies
    assert f.stats.summary()["mismatch_rate"] == 1.0


async def test_a_failing_or_slow_shadow_never_reaches_the_user() -> None:
    f = Fixture(shadow_pct=100)
    f.stores[B].fail_queries = 10
    doc = await f.ask()
    assert len(doc["points"]) == 90  # type: ignore[arg-type]
    assert f.counters.snapshot()["shadow_failed"] == 1

    async def hang(*_: object, **__: object) -> list[MetricItem]:
        await asyncio.sleep(3600)
        return []

    g = Fixture(shadow_pct=100)
    g.query.settings = S.replace(shadow_timeout_s=0.05)
    g.stores[B].query = hang  # type: ignore[method-assign]
    assert len((await g.ask())["points"]) == 90  # type: ignore[arg-type]
    assert g.counters.snapshot()["shadow_timeouts"] == 1


async def test_cutover_serves_cut_apps_from_the_new_store_and_shadows_the_old() -> None:
    f = Fixture(shadow_pct=100, cutover_pct=100)
    f.state = replace(f.state, both_since_ms=(T0 - 60) * 1000)
    f.stores[A].fail_queries = 10**6  # the old store is down: the cut-over app does not notice
    doc = await f.ask()
    assert len(doc["points"]) == 90  # type: ignore[arg-type]
    assert f.counters.snapshot()["shadow_failed"] == 1
    # Rollback: N back to 0 serves from the old store on the next request.
    f.state = sm.cutover(f.state, 0, now_ms=T0 * 1000)
    with pytest.raises(StoreUnavailable):
        await f.query.answer("shop", "web", 60, T0, T0 + 5400)


async def test_aa_mode_compares_the_serving_store_with_itself() -> None:
    f = Fixture(shadow_pct=100, aa=True)
    await f.ask()
    assert ("cassandra:minutely", "shadow") in f.engines and (B, "shadow") not in f.engines
    assert f.counters.snapshot()["shadow_matched"] == 1


async def test_apps_outside_the_percentage_are_not_shadowed() -> None:
    f = Fixture(shadow_pct=10)
    apps = [f"app-{i}" for i in range(200)]
    for s in f.stores.values():
        put_minutes(s, [minute(T0 + 60, np.array([1.0, 2.0]), app=a) for a in apps])
    for a in apps:
        await f.query.answer(a, "web", 60, T0, T0 + 600)
    await f.query.drain()
    expected = sum(1 for a in apps if sm.app_bucket(a) < 10)
    assert f.counters.snapshot()["shadow_reads"] == expected and 5 <= expected <= 40


async def test_only_points_final_in_both_answers_are_compared() -> None:
    """A served answer may be an older render of a live range (stale-while-revalidate): its newest point was
    incomplete then. Points past either answer's final edge are not differences."""
    from app.api.query import Answer

    def body(points: list[dict[str, object]]) -> bytes:
        return orjson.dumps({"points": points})

    class Engine:
        def __init__(self, ans: Answer) -> None:
            self.ans = ans

        async def answer(self, *_: object) -> Answer:
            return self.ans

    old_render = Answer(body([point(0), point(60, requests=4)]), "a", False, 60, 2, final_until_s=60)
    fresh = Answer(body([point(0), point(60)]), "b", True, 60, 2, final_until_s=120)
    engines = {A: Engine(old_render), B: Engine(fresh)}

    async def engine(spec: str, role: str) -> Engine:
        return engines[spec]

    clock = ManualClock(10**9)
    state = sm.shadow(sm.start(sm.initial(S), S, "dynamodb", backfill=False, now_ms=0), 100, aa=False, now_ms=0)
    counters = Counters()
    q = MigratingQuery(S, lambda: state, engine, stats=ReadStats(clock), counters=counters, clock=clock)  # type: ignore[arg-type]
    await q.answer("shop", "web", 60, 0, 120)
    await q.drain()
    c = counters.snapshot()
    assert c["shadow_points_compared"] == 1 and c["shadow_matched"] == 1 and c["shadow_mismatch_value"] == 0
