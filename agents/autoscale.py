"""Stream job: closed ``web`` minutes -> autoscaling decisions (``autoscale``) and formation API calls.

Same layout and guarantees as agents/alerts.py (the one writer of the ``autoscale`` table; deliveries wait in
its outbox until settled). Only the newest pending formation call per (app, process type) is sent, so an
older count never arrives last. The model: app/alerting/autoscale.py.
Reference: docs/alerting.md#autoscaling-web
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from agents.alerts import (
    Outbox,
    Table,
    decode_command,
    event_deliveries,
    minute_iso,
    owned_partitions,
    owns_partition,
    peek_minute,
)
from app.alerting.autoscale import AppPolicies, AutoscaleParams, Decision
from app.alerting.commands import POLICY_OPS, Command, Outcome, apply_policy_command
from app.alerting.minute import Minute
from app.api.policies import CommandResults
from app.notify.delivery import FORMATION, Delivery
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.settings import AlertingSettings, AutoscaleSettings, Settings

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

PublishDecision = Callable[[Decision], Awaitable[None]]


def doc_key(app: str) -> bytes:
    return b"a|" + app.encode()


def pinned_text(d: Decision) -> tuple[str, str]:
    subject = (f"AUTOSCALING AT MAX {d.app}/{d.process_type}: {d.max_dynos} dynos, the p95 target of "
               f"{d.p95_target_ms:g} ms needs about {d.needed_dynos}")
    p95 = "no requests" if d.p95_ms is None else f"{d.p95_ms:.0f} ms"
    text = "\n".join([
        f"App:             {d.app}",
        f"Process type:    {d.process_type}",
        f"Minute:          {minute_iso(d.minute_start_ms)} ({d.requests} requests, p95 {p95})",
        f"Dynos:           {d.to_dynos} (min {d.min_dynos}, max {d.max_dynos})",
        f"Estimated need:  {d.needed_dynos} dynos for p95 <= {d.p95_target_ms:g} ms",
        "Raise max_dynos or make requests faster. This notice repeats at most once a day.",
        f"Event id:        {d.event_id}/pinned",
    ]) + "\n"
    return subject, text


class AutoscaleEngine:
    """Applies minutes and policy commands to the ``autoscale`` table (any mapping: tests use a dict)."""

    def __init__(self, table: Table, alerting: AlertingSettings, counters: Counters, *, publish: PublishDecision,
                 outbox: Outbox, results: CommandResults | None = None, params: AutoscaleParams | None = None
                 ) -> None:
        """``params``: the model's constants (``settings.autoscale``; None: their defaults)."""
        self.table = table
        self.alerting = alerting
        self.counters = counters
        self.publish = publish
        self.outbox = outbox
        self.results = results
        self.params = params or AutoscaleParams.from_settings(AutoscaleSettings())

    def doc(self, app: str) -> AppPolicies | None:
        raw = self.table.get(doc_key(app))
        return None if raw is None else AppPolicies.from_bytes(raw)

    def deliveries(self, d: Decision, doc: AppPolicies) -> list[tuple[str, Delivery]]:
        out: list[tuple[str, Delivery]] = []
        url = self.alerting.formation_url
        if d.changed and url:
            body = orjson.dumps({"quantity": d.to_dynos, "app": d.app, "process_type": d.process_type,
                                 "from_dynos": d.from_dynos, "reason": d.reason, "event_id": d.event_id,
                                 "minute_start_ms": d.minute_start_ms}).decode()
            target = url.replace("{app}", d.app).replace("{process_type}", d.process_type)
            key = f"{d.app}/{d.process_type}"
            out.append((f"formation/{d.process_type}",
                        Delivery(f"{d.event_id}/formation", d.event_id, FORMATION, target, body,
                                 supersedes=key, seq=d.minute_start_ms)))
        if d.notify_pinned:
            subject, text = pinned_text(d)
            targets = doc.policies[d.process_type].config.targets
            out.extend(event_deliveries("autoscale_pinned", f"{d.event_id}/pinned", d.to_record(), targets,
                                        subject, text))
        return out

    async def on_minute(self, partition: int, value: bytes) -> Decision | None:
        peeked = peek_minute(value)
        if peeked is None:
            self.counters.inc("policy_minutes_invalid")
            return None
        rec, app, proc, start_ms = peeked
        doc = self.doc(app)
        policy = None if doc is None else doc.policies.get(proc)
        if doc is None or policy is None or start_ms <= policy.state.last_minute_ms:
            return None
        try:
            minute = Minute.from_record(rec)
        except ValueError as exc:
            self.counters.inc("policy_minutes_invalid")
            log.warning("autoscale: skipped minute %s/%s/%d: %s", app, proc, start_ms, exc)
            return None
        decision = doc.observe(minute, self.params)
        if decision is None:
            return None
        await self.publish(decision)
        self.counters.inc("autoscale_decisions")
        deliveries = self.deliveries(decision, doc)
        self.outbox.put(app, partition, deliveries)
        self.table[doc_key(app)] = doc.to_bytes()
        self.outbox.send(app, partition, deliveries)
        if decision.changed:
            self.counters.inc("autoscale_steps")
            log.info("autoscale %s %s: %d -> %d dynos (%s) minute %s", app, proc, decision.from_dynos,
                     decision.to_dynos, decision.reason, minute_iso(decision.minute_start_ms))
        return decision

    def on_command(self, partition: int, cmd: Command) -> Outcome | None:
        if cmd.op not in POLICY_OPS:
            return None
        doc = self.doc(cmd.app) or AppPolicies()
        outcome = apply_policy_command(doc, cmd)
        if outcome.applied:
            if doc.policies:
                self.table[doc_key(cmd.app)] = doc.to_bytes()
            elif doc_key(cmd.app) in self.table:
                del self.table[doc_key(cmd.app)]
            self.counters.inc("policy_commands_applied")
        log.info("policy command %s %s %s -> %s", cmd.id, cmd.op, cmd.app, outcome.result)
        if self.results is not None:
            self.results.resolve(cmd.id, outcome)
        return outcome


