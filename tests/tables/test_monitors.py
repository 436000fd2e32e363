"""Monitor state machines (tables/monitors.py) and the alert engine (agents/alerts.py), on scripted minutes.

Every timeline lists its minutes explicitly and expects the exact events: (event, minute index, value).
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator, Mapping, Sequence

import orjson
import pytest
from cryptography.fernet import Fernet

from agents.alerts import AlertEngine, Outbox, doc_key, partition_for
from app.api.policies import CommandResults
from app.clock import ManualClock
from app.notify.delivery import Delivery, DeliveryFailed
from app.sealing import SealedSecret, SecretBox, key_id, use_secrets_key
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey
from tables.monitors import (
    ERROR_RATE,
    LATENCY,
    MONITOR_CREATE,
    MONITOR_DELETE,
    MONITOR_DELETED,
    MONITOR_REPLACE,
    AlertEvent,
    AppMonitors,
    AppPolicies,
    Command,
    Minute,
    Monitor,
    MonitorConfig,
    PolicyConfig,
    Targets,
    ValidationError,
    Webhook,
    apply_monitor_command,
    parse_monitor,
    redact_url,
    redacted,
)

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


VALID: dict[str, Any] = {"metric": "LATENCY", "threshold": 500, "sensitivity_min": 5, "notify_every_min": 60}


@pytest.mark.parametrize("change, field", [
    ({"metric": "CPU"}, "metric"),
    ({"threshold": 49}, "threshold"),
    ({"threshold": "500"}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"metric": "ERROR_RATE", "threshold": 0.001}, "threshold"),
    ({"metric": "ERROR_RATE", "threshold": 1.5}, "threshold"),
    ({"sensitivity_min": 3}, "sensitivity_min"),
    ({"sensitivity_min": 5.0}, "sensitivity_min"),
    ({"notify_every_min": 30}, "notify_every_min"),
    ({"process_type": "web 1"}, "process_type"),
    ({"email": ["not-an-address"]}, "email"),
    ({"email": "ops@example.com"}, "email"),
    ({"email": ["a@example.com\r\nBcc: x@example.com"]}, "email"),
    ({"email": ["ops@example.com\n"]}, "email"),  # "$" accepted it: a blank line ending the headers
    ({"email": ["ops@example.com\r\n"]}, "email"),
    ({"email": ["öps@example.com"]}, "email"),
    ({"email": ["ops team@example.com"]}, "email"),
    ({"email": ["\"ops\"@example.com"]}, "email"),
    ({"webhooks": [{"url": "ftp://example.com/x", "secret": "s" * 16}]}, "webhooks.url"),
    ({"webhooks": [{"url": "https://example.com/x", "secret": "short"}]}, "webhooks.secret"),
    ({"webhooks": [{"url": "https://example.com/x"}]}, "secret"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_definitions_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_monitor({**VALID, **change}, monitor_id=MID)
    assert info.value.field == field


def test_missing_fields_and_defaults() -> None:
    with pytest.raises(ValidationError) as info:
        parse_monitor({"metric": "LATENCY"}, monitor_id=MID)
    assert info.value.field == "notify_every_min"
    cfg = parse_monitor({**VALID, "metric": "ERROR_RATE", "threshold": 0.005,
                         "email": ["ops@example.com", "ops@example.com"],
                         "webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": "s" * 16}]}, monitor_id=MID)
    assert cfg.process_type == "web" and cfg.targets.email == ("ops@example.com",)
    assert cfg.public()["webhooks"] == [{"url": "http://127.0.0.1:9/hook", "secret_set": True}]
    assert MonitorConfig.from_record(cfg.to_record()) == cfg


@pytest.mark.parametrize("address", ["ops@example.com", "first.last+alerts@mail.example.co.uk",
                                     "o'brien_ops-1@example.io", "x!#$%&*/=?^`{|}~@example.com"])
def test_ascii_addresses_are_accepted(address: str) -> None:
    assert parse_monitor({**VALID, "email": [address]}, monitor_id=MID).targets.email == (address,)


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T0001/B0002/XXXXsecret", "https://hooks.slack.com/…"),
    ("https://discord.com/api/webhooks/1/XXXXsecret?wait=true", "https://discord.com/…"),
    ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/…"),
    ("https://user:pw@[2606:4700::1111]:8443/h", "https://[2606:4700::1111]:8443/…"),
])
def test_webhook_urls_are_redacted_for_readers(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    cfg = parse_monitor({**VALID, "webhooks": [{"url": url, "secret": "s" * 16}]}, monitor_id=MID)
    full = Monitor(cfg).public()
    assert full["webhooks"] == [{"url": url, "secret_set": True}]  # the writer's answer
    assert redacted(full) == {**full, "webhooks": [{"url": shown, "secret_set": True}]}
    assert redacted(parse_monitor(VALID, monitor_id=MID).public())["webhooks"] == []


def test_commands_round_trip_and_apply_idempotently() -> None:
    doc = AppMonitors()
    create = Command("c1", MONITOR_CREATE, "shop", monitor=latency())
    assert Command.from_bytes(create.to_bytes()) == create
    assert apply_monitor_command(doc, create, max_monitors=2).status == 201
    assert apply_monitor_command(doc, create, max_monitors=2).status == 201  # redelivered: same monitor
    assert list(doc.monitors) == [MID]
    other = Command("c2", MONITOR_CREATE, "shop", monitor=latency(mid="mon_000000000002"))
    third = Command("c3", MONITOR_CREATE, "shop", monitor=latency(mid="mon_000000000003"))
    assert apply_monitor_command(doc, other, max_monitors=2).status == 201
    assert apply_monitor_command(doc, third, max_monitors=2).status == 409
    changed = Command("c4", MONITOR_REPLACE, "shop", monitor=MonitorConfig(MID, "web", ERROR_RATE, 0.1, 1, 5))
    assert apply_monitor_command(doc, changed, max_monitors=2).status == 400
    unknown = Command("c5", MONITOR_REPLACE, "shop", monitor=latency(mid="mon_00000000000f"))
    assert apply_monitor_command(doc, unknown, max_monitors=2).status == 404
    delete = Command("c6", MONITOR_DELETE, "shop", monitor_id=MID)
    assert apply_monitor_command(doc, delete, max_monitors=2).status == 204
    assert apply_monitor_command(doc, delete, max_monitors=2).status == 404
    for bad in (b"{", b'{"v":1,"op":"monitor.create","app":"shop","id":"x"}', b'{"v":2}', b"[]"):
        with pytest.raises(ValueError):
            Command.from_bytes(bad)


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


def test_partition_for_matches_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(8))
    for app in ("shop", "app-0", "app-1", "blog.example", "x" * 100):
        assert partition_for(app, 8) == DefaultPartitioner()(app.encode(), parts, parts)


# --- the engine: table, topic, outbox ----------------------------------------------------------------------------

def record(i: int, latency_ms: float, *, requests: int = 50, failed: int = 0, app: str = "shop",
           proc: str = "web") -> bytes:
    agg = Aggregate(BucketKey(app, proc, T0 + i * 60_000), max_centroids=100)
    for k in range(requests):
        agg.add_request(503 if k < failed else 200, latency_ms, None)
    return orjson.dumps(agg.to_record())


class RecordingSender:
    """A real Sender implementation that records, and fails when told to (the channel under test is the
    engine's bookkeeping; tests/notify/test_notify.py sends over real sockets)."""

    def __init__(self) -> None:
        self.sent: list[Delivery] = []
        self.refuse = False
        self.hold: asyncio.Event | None = None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, d: Delivery) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse:
            raise DeliveryFailed("refused")
        self.sent.append(d)


