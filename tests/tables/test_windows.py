"""Window lifecycle with explicit timestamps and a manual clock (tables/windows.py)."""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.clock import ManualClock
from tables.windows import IngestResult, PartitionWindows

T0 = 1_764_000_000_000 - 1_764_000_000_000 % 60_000  # a minute boundary


def router(ts: int, *, app: str = "shop", dyno: str = "web.1", status: int = 200, svc: float | None = 10.0,
           code: str | None = None) -> dict[str, Any]:
    return {"kind": "router", "app": app, "dyno": dyno, "ts": ts, "status": status, "service_ms": svc,
            "connect_ms": 1.0, "bytes": 10, "code": code}


def msg(*obs: Any) -> bytes:
    return orjson.dumps(list(obs))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def pw(clock: ManualClock) -> PartitionWindows:
    return PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                            max_message_bytes=1_000_000, max_centroids=100)


def ingest(pw: PartitionWindows, offset: int, value: bytes) -> IngestResult:
    r = IngestResult()
    pw.ingest(offset, value, r)
    return r


def test_aggregates_per_app_process_minute(pw: PartitionWindows) -> None:
    r = ingest(pw, 0, msg(router(T0 + 1), router(T0 + 2, status=503, code="H12"),
                          router(T0 + 3, dyno="worker.1"), router(T0 + 60_001), router(T0 + 5, app="blog")))
    assert r.counts.accepted == 5 and not r.dead
    keys = set(pw.windows)
    assert keys == {("shop", "web", T0), ("shop", "worker", T0), ("shop", "web", T0 + 60_000),
                    ("blog", "web", T0)}
    web = pw.windows[("shop", "web", T0)]
    assert (web.requests, web.failed, web.errors, web.status[2], web.status[5]) == (2, 1, {"H12": 1}, 1, 1)


def test_window_closes_on_app_watermark_after_grace(pw: PartitionWindows) -> None:
    ingest(pw, 0, msg(router(T0 + 1)))
    ingest(pw, 1, msg(router(T0 + 60_000 + 9_999)))  # end + grace not reached yet
    assert [a.key.start_ms for a in pw.due()] == []
    ingest(pw, 2, msg(router(T0 + 70_000)))  # = end + grace
    assert [a.key.start_ms for a in pw.due()] == [T0]


def test_late_within_grace_is_merged_after_close_is_dead_lettered(pw: PartitionWindows) -> None:
    ingest(pw, 0, msg(router(T0 + 1)))
    ingest(pw, 1, msg(router(T0 + 65_000)))
    r = ingest(pw, 2, msg(router(T0 + 30)))  # within grace: merged
    assert r.counts.accepted == 1
    ingest(pw, 3, msg(router(T0 + 70_000)))
    due = pw.due()
    assert due[0].requests == 2
    pw.mark_closed(due)
    r = ingest(pw, 4, msg(router(T0 + 40), router(T0 + 70_001)))
    assert (r.counts.late, r.counts.accepted) == (1, 1)
    assert r.dead[0].kind == "late" and r.dead[0].index == 0 and "closed" in r.dead[0].reason


def test_idle_partition_closes_on_wall_clock(pw: PartitionWindows, clock: ManualClock) -> None:
    ingest(pw, 0, msg(router(T0 + 1)))
    clock.set(T0 + 30_000)  # idle long enough, but the wall clock is before end + grace
    assert pw.due() == []
    clock.set(T0 + 50_000)
    ingest(pw, 1, msg(router(T0 + 2, app="other")))  # input keeps the partition busy
    clock.set(T0 + 79_999)  # past end + grace, but only 29.999 s idle
    assert pw.due() == []
    clock.set(T0 + 80_000)
    assert sorted(a.key.app for a in pw.due()) == ["other", "shop"]


