"""The alert engine (agents/alerts.py): table, topic and outbox, on scripted minutes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import pytest

from agents.alerts import AlertEngine, Outbox, doc_key, partition_for
from app.alerting.commands import MONITOR_CREATE, MONITOR_DELETE, MONITOR_REPLACE, Command, Result
from app.alerting.monitors import LATENCY, MONITOR_DELETED, AlertEvent, AppMonitors, MonitorConfig
from app.alerting.targets import Targets, Webhook
from app.api.policies import CommandResults
from app.clock import ManualClock
from app.notify.delivery import Delivery, DeliveryFailed
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.sealing import SealedSecret, SecretBox, key_id, use_secrets_key
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey
from tests.alerting.secrets import HOOKS, KEY, OLD_KEY, PLAIN

T0 = 1_764_000_000_000 - 1_764_000_000_000 % 60_000
MID = "mon_000000000001"


def latency(threshold: float = 500, sensitivity: int = 5, every: int = 5, *, mid: str = MID,
            targets: Targets | None = None) -> MonitorConfig:
    return MonitorConfig(mid, "web", LATENCY, threshold, sensitivity, every, targets or Targets())


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
        self.settings = settings or Settings.of(notify_backoff_base_ms=1, notify_backoff_max_ms=5)
        self.counters = Counters()
        self.sender = RecordingSender()
        self.notifier = Notifier(self.settings.alerting, self.counters,
                                 senders={"webhook": self.sender, "email": self.sender})
        self.published: list[AlertEvent] = []
        self.fail_publish = False
        self.owned = True
        self.outbox = Outbox(table, self.notifier, context_topic="metrics-1m", owns=lambda p: self.owned)
        self.results = CommandResults()
        self.engine = AlertEngine(table, self.settings.alerting, self.counters, publish=self.publish,
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
    assert fut.done() and fut.result().result is Result.CREATED and doc_key("shop") in table
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
    assert outcome is not None and outcome.result is Result.DELETED and fut.result().result is Result.DELETED
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
    deleted = await h.engine.on_command(0, Command("c5", MONITOR_DELETE, "shop", monitor_id=other.id))
    assert deleted is not None and deleted.result is Result.DELETED
    missing = await h.engine.on_command(0, Command("c6", MONITOR_DELETE, "shop", monitor_id=MID))
    assert missing is not None and missing.result is Result.NOT_FOUND
    assert h.published == [] and doc_key("shop") not in table
    # Events of minutes keep their shape: no ``reason`` key.
    assert "reason" not in AlertEvent("firing", "shop", "web", MID, LATENCY, T0, 800.0, 10, 500.0, 1, T0).to_record()
    await h.notifier.stop()


# --- webhook secrets at rest (METRICS_SECRETS_KEY) ------------------------------------------------------------



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