class Harness:
    def __init__(self, table: dict[bytes, bytes], settings: Settings | None = None) -> None:
        self.settings = settings or Settings(notify_backoff_base_ms=1, notify_backoff_max_ms=5)
        self.counters = Counters()
        self.sender = RecordingSender()
        self.notifier = Notifier(self.settings, self.counters,
                                 senders={"webhook": self.sender, "email": self.sender})
        self.published: list[AlertEvent] = []
        self.fail_publish = False
        self.owned = True
        self.outbox = Outbox(table, self.notifier, context_topic="metrics-1m", owns=lambda p: self.owned)
        self.results = CommandResults()
        self.engine = AlertEngine(table, self.settings, self.counters, publish=self.publish,
                                  outbox=self.outbox, results=self.results, clock=ManualClock(T0 + 10 * 60_000))

    async def publish(self, events: Sequence[AlertEvent]) -> None:
        if self.fail_publish:
            raise ConnectionError("broker down")
        self.published.extend(events)


TARGETS = Targets(("ops@example.com",), (Webhook("http://127.0.0.1:9/hook", "s" * 16),))


def outbox_keys(table: dict[bytes, bytes]) -> list[bytes]:
    return sorted(k for k in table if k.startswith(b"o|"))


async def test_engine_publishes_persists_and_settles_deliveries() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    await h.engine.on_command(3, Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 2, targets=TARGETS)))
    assert await h.engine.on_minute(3, record(0, 800)) == []
    events = await h.engine.on_minute(3, record(1, 800), closed_at_ms=T0 + 10 * 60_000 - 1500)
    assert [(e.event, e.minute_start_ms) for e in events] == [("firing", T0 + 60_000)]
    assert h.published == events
    # Persisted before sending: both deliveries wait in the outbox until settled.
    assert len(outbox_keys(table)) == 2
    stored = AppMonitors.from_bytes(table[doc_key("shop")]).monitors[MID].state
    assert (stored.status, stored.last_minute_ms) == ("firing", T0 + 60_000)
    await h.notifier.join()
    assert sorted((d.channel, d.target) for d in h.sender.sent) == [
        ("email", "ops@example.com"), ("webhook", "http://127.0.0.1:9/hook")]
    assert outbox_keys(table) == []
    webhook = next(d for d in h.sender.sent if d.channel == "webhook")
    body = orjson.loads(webhook.body)
    assert body["type"] == "alert" and body["event"] == "firing" and body["value"] == 800.0
    email = next(d for d in h.sender.sent if d.channel == "email")
    assert email.subject == "FIRING shop/web: p95 response time 800 ms (threshold 500 ms)"
    assert h.counters.histograms["alert_lag_seconds"].sum == pytest.approx(1.5)
    # A redelivered minute changes nothing and sends nothing.
    assert await h.engine.on_minute(3, record(1, 800)) == []
    assert len(h.published) == 1