def test_an_unreachable_broker_is_not_idleness(pw: PartitionWindows, clock: ManualClock) -> None:
    """While the broker's end offset is unknown, producers may hold this minute's last
    seconds: the quiet time starts again once the broker is back (found by tests/integration/
    test_broker_faults.py, where the minute closed during the outage and its tail was dead-lettered)."""
    ingest(pw, 0, msg(router(T0 + 1)))
    clock.set(T0 + 75_000)
    pw.end_unknown()  # the broker went away at T0 + 1 s; still away 74 s later
    assert pw.due(caught_up=False) == []
    clock.set(T0 + 104_999)  # back, and caught up: quiet 29.999 s since its end was last unknown
    assert pw.due() == []
    ingest(pw, 1, msg(router(T0 + 59_000)))  # the minute's tail, from a producer's buffer: not late
    clock.set(T0 + 134_998)
    assert pw.due() == []
    clock.set(T0 + 134_999)
    [agg] = pw.due()
    assert agg.summary()["requests"] == 2


def test_backlog_replay_does_not_close_on_wall_clock(pw: PartitionWindows, clock: ManualClock) -> None:
    """Hours-old data consumed now: the partition is busy, so only event time closes windows."""
    clock.set(T0 + 3 * 3600_000)
    ingest(pw, 0, msg(router(T0 + 1)))
    clock.advance(1_000)
    ingest(pw, 1, msg(router(T0 + 50_000)))
    assert pw.due() == []
    ingest(pw, 2, msg(router(T0 + 70_000)))
    assert [a.key.start_ms for a in pw.due()] == [T0]


def test_quiet_app_closes_when_partition_moves_on(pw: PartitionWindows) -> None:
    ingest(pw, 0, msg(router(T0 + 1, app="quiet")))
    ingest(pw, 1, msg(router(T0 + 60_000 + 10_000 + 29_999, app="busy")))
    assert [a.key.app for a in pw.due()] == []
    ingest(pw, 2, msg(router(T0 + 60_000 + 10_000 + 30_000, app="busy")))
    assert [a.key.app for a in pw.due()] == ["quiet"]


def test_replayed_offsets_are_not_counted_twice(pw: PartitionWindows) -> None:
    ingest(pw, 5, msg(router(T0 + 1), router(T0 + 2)))
    r = ingest(pw, 5, msg(router(T0 + 1), router(T0 + 2)))
    assert r.counts.skipped_replay == 1 and r.counts.accepted == 0
    assert sum(a.requests for a in pw.windows.values()) == 2


def test_window_offset_guards_partial_persistence(pw: PartitionWindows, clock: ManualClock) -> None:
    """Window persisted, partition/app offsets not: the window-level offset still skips the replay."""
    ingest(pw, 7, msg(router(T0 + 1)))
    agg = next(iter(pw.windows.values()))
    fresh = PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                             max_message_bytes=1_000_000, max_centroids=100)
    fresh.restore([agg], {}, -1)
    r = IngestResult()
    fresh.ingest(7, msg(router(T0 + 1), router(T0 + 60_001)), r)
    assert r.counts.skipped_replay == 1 and r.counts.accepted == 1
    assert agg.requests == 1


@pytest.mark.parametrize("bad,reason", [
    (b"{not json", "malformed JSON"),
    (b"42", "JSON object or array"),
    (b"x" * 2_000_000, "exceeds"),
])
def test_whole_message_rejects(pw: PartitionWindows, bad: bytes, reason: str) -> None:
    r = ingest(pw, 0, bad)
    assert r.counts.rejected == 1 and reason in r.dead[0].reason and r.dead[0].index == -1


