"""Monitor state machines (app/alerting/monitors.py) and their input (app/alerting/minute.py), on scripted
minutes.

Every timeline lists its minutes explicitly and expects the exact events: (event, minute index, value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson
import pytest

from app.alerting.minute import Minute
from app.alerting.monitors import ERROR_RATE, LATENCY, AppMonitors, Monitor, MonitorConfig
from app.alerting.targets import Targets, Webhook, redact_url, redacted
from tables.aggregate import Aggregate, BucketKey

T0 = 1_764_000_000_000 - 1_764_000_000_000 % 60_000
MID = "mon_000000000001"


def minute(i: int, p95: float | None = 100.0, *, requests: int = 100, failed: int = 0, proc: str = "web",
           app: str = "shop") -> Minute:
    return Minute(app, proc, T0 + i * 60_000, requests, failed, p95 if requests else None)


def latency(threshold: float = 500, sensitivity: int = 5, every: int = 5, *, proc: str = "web",
            mid: str = MID, targets: Targets | None = None) -> MonitorConfig:
    return MonitorConfig(mid, proc, LATENCY, threshold, sensitivity, every, targets or Targets())


def error_rate(threshold: float = 0.05, sensitivity: int = 1, every: int = 5) -> MonitorConfig:
    return MonitorConfig(MID, "web", ERROR_RATE, threshold, sensitivity, every)


def run(m: Monitor, minutes: Sequence[Minute]) -> list[tuple[str, int, float | None]]:
    out = []
    for mi in minutes:
        for e in m.observe(mi.app, mi):
            out.append((e.event, (e.minute_start_ms - T0) // 60_000, e.value))
    return out


def p95s(values: Mapping[int, float]) -> list[Minute]:
    return [minute(i, v) for i, v in sorted(values.items())]


# --- sensitivity ------------------------------------------------------------------------------------------

def test_four_minutes_above_threshold_do_not_fire_at_sensitivity_5() -> None:
    m = Monitor(latency(500, 5))
    timeline = p95s({0: 800, 1: 800, 2: 800, 3: 800, 4: 100, 5: 800, 6: 800, 7: 800, 8: 800, 9: 499.9})
    assert run(m, timeline) == []
    assert m.state.status == "ok" and m.state.streak == 0


def test_five_minutes_above_threshold_fire_on_the_fifth() -> None:
    m = Monitor(latency(500, 5))
    events = []
    for mi in p95s({0: 800, 1: 700, 2: 600, 3: 900, 4: 650}):
        events.extend(m.observe("shop", mi))
    assert [(e.event, e.minute_start_ms) for e in events] == [("firing", T0 + 4 * 60_000)]
    e = events[0]
    assert e.to_record() == {
        "event_id": f"shop/{MID}/{T0 + 240_000}/firing", "event": "firing", "app": "shop",
        "process_type": "web", "monitor_id": MID, "metric": "LATENCY", "minute_start_ms": T0 + 240_000,
        "value": 650.0, "requests": 100, "threshold": 500.0, "sensitivity_min": 5,
        "firing_since_ms": T0 + 240_000}


@pytest.mark.parametrize("sensitivity", [1, 5, 10])
def test_fires_after_exactly_sensitivity_minutes(sensitivity: int) -> None:
    m = Monitor(latency(500, sensitivity, every=60))
    assert run(m, [minute(i, 501) for i in range(12)]) == [("firing", sensitivity - 1, 501.0)]


def test_threshold_is_inclusive() -> None:
    assert run(Monitor(latency(500, 1)), [minute(0, 500.0)]) == [("firing", 0, 500.0)]
    assert run(Monitor(latency(500, 1)), [minute(0, 499.99)]) == []


# --- notification frequency while firing --------------------------------------------------------------------

def test_reminders_every_5_minutes_while_firing() -> None:
    m = Monitor(latency(500, 5, every=5))
    events = run(m, [minute(i, 800) for i in range(21)])
    assert events == [("firing", 4, 800.0), ("still_firing", 9, 800.0), ("still_firing", 14, 800.0),
                      ("still_firing", 19, 800.0)]


def test_reminders_every_60_and_1440_minutes() -> None:
    hourly = Monitor(latency(500, 1, every=60))
    assert run(hourly, [minute(i, 800) for i in range(130)]) == [
        ("firing", 0, 800.0), ("still_firing", 60, 800.0), ("still_firing", 120, 800.0)]
    daily = Monitor(latency(500, 1, every=1440))
    assert run(daily, [minute(i, 800) for i in range(1441)]) == [("firing", 0, 800.0),
                                                                 ("still_firing", 1440, 800.0)]


# --- resolve -------------------------------------------------------------------------------------------------

def test_resolves_on_first_good_minute_and_needs_a_new_streak_to_fire_again() -> None:
    m = Monitor(latency(500, 5, every=60))
    timeline = p95s({0: 800, 1: 800, 2: 800, 3: 800, 4: 800, 5: 900, 6: 120,
                     7: 800, 8: 800, 9: 800, 10: 800, 11: 800})
    assert run(m, timeline) == [("firing", 4, 800.0), ("resolved", 6, 120.0), ("firing", 11, 800.0)]
    assert m.state.status == "firing" and m.state.firing_since_ms == T0 + 11 * 60_000


def test_resolved_event_names_when_the_firing_started() -> None:
    m = Monitor(latency(500, 1))
    events = [e for mi in p95s({0: 800, 1: 800, 2: 100}) for e in m.observe("shop", mi)]
    assert [(e.event, e.firing_since_ms) for e in events] == [("firing", T0), ("resolved", T0)]
    assert m.state.status == "resolved" and m.state.firing_since_ms is None


# --- error rate and minutes without traffic ------------------------------------------------------------------

def test_error_rate_zero_traffic_never_fires() -> None:
    m = Monitor(error_rate(0.005, sensitivity=1))
    quiet = [minute(i, requests=0) for i in range(10)]
    assert run(m, quiet) == []
    assert m.state.status == "ok"


def test_error_rate_fires_and_a_minute_without_traffic_resolves() -> None:
    m = Monitor(error_rate(0.01, sensitivity=1))
    timeline = [minute(0, requests=100, failed=0), minute(1, requests=100, failed=1),
                minute(2, requests=200, failed=1), minute(3, requests=10, failed=5), minute(4, requests=0),
                minute(5, requests=1, failed=1)]
    assert run(m, timeline) == [("firing", 1, 0.01), ("resolved", 2, 0.005), ("firing", 3, 0.5),
                                ("resolved", 4, None), ("firing", 5, 1.0)]


def test_zero_traffic_minutes_break_a_streak() -> None:
    m = Monitor(error_rate(0.1, sensitivity=5))
    timeline = [minute(0, requests=10, failed=5), minute(1, requests=10, failed=5), minute(2, requests=0),
                minute(3, requests=10, failed=5), minute(4, requests=10, failed=5), minute(5, requests=10, failed=5),
                minute(6, requests=10, failed=5), minute(7, requests=10, failed=5)]
    assert run(m, timeline) == [("firing", 7, 0.5)]


def test_missing_minutes_count_as_no_traffic() -> None:
    m = Monitor(latency(500, 5))
    # Minute 4 produced no record at all: the streak 0..3 is broken, 5..9 fires.
    timeline = p95s({0: 800, 1: 800, 2: 800, 3: 800, 5: 800, 6: 800, 7: 800, 8: 800, 9: 800})
    assert run(m, timeline) == [("firing", 9, 800.0)]
    # While firing, a gap resolves at the first minute without a record.
    assert run(m, p95s({13: 800})) == [("resolved", 10, None)]


# --- at-least-once input, process types -----------------------------------------------------------------------

def test_replayed_and_older_minutes_are_ignored() -> None:
    m = Monitor(latency(500, 5))
    timeline = [minute(i, 800) for i in range(5)]
    assert run(m, timeline) == [("firing", 4, 800.0)]
    assert run(m, [minute(4, 800), minute(3, 100), minute(4, 100)]) == []
    assert m.state.status == "firing" and m.state.last_minute_ms == T0 + 4 * 60_000


def test_other_process_types_interleave_without_effect() -> None:
    doc = AppMonitors({MID: Monitor(latency(500, 2))})
    # worker minutes arrive before and after web minutes of the same or earlier start.
    seq = [minute(1, 900, proc="worker"), minute(0, 800), minute(0, 100, proc="worker"), minute(1, 800),
           minute(2, 100, proc="worker")]
    events = [e for mi in seq for e in doc.observe(mi)]
    assert [(e.event, e.process_type, e.minute_start_ms) for e in events] == [("firing", "web", T0 + 60_000)]


# --- restart ----------------------------------------------------------------------------------------------------

def test_restart_mid_timeline_neither_repeats_nor_misses_events() -> None:
    timeline = p95s({i: 800 for i in range(12)} | {12: 100, 13: 100})
    reference = AppMonitors({MID: Monitor(latency(500, 5, every=5))})
    expected = [e for mi in timeline for e in reference.observe(mi)]
    assert [(e.event, (e.minute_start_ms - T0) // 60_000) for e in expected] == [
        ("firing", 4), ("still_firing", 9), ("resolved", 12)]

    doc = AppMonitors({MID: Monitor(latency(500, 5, every=5))})
    got = [e for mi in timeline[:7] for e in doc.observe(mi)]
    stored = doc.to_bytes()
    # The restarted worker reads the table and is redelivered minutes 5 and 6 (uncommitted offsets).
    restored = AppMonitors.from_bytes(stored)
    got += [e for mi in timeline[5:] for e in restored.observe(mi)]
    assert got == expected


# --- definitions -------------------------------------------------------------------------------------------------

def test_replacing_a_definition_keeps_state_and_applies_from_the_next_minute() -> None:
    doc = AppMonitors()
    doc.put(latency(500, 1))
    assert [e.event for mi in p95s({0: 800, 1: 800}) for e in doc.observe(mi)] == ["firing"]
    doc.put(latency(1000, 1))  # raised above the current latency: resolves at the next minute
    assert doc.monitors[MID].state.status == "firing"
    assert [(e.event, e.threshold) for e in doc.observe(minute(2, 800))] == [("resolved", 1000.0)]


# --- notification targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T0001/B0002/XXXXsecret", "https://hooks.slack.com/…"),
    ("https://discord.com/api/webhooks/1/XXXXsecret?wait=true", "https://discord.com/…"),
    ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/…"),
    ("https://user:pw@[2606:4700::1111]:8443/h", "https://[2606:4700::1111]:8443/…"),
])
def test_webhook_urls_are_redacted_for_readers(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    full = Monitor(latency(targets=Targets((), (Webhook(url, "s" * 16),)))).public()
    assert full["webhooks"] == [{"url": url, "secret_set": True}]  # the writer's answer
    assert redacted(full) == {**full, "webhooks": [{"url": shown, "secret_set": True}]}
    assert redacted(Monitor(latency()).public())["webhooks"] == []


# --- input -----------------------------------------------------------------------------------------------------

def test_minute_from_aggregate() -> None:
    agg = Aggregate(BucketKey("shop", "web", T0), max_centroids=100)
    for i in range(100):
        agg.add_request(503 if i < 3 else 200, float(i + 1), None)
    mi = Minute.from_record(orjson.loads(orjson.dumps(agg.to_record())))
    assert (mi.requests, mi.failed, mi.error_rate) == (100, 3, 0.03)
    assert mi.p95_ms is not None and abs(mi.p95_ms - 95.5) <= 1.0
    empty = Aggregate(BucketKey("shop", "web", T0), max_centroids=100)
    empty.add_runtime(100.0, 0.0, 120.0, 512.0, 0.2)
    assert Minute.from_aggregate(empty) == Minute("shop", "web", T0, 0, 0, None)


def test_a_minute_of_router_errors_without_service_time_has_an_error_rate_and_no_p95() -> None:
    """H10/H14 minutes (the app is down, the router answers): every request failed, none was timed. Error-rate
    monitors see 100 %; latency monitors and autoscaling see no p95 rather than a 0 ms one."""
    agg = Aggregate(BucketKey("shop", "web", 60_000))
    for _ in range(30):
        agg.add_request(503, None, "H10")
    agg.add_request(200, 12.0, None)
    m = Minute.from_aggregate(agg)
    assert (m.requests, m.failed, m.p95_ms) == (31, 30, 12.0)
    down = Aggregate(BucketKey("shop", "web", 120_000))
    for _ in range(30):
        down.add_request(503, None, "H14")
    m = Minute.from_aggregate(down)
    assert (m.requests, m.failed, m.p95_ms, m.error_rate) == (30, 30, None, 1.0)