async def test_engine_skips_unmonitored_apps_and_bad_records() -> None:
    h = Harness({})
    assert await h.engine.on_minute(0, record(0, 800, app="blog")) == []
    assert await h.engine.on_minute(0, b"not json") == []
    assert h.counters.values["policy_minutes_invalid"] == 1


async def test_publish_failure_leaves_the_minute_unapplied_and_the_retry_repeats_the_same_events() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    await h.engine.on_command(0, Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 1, targets=TARGETS)))
    before = dict(table)
    h.fail_publish = True
    with pytest.raises(ConnectionError):
        await h.engine.on_minute(0, record(0, 800))
    assert table == before and h.sender.sent == []
    h.fail_publish = False  # Faust redelivers the message
    events = await h.engine.on_minute(0, record(0, 800))
    assert [e.event_id for e in events] == [f"shop/{MID}/{T0}/firing"]


async def test_restart_resends_unsettled_deliveries_from_the_outbox() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    await h.engine.on_command(0, Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 1, targets=TARGETS)))
    # The worker stops before the receivers answered: deliveries are abandoned, not forgotten.
    h.sender.hold = asyncio.Event()
    await h.engine.on_minute(0, record(0, 800))
    await asyncio.sleep(0.05)
    assert len(h.notifier.inflight) == 2
    await h.notifier.stop()
    assert h.sender.sent == [] and len(outbox_keys(table)) == 2
    # A new worker over the same table: state says firing (no second firing), the sweep re-sends.
    h2 = Harness(table)
    assert await h2.engine.on_minute(0, record(1, 800)) == []
    assert h2.outbox.sweep() == 2
    assert h2.outbox.sweep() == 0  # already on their way
    await h2.notifier.join()
    assert sorted(d.id for d in h2.sender.sent) == sorted([f"shop/{MID}/{T0}/firing/email/ops@example.com",
                                                           f"shop/{MID}/{T0}/firing/webhook/0"])
    assert outbox_keys(table) == []
    await h2.notifier.stop()


async def test_refused_deliveries_leave_the_outbox_and_lost_partitions_keep_them() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    await h.engine.on_command(0, Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 1, targets=TARGETS)))
    h.sender.refuse = True
    await h.engine.on_minute(0, record(0, 800))
    await h.notifier.join()
    assert outbox_keys(table) == [] and h.counters.values["notifications_failed"] == 2
    # The partition moved to another worker before the receiver answered: its new owner settles it.
    h.sender.refuse = False
    h.owned = False
    await h.engine.on_minute(0, record(1, 100))
    await h.notifier.join()
    assert [d.event_id for d in h.sender.sent] == [f"shop/{MID}/{T0 + 60_000}/resolved"] * 2
    assert len(outbox_keys(table)) == 2
    assert h.outbox.sweep() == 0  # not ours any more
    await h.notifier.stop()