def test_bad_records_rejected_next_to_valid_ones(pw: PartitionWindows) -> None:
    good = router(T0 + 1)
    body = ("[" + ",".join([
        orjson.dumps(good).decode(),
        '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":200,"service_ms":NaN}' % (T0 + 2),
        '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":200,"service_ms":-1}' % (T0 + 3),
        '{"kind":"router","app":"shop","dyno":"web.1","ts":"yesterday","status":200,"service_ms":1}',
        '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":200,"service_ms":Infinity}' % (T0 + 4),
        '{"kind":"teleport","app":"shop","dyno":"web.1","ts":%d}' % (T0 + 5),
        '{"kind":"router","app":"shop|x","dyno":"web.1","ts":%d,"status":200,"service_ms":1}' % (T0 + 6),
        '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":700,"service_ms":1}' % (T0 + 7),
        '{"kind":"metric","app":"shop","dyno":"web.1","ts":%d,"name":"q","type":"histo","value":1}' % (T0 + 8),
        '{"kind":"runtime","app":"shop","dyno":"web.1","ts":%d}' % (T0 + 9),
        '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":200,"service_ms":1}' % (T0 + 10**9),
        '"just a string"',
        orjson.dumps(good).decode(),
    ]) + "]").encode()
    r = ingest(pw, 0, body)
    assert r.counts.accepted == 2
    assert r.counts.rejected == 11
    assert sorted(d.index for d in r.dead) == list(range(1, 12))
    assert all(d.reason for d in r.dead)
    assert sum(a.requests for a in pw.windows.values()) == 2


def test_runtime_and_custom_metrics(pw: PartitionWindows) -> None:
    base = {"app": "shop", "dyno": "web.1"}
    ingest(pw, 0, msg(
        {**base, "kind": "runtime", "ts": T0 + 1, "memory_rss_mb": 100.0, "memory_swap_mb": 0.0,
         "memory_total_mb": 110.0, "memory_quota_mb": 512.0, "load_avg_1m": 0.5},
        {**base, "kind": "runtime", "ts": T0 + 2, "memory_rss_mb": 300.0, "load_avg_1m": 1.5},
        {**base, "kind": "metric", "ts": T0 + 3, "name": "db.query_ms", "type": "timer", "value": 3.0},
        {**base, "kind": "metric", "ts": T0 + 4, "name": "jobs", "type": "counter", "value": 2},
        {**base, "kind": "metric", "ts": T0 + 6, "name": "queue", "type": "gauge", "value": 7},
        {**base, "kind": "metric", "ts": T0 + 5, "name": "queue", "type": "gauge", "value": 9},
    ))
    point = next(iter(pw.windows.values())).summary()
    assert point["memory_mb"] == {"rss_mean": 200.0, "rss_max": 300.0, "swap_mean": 0.0, "swap_max": 0.0,
                                  "total_mean": 110.0, "total_max": 110.0, "quota": 512.0}
    assert point["load"] == {"mean": 1.0, "max": 1.5}
    assert point["metrics"]["db.query_ms"]["count"] == 1
    assert point["metrics"]["jobs"] == {"type": "counter", "sum": 2.0}
    assert point["metrics"]["queue"] == {"type": "gauge", "mean": 8.0, "max": 9.0, "last": 7.0}
    assert "requests" not in point


_DYNOS = ["web.1", "web.2", "router", "worker.1", "web 3"]  # the last is invalid
_obs = st.one_of(
    st.builds(lambda dt, app, dyno, status, svc, code: router(T0 + dt, app=app, dyno=dyno, status=status,
                                                              svc=svc, code=code),
              st.integers(-20_000, 200_000), st.sampled_from(["shop", "shop", "shop", "blog"]),
              st.sampled_from(_DYNOS), st.sampled_from([200, 200, 200, 302, 404, 503]),
              st.sampled_from([1.0, 2.5, 12.0, 30_000.0, None]), st.sampled_from([None, None, None, "H12", "H13"])),
    st.builds(lambda dt: {"kind": "runtime", "app": "shop", "dyno": "web.1", "ts": T0 + dt, "memory_rss_mb": 5.0},
              st.integers(0, 200_000)),
    st.builds(lambda dt, v: {"kind": "metric", "app": "shop", "dyno": "web.1", "ts": T0 + dt, "name": "q",
                             "type": "gauge", "value": v}, st.integers(0, 200_000), st.floats(0, 10)),
    st.builds(lambda dt, name: {"kind": "event", "app": "shop", "dyno": "web.2", "ts": T0 + dt, "name": name},
              st.integers(0, 200_000), st.sampled_from(["R14", "crash"])),
    st.builds(lambda dt, v: {"kind": "addon", "app": "shop", "ts": T0 + dt, "source": "DATABASE",
                             "samples": {"db_size_mb": v}}, st.integers(0, 200_000), st.floats(0, 1e6)),
)