# --- Faust binding ---------------------------------------------------------------------------------------------

def bind(wiring: Wiring, settings: Settings, counters: Counters, notifier: Notifier,
         results: CommandResults) -> AutoscaleEngine:
    faust_app, autoscale_table, autoscale_topic = wiring.app, wiring.autoscale_table, wiring.autoscale_topic

    source = faust_app.topic(settings.kafka.metrics_topic, settings.kafka.policy_commands_topic, key_type=bytes,
                             value_type=bytes)

    async def publish(d: Decision) -> None:
        fut = await autoscale_topic.send(key=d.app.encode(), value=orjson.dumps(d.to_record()))
        await fut

    outbox = Outbox(autoscale_table, notifier, context_topic=settings.kafka.metrics_topic,
                    owns=owns_partition(faust_app, settings.kafka))
    engine = AutoscaleEngine(autoscale_table, settings.alerting, counters, publish=publish, outbox=outbox,
                             results=results, params=AutoscaleParams.from_settings(settings.autoscale))

    @faust_app.agent(source, name="autoscale")
    async def autoscale_agent(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            if msg.topic == settings.kafka.policy_commands_topic:
                cmd = decode_command(event.value, None)  # the alerts agent reports malformed ones
                if cmd is not None:
                    engine.on_command(msg.partition, cmd)
            elif event.value is not None:
                await engine.on_minute(msg.partition, event.value)

    @faust_app.timer(settings.alerting.outbox_sweep_interval_s, name="autoscale_outbox_sweep")
    async def sweep() -> None:
        if owned_partitions(faust_app, settings.kafka.metrics_topic) is not None:
            outbox.sweep()

    return engine