async def test_commands_resolve_waiting_requests_and_empty_docs_are_deleted() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    fut = h.results.expect("c1")
    await h.engine.on_command(0, Command("c1", MONITOR_CREATE, "shop", monitor=latency()))
    assert fut.done() and fut.result().status == 201 and doc_key("shop") in table
    assert await h.engine.on_command(0, Command("c2", "policy.delete", "shop", process_type="web")) is None
    await h.engine.on_command(0, Command("c3", MONITOR_DELETE, "shop", monitor_id=MID))
    assert doc_key("shop") not in table
    assert h.counters.values["policy_commands_applied"] == 2


async def test_deleting_a_firing_monitor_resolves_it() -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    other = latency(500, 1, mid="mon_000000000002")  # not firing: deleting it sends nothing
    await h.engine.on_command(0, Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 1, targets=TARGETS)))
    await h.engine.on_command(0, Command("c2", MONITOR_CREATE, "shop", monitor=other))
    await h.engine.on_minute(0, record(0, 800))
    await h.engine.on_minute(0, record(1, 800))
    await h.notifier.join()
    h.sender.sent.clear()
    assert [e.event for e in h.published] == ["firing", "firing"]
    h.published.clear()
    # ``other`` fires too: a higher threshold resolves it at minute 2, so only MID is firing at the delete.
    await h.engine.on_command(0, Command("c3", MONITOR_REPLACE, "shop", monitor=latency(900, 1, mid=other.id)))
    await h.engine.on_minute(0, record(2, 800))
    assert [(e.monitor_id, e.event) for e in h.published] == [(other.id, "resolved")]
    await h.notifier.join()
    h.published.clear()
    h.sender.sent.clear()

    # Broker down: nothing changes, and the redelivered command repeats the same event.
    h.fail_publish = True
    before = dict(table)
    with pytest.raises(ConnectionError):
        await h.engine.on_command(0, Command("c4", MONITOR_DELETE, "shop", monitor_id=MID))
    assert table == before
    h.fail_publish = False
    fut = h.results.expect("c4")
    outcome = await h.engine.on_command(0, Command("c4", MONITOR_DELETE, "shop", monitor_id=MID))
    assert outcome is not None and outcome.status == 204 and fut.result().status == 204
    (e,) = h.published
    assert (e.event, e.monitor_id, e.minute_start_ms, e.value, e.requests, e.reason) == (
        "resolved", MID, T0 + 3 * 60_000, None, 0, MONITOR_DELETED)
    assert e.firing_since_ms == T0 and e.event_id == f"shop/{MID}/{T0 + 3 * 60_000}/resolved"
    assert e.to_record()["reason"] == "monitor_deleted"
    assert list(AppMonitors.from_bytes(table[doc_key("shop")]).monitors) == [other.id]
    await h.notifier.join()
    assert sorted((d.channel, d.event_id) for d in h.sender.sent) == [("email", e.event_id), ("webhook", e.event_id)]
    email = next(d for d in h.sender.sent if d.channel == "email")
    assert email.subject == "RESOLVED shop/web: monitor deleted (p95 response time, threshold 500 ms)"
    webhook = orjson.loads(next(d for d in h.sender.sent if d.channel == "webhook").body)
    assert (webhook["type"], webhook["event"], webhook["reason"]) == ("alert", "resolved", "monitor_deleted")
    assert outbox_keys(table) == []

    # A monitor that is not firing resolves nothing; a second delete is a 404 and sends nothing.
    h.published.clear()
    assert (await h.engine.on_command(0, Command("c5", MONITOR_DELETE, "shop", monitor_id=other.id))).status == 204
    assert (await h.engine.on_command(0, Command("c6", MONITOR_DELETE, "shop", monitor_id=MID))).status == 404
    assert h.published == [] and doc_key("shop") not in table
    # Events of minutes keep their shape: no ``reason`` key.
    assert "reason" not in AlertEvent("firing", "shop", "web", MID, LATENCY, T0, 800.0, 10, 500.0, 1, T0).to_record()
    await h.notifier.stop()


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


# --- webhook secrets at rest (METRICS_SECRETS_KEY) ------------------------------------------------------------

KEY = Fernet.generate_key().decode()
OLD_KEY = Fernet.generate_key().decode()
PLAIN = "whsec_plaintext_0123456789"
HOOKS = Targets((), (Webhook("http://127.0.0.1:9/hook", PLAIN),))