@st.composite
def _clean_message(draw: Any) -> list[dict[str, Any]]:
    """One app's requests over a few seconds (the shape the column fold takes), maybe with a sample."""
    app = draw(st.sampled_from(["shop", "blog"]))
    base = draw(st.sampled_from([0, 55_000, 61_000, 118_000]))  # some straddle a minute boundary
    dynos = draw(st.sampled_from([["web.1", "web.2", "router"], ["web.1", "worker.1"]]))
    out = [router(T0 + base + draw(st.integers(0, 4_000)), app=app, dyno=draw(st.sampled_from(dynos)),
                  status=draw(st.sampled_from([200, 200, 404, 503])),
                  svc=draw(st.sampled_from([1.0, 7.25, 30.0, None])), code=draw(st.sampled_from([None, None, "H12"])))
           for _ in range(draw(st.integers(1, 40)))]
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), draw(_obs))
    return out


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(st.one_of(_clean_message(), st.lists(_obs, min_size=1, max_size=40)),
                         min_size=1, max_size=12),
       replays=st.lists(st.integers(0, 11), max_size=3))
def test_column_fold_equals_one_by_one(messages: list[list[dict[str, Any]]], replays: list[int]) -> None:
    """The column-wise router fold (_fold_routers) and the per-observation path give identical state."""
    clock = ManualClock(T0 + 120_000)
    both = [PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=60_000,
                             max_message_bytes=1_000_000, max_centroids=100, column_min=n) for n in (4, 10**9)]
    outcomes: list[list[Any]] = [[], []]
    offsets = list(range(len(messages))) + [o for o in replays if o < len(messages)]
    for step, offset in enumerate(offsets):
        value = msg(*messages[offset])
        for pw, out in zip(both, outcomes, strict=True):
            r = ingest(pw, offset, value)
            out.append((r.counts, [(d.kind, d.reason, d.offset, d.index, d.app) for d in r.dead]))
            if step % 3 == 2:  # close what is due now and then, so later messages meet closed minutes
                closed = pw.due()
                out.append([a.to_record() for a in closed])
                pw.mark_closed(closed)
    fast, slow = both
    assert outcomes[0] == outcomes[1]
    assert {k: a.to_record() for k, a in fast.windows.items()} == {k: a.to_record() for k, a in slow.windows.items()}
    assert {a: p.to_record() for a, p in fast.apps.items()} == {a: p.to_record() for a, p in slow.apps.items()}
    assert (fast.offset, fast.wm_ms) == (slow.offset, slow.wm_ms)


# --- hostile input: every bad record dead-lettered with a reason, every valid neighbour counted --------------------

_BAD_VALUES = st.sampled_from([None, "", "x" * 5000, -1, 10**30, 1e308, "NaN ms", [], {}, {"$gt": 0}, [[[[1]]]], True,
                               "web 1", "a#b", "\u0000", "\U0001F600" * 50])
