"""The autoscale engine (agents/autoscale.py): decisions to the topic, formation calls and pinned notices
through the outbox."""

from __future__ import annotations

import orjson

from agents.alerts import Outbox
from agents.autoscale import AutoscaleEngine, doc_key
from app.alerting.autoscale import AppPolicies, Decision, PolicyConfig
from app.alerting.commands import POLICY_DELETE, POLICY_PUT, Command
from app.alerting.targets import Targets, Webhook
from app.api.policies import CommandResults
from app.notify.delivery import Delivery
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey

T0 = 1_764_000_000_000 - 1_764_000_000_000 % 60_000


def policy(lo: int = 1, hi: int = 4, target: float = 300, current: int | None = None) -> PolicyConfig:
    return PolicyConfig("web", lo, hi, target, current)


def record(i: int, latency_ms: float, requests: int) -> bytes:
    agg = Aggregate(BucketKey("shop", "web", T0 + i * 60_000), max_centroids=100)
    for _ in range(requests):
        agg.add_request(200, latency_ms, None)
    return orjson.dumps(agg.to_record())


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[Delivery] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, d: Delivery) -> None:
        self.sent.append(d)


async def test_engine_publishes_every_minute_and_calls_the_formation_api_on_changes() -> None:
    table: dict[bytes, bytes] = {}
    settings = Settings.of(formation_url="http://127.0.0.1:9/apps/{app}/formation/{process_type}")
    counters = Counters()
    sender = RecordingSender()
    notifier = Notifier(settings.alerting, counters, senders={"formation": sender, "email": sender, "webhook": sender})
    published: list[Decision] = []

    async def publish(d: Decision) -> None:
        published.append(d)

    engine = AutoscaleEngine(table, settings.alerting, counters, publish=publish,
                             outbox=Outbox(table, notifier, context_topic="metrics-1m", owns=lambda p: True),
                             results=CommandResults())
    targets = Targets(("ops@example.com",), (Webhook("http://127.0.0.1:9/hook", "k" * 16),))
    put = Command("c1", POLICY_PUT, "shop", policy=PolicyConfig("web", 1, 2, 300, 1, targets))
    assert engine.on_command(0, put) is not None
    for i, (lat, n) in enumerate([(200.0, 100), (400.0, 200), (600.0, 300)]):
        await engine.on_minute(0, record(i, lat, n))
    assert await engine.on_minute(0, record(2, 600.0, 300)) is None  # redelivered
    await notifier.join()
    assert [(d.action, d.to_dynos, d.pinned_at_max) for d in published] == [
        ("hold", 1, False), ("up", 2, False), ("hold", 2, True)]
    formation = [d for d in sender.sent if d.channel == "formation"]
    assert [(d.target, orjson.loads(d.body)["quantity"]) for d in formation] == [
        ("http://127.0.0.1:9/apps/shop/formation/web", 2)]
    pinned = sorted((d.channel, d.target) for d in sender.sent if d.channel != "formation")
    assert pinned == [("email", "ops@example.com"), ("webhook", "http://127.0.0.1:9/hook")]
    assert not [k for k in table if k.startswith(b"o|")]
    assert counters.values["autoscale_decisions"] == 3 and counters.values["autoscale_steps"] == 1
    state = AppPolicies.from_bytes(table[doc_key("shop")]).policies["web"].state
    assert state.dynos == 2 and state.last_minute_ms == T0 + 120_000
    engine.on_command(0, Command("c2", POLICY_DELETE, "shop", process_type="web"))
    assert doc_key("shop") not in table
    await notifier.stop()


async def test_only_the_newest_formation_call_is_kept_pending() -> None:
    table: dict[bytes, bytes] = {}
    settings = Settings.of(formation_url="http://127.0.0.1:9/apps/{app}")
    counters = Counters()
    notifier = Notifier(settings.alerting, counters, senders={})  # nothing can be sent: deliveries stay pending

    async def publish(d: Decision) -> None:
        return None

    outbox = Outbox(table, notifier, context_topic="metrics-1m", owns=lambda p: True)
    engine = AutoscaleEngine(table, settings.alerting, counters, publish=publish, outbox=outbox)
    engine.on_command(0, Command("c1", POLICY_PUT, "shop", policy=policy(1, 5, 300, current=1)))
    await notifier.stop()  # stopped: submits are refused, the outbox keeps what is pending
    for i, (lat, n) in enumerate([(200.0, 100), (400.0, 200), (450.0, 300)]):
        await engine.on_minute(0, record(i, lat, n))
    pending = [orjson.loads(v) for k, v in table.items() if k.startswith(b"o|")]
    assert [(p["slot"], orjson.loads(p["d"]["body"])["quantity"]) for p in pending] == [("formation/web", 3)]