@pytest.fixture
def keyed() -> Iterator[SecretBox]:
    box = use_secrets_key(KEY)
    yield box
    use_secrets_key("")


def test_with_a_key_commands_and_table_values_never_hold_the_plaintext(keyed: SecretBox) -> None:
    raw = Command("c1", MONITOR_CREATE, "shop", monitor=latency(targets=HOOKS)).to_bytes()  # policy-commands
    assert PLAIN.encode() not in raw and b'"secret_enc"' in raw and b'"secret":' not in raw
    cmd = Command.from_bytes(raw)
    assert cmd.monitor is not None
    sealed = cmd.monitor.targets.webhooks[0].secret
    assert isinstance(sealed, SealedSecret) and sealed.key_id == key_id(KEY) and keyed.open(sealed) == PLAIN
    doc = AppMonitors()
    assert apply_monitor_command(doc, cmd, max_monitors=2).status == 201
    stored = doc.to_bytes()  # the monitors changelog and RocksDB
    assert PLAIN.encode() not in stored and b'"secret":' not in stored
    assert AppMonitors.from_bytes(stored).to_bytes() == stored  # sealed once, not re-encrypted every minute
    assert PLAIN not in orjson.dumps(doc.monitors[MID].public()).decode()
    policy = PolicyConfig("web", 1, 4, 300.0, targets=HOOKS)  # autoscaling policies' webhooks alike
    policies = AppPolicies()
    policies.put(policy)
    for raw in (policies.to_bytes(), Command("c2", "policy.put", "shop", policy=policy).to_bytes()):
        assert PLAIN.encode() not in raw and b'"secret_enc"' in raw


def test_old_plaintext_monitor_records_still_read_and_are_sealed_when_written_again() -> None:
    old_cmd = Command("c1", MONITOR_CREATE, "shop", monitor=latency(targets=HOOKS)).to_bytes()
    doc = AppMonitors()
    doc.put(latency(targets=HOOKS))
    old_doc = doc.to_bytes()
    assert PLAIN.encode() in old_doc and PLAIN.encode() in old_cmd  # no key: stored as before
    box = use_secrets_key(KEY)
    try:
        cmd = Command.from_bytes(old_cmd)
        assert cmd.monitor is not None and box.open(cmd.monitor.targets.webhooks[0].secret) == PLAIN
        back = AppMonitors.from_bytes(old_doc)
        assert box.open(back.monitors[MID].config.targets.webhooks[0].secret) == PLAIN
        assert PLAIN.encode() not in back.to_bytes()
    finally:
        use_secrets_key("")


async def test_with_a_key_the_outbox_holds_no_plaintext_and_the_sender_gets_it_sealed(keyed: SecretBox) -> None:
    table: dict[bytes, bytes] = {}
    h = Harness(table)
    create = Command("c1", MONITOR_CREATE, "shop", monitor=latency(500, 1, targets=HOOKS))
    await h.engine.on_command(0, Command.from_bytes(create.to_bytes()))  # as the agent gets it from the topic
    h.sender.hold = asyncio.Event()
    await h.engine.on_minute(0, record(0, 800))
    assert len(outbox_keys(table)) == 1
    assert all(PLAIN.encode() not in v for v in table.values())  # outbox and monitors doc alike
    h.sender.hold.set()
    await h.notifier.join()
    (d,) = h.sender.sent
    assert isinstance(d.secret, SealedSecret) and keyed.open(d.secret) == PLAIN
    await h.notifier.stop()


async def test_a_doc_sealed_under_a_key_no_longer_configured_still_evaluates(keyed: SecretBox) -> None:
    """The worker does not crash on it: monitors keep running, the webhook's delivery fails when it is
    signed (tests/notify/test_secrets.py), naming the key to restore."""
    use_secrets_key(OLD_KEY)
    doc = AppMonitors()
    doc.put(latency(500, 1, targets=HOOKS))
    table = {doc_key("shop"): doc.to_bytes()}
    use_secrets_key(KEY)
    h = Harness(table)
    events = await h.engine.on_minute(0, record(0, 800))
    assert [e.event for e in events] == ["firing"]
    await h.notifier.join()
    (d,) = h.sender.sent
    assert isinstance(d.secret, SealedSecret) and d.secret.key_id == key_id(OLD_KEY)
    assert AppMonitors.from_bytes(table[doc_key("shop")]).monitors[MID].state.status == "firing"
    await h.notifier.stop()