_HOSTILE_ELEMENT = st.one_of(
    # a valid request with one field replaced by a value no field accepts, or removed
    st.builds(lambda field, value, drop: {k: v for k, v in {**router(T0 + 5), field: value}.items()
                                          if not (drop and k == field)},
              st.sampled_from(["app", "dyno", "ts", "status", "kind"]), _BAD_VALUES, st.booleans()),
    st.builds(lambda v: {**router(T0 + 5), "service_ms": v}, st.sampled_from([-1, 10**12, "1ms", [], True])),
    st.builds(lambda name, v: {"kind": "metric", "app": "shop", "dyno": "web.1", "ts": T0 + 5, "name": name,
                               "type": "timer", "value": v},
              st.sampled_from(["", " x", "a" * 300, "\n"]), st.floats(allow_nan=True) | st.just(-5.0)),
    st.builds(lambda samples: {"kind": "addon", "app": "shop", "ts": T0 + 5, "source": "DB", "samples": samples},
              st.sampled_from([{}, {"Bad Name": 1.0}, {f"s{i}": 1.0 for i in range(65)}, {"x": "1"}])),
    st.builds(lambda name: {"kind": "event", "app": "shop", "dyno": "web.1", "ts": T0 + 5, "name": name},
              st.sampled_from(["R1", "deploy", "", None])),
    # not an object at all
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20), st.lists, max_leaves=20),
)


@settings(max_examples=500 if os.environ.get("MINUTELY_CHAOS") else 50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _HOSTILE_ELEMENT), min_size=150, max_size=250))
def test_hostile_records_are_each_dead_lettered_and_their_valid_neighbours_counted(
        elements: list[tuple[bool, Any]]) -> None:
    """~10,000 records over the examples: hostile ones (bad types, values, names, kinds, sizes, non-objects)
    interleaved with valid requests. Nothing raises, each hostile record is dead-lettered with a reason and its
    position, and exactly the valid ones are counted."""
    pw = PartitionWindows(0, clock=ManualClock(T0), grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                          max_message_bytes=4_000_000, max_centroids=100)
    records = [router(T0 + i) if valid else bad for i, (valid, bad) in enumerate(elements)]
    r = ingest(pw, 0, json.dumps(records).encode())  # the stdlib writes what orjson cannot: NaN, huge ints
    valid = [i for i, (ok, _) in enumerate(elements) if ok]
    assert r.counts.accepted == len(valid)
    assert sorted(d.index for d in r.dead) == [i for i, (ok, _) in enumerate(elements) if not ok]
    assert all(d.reason for d in r.dead)
    assert sum(a.requests for a in pw.windows.values()) == len(valid)


def test_deep_nesting_and_a_10_mb_message_are_refused_whole(pw: PartitionWindows) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    r = ingest(pw, 0, deep)
    assert r.counts.rejected == 1 and "malformed JSON" in r.dead[0].reason
    big = orjson.dumps([router(T0 + 1)] * 80_000)  # ~10 MB of valid records: over the 1 MB limit of the fixture
    assert len(big) > 9_000_000
    r = ingest(pw, 1, big)
    assert r.counts.rejected == 1 and "exceeds" in r.dead[0].reason and len(str(r.dead[0].record)) <= 2048
    r = ingest(pw, 2, msg(router(T0 + 2)))  # and the partition goes on
    assert r.counts.accepted == 1


def limited(**given: int) -> Any:
    """A ``limits_of`` giving every app the defaults with ``given`` overridden."""
    from dataclasses import replace

    from app.limits import AppLimits
    from app.settings import Settings

    lim = replace(AppLimits.defaults(Settings().limits), **given)
    return lambda app: lim


def test_custom_metric_names_are_capped_per_minute(clock: ManualClock) -> None:
    pw = PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                          max_message_bytes=1_000_000, max_centroids=100, limits_of=limited(max_metric_names=3))
    metric = {"kind": "metric", "app": "shop", "dyno": "web.1", "type": "counter", "value": 1.0}
    r = ingest(pw, 0, msg(*[{**metric, "ts": T0 + i, "name": f"user.{i}"} for i in range(5)],
                          {**metric, "ts": T0 + 9, "name": "user.0"}, {**metric, "ts": T0 + 60_000, "name": "user.4"}))
    assert r.counts.accepted == 5 and r.counts.rejected == 2
    assert {d.index for d in r.dead} == {3, 4} and "METRICS_MAX_METRIC_NAMES" in r.dead[0].reason
    assert pw.windows[("shop", "web", T0)].counters == {"user.0": 2.0, "user.1": 1.0, "user.2": 1.0}
    assert pw.windows[("shop", "web", T0 + 60_000)].counters == {"user.4": 1.0}  # a new minute, a new count


# --- per-app limits (security review H1) ------------------------------------------------------------------

def _limited_pw(clock: ManualClock, limits_of: Any) -> PartitionWindows:
    return PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                            max_message_bytes=1_000_000, max_centroids=100, limits_of=limits_of)


@pytest.mark.parametrize("column", [True, False])
def test_process_types_are_capped_per_app_and_minute_other_apps_exact(clock: ManualClock, column: bool) -> None:
    pw = _limited_pw(clock, limited(max_process_types=3))
    if not column:
        pw.column_min = 10**9
    flood = [router(T0 + i, app="flood", dyno=f"p{i}.1") for i in range(20)]
    r = ingest(pw, 0, msg(*flood, *[router(T0 + i, app="shop", dyno=f"w{i % 3}.1") for i in range(20)]))
    assert {k[1] for k in pw.windows if k[0] == "flood"} == {"p0", "p1", "p2"}
    assert r.counts.refused_by_limit() == [17, 0, 0] and r.counts.rejected == 17 and r.counts.accepted == 23
    assert sum(a.requests for k, a in pw.windows.items() if k[0] == "shop") == 20  # the other app: exact
    refused = [d for d in r.dead if d.app == "flood"]
    assert len(refused) == 17 and "more than 3 process types" in refused[0].reason
    assert "'p3.1'" in refused[0].reason and "METRICS_LIMITS_FILE" in refused[0].reason
    # An app in a column-wise message (one app, many requests) goes the same way; a known process type too.
    r = ingest(pw, 1, msg(*[router(T0 + 100 + i, app="flood", dyno="p1.1") for i in range(20)],
                          router(T0 + 200, app="flood", dyno="p9.1")))
    assert r.counts.accepted == 20 and r.counts.refused_by_limit() == [1, 0, 0]
    assert pw.windows[("flood", "p1", T0)].requests == 21
    # The next minute has its own count; closing a minute frees its process types.
    r = ingest(pw, 2, msg(*[router(T0 + 60_000 + i, app="flood", dyno=f"q{i}.1") for i in range(4)]))
    assert r.counts.refused_by_limit() == [1, 0, 0]
    pw.mark_closed([a for a in pw.windows.values() if a.key.start_ms == T0])
    assert ("flood", T0) not in pw.procs and pw.procs[("flood", T0 + 60_000)] == 3
    assert not any(k[1] == T0 for k in pw.refused)


def test_refusals_past_the_dead_letter_cap_are_counted_only(pw: PartitionWindows, clock: ManualClock) -> None:
    pw = _limited_pw(clock, limited(max_process_types=1))
    r = ingest(pw, 0, msg(*[router(T0 + i % 50_000, app="flood", dyno=f"p{i}.1") for i in range(1_000)]))
    assert r.counts.refused_by_limit() == [999, 0, 0] and r.counts.rejected == 999
    assert len(r.dead) == 100 and "only counted (limit_refused_process_types)" in r.dead[-1].reason
    assert len(pw.windows) == 1  # refusing costs no state


def test_addon_sources_are_capped_per_app_and_minute(clock: ManualClock) -> None:
    pw = _limited_pw(clock, limited(max_addon_sources=2))
    addon = {"kind": "addon", "app": "shop", "samples": {"db_size": 1.0}}
    r = ingest(pw, 0, msg(*[{**addon, "ts": T0 + i, "source": f"DB{i}"} for i in range(4)],
                          {**addon, "ts": T0 + 9, "source": "DB0"}))
    assert r.counts.accepted == 3 and r.counts.refused_by_limit() == [0, 2, 0]
    assert "more than 2 add-on sources" in r.dead[0].reason and "'DB2'" in r.dead[0].reason
    assert set(pw.windows[("shop", "app", T0)].addons) == {"DB0", "DB1"}
    assert not pw.procs  # the add-on series is not a process type


def test_a_limit_override_applies_to_one_app_and_without_a_restart(clock: ManualClock) -> None:
    from app.limits import Limits, parse_overrides
    from app.settings import Settings

    limits = Limits(Settings.of(limit_process_types=2).limits)
    pw = _limited_pw(clock, limits.of)
    six = [router(T0 + i, app=a, dyno=f"p{i}.1") for a in ("shop", "blog") for i in range(6)]
    r = ingest(pw, 0, msg(*six))
    assert r.counts.refused_by_limit() == [8, 0, 0]
    assert r.counts.refused == {("shop", 0): 4, ("blog", 0): 4}  # counted per app
    limits._overrides = parse_overrides({"overrides": {"shop": {"max_process_types": 5}}}, limits.defaults)
    r = ingest(pw, 1, msg(*[{**o, "ts": o["ts"] + 100} for o in six]))
    assert r.counts.refused_by_limit() == [1 + 4, 0, 0]
    assert len({k[1] for k in pw.windows if k[0] == "shop"}) == 5
    assert len({k[1] for k in pw.windows if k[0] == "blog"}) == 2


def test_restore_recounts_process_types(clock: ManualClock) -> None:
    pw = _limited_pw(clock, limited(max_process_types=2))
    ingest(pw, 0, msg(router(T0, dyno="a.1"), router(T0, dyno="b.1")))
    fresh = _limited_pw(clock, limited(max_process_types=2))
    fresh.restore(list(pw.windows.values()), dict(pw.apps), pw.offset)
    r = ingest(fresh, 1, msg(router(T0 + 1, dyno="c.1"), router(T0 + 2, dyno="a.1")))
    assert r.counts.refused_by_limit() == [1, 0, 0] and r.counts.accepted == 1


def test_dyno_and_app_caches_are_bounded_lrus() -> None:
    from app import models

    assert models.process_type("x" * 101) is None and models.process_type("web.1") == "web"
    assert not models.valid_app("a" * 101) and models.valid_app("shop")
    for i in range(models._CACHE_MAX + 10):
        models.process_type(f"junk{i}.1")
    info = models._proc_of_dyno.cache_info()
    assert info.currsize == models._CACHE_MAX and info.maxsize == models._CACHE_MAX
    models.process_type("web.1")  # still cached after junk: a fresh entry, not "cache full forever"
    assert models._proc_of_dyno.cache_info().currsize == models._CACHE_MAX


def test_rejects_carry_their_app_and_a_replayed_app_skips_them(pw: PartitionWindows, clock: ManualClock) -> None:
    """The decode judges the records (app/models.py); the dead letters name the app when only another rule
    failed, and a replay an app already applied (crash between table writes) does not dead-letter them again."""
    value = msg(router(T0 + 1), router(T0 + 2, dyno="web 1"), router(T0 + 3, app="a|b"))
    r = ingest(pw, 4, value)
    assert [(d.index, d.app, d.reason) for d in r.dead] == [
        (1, "shop", "dyno must look like web.1"), (2, None, "app must be 1..100 characters of [A-Za-z0-9._-]")]
    fresh = PartitionWindows(0, clock=clock, grace_ms=10_000, idle_timeout_ms=30_000, max_future_ms=300_000,
                             max_message_bytes=1_000_000, max_centroids=100)
    fresh.restore([], dict(pw.apps), -1)  # app progress persisted, partition offset not
    r = ingest(fresh, 4, value)
    assert (r.counts.skipped_replay, r.counts.rejected, r.counts.accepted) == (2, 1, 0)
    assert [d.app for d in r.dead] == [None]
