"""Stream job: closed minutes (``metrics-1m``) and ``policy-commands`` -> monitor events (``alerts``) and
notifications.

The only writer of the ``monitors`` table: commands are applied from inside the stream. Per minute the events
are acknowledged before the state and the outbox are written, so a crash re-sends the same events and loses
no delivery.
Reference: docs/alerting.md#where-configuration-lives
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka.partitioner import murmur2

from app.alerting.autoscale import AppPolicies
from app.alerting.commands import MONITOR_DELETE, MONITOR_OPS, Command, Outcome, apply_monitor_command
from app.alerting.minute import Minute
from app.alerting.monitors import LATENCY, MONITOR_DELETED, AlertEvent, AppMonitors
from app.alerting.targets import Targets
from app.api.policies import (
    LOCAL,
    REMOTE,
    UNKNOWN,
    CommandResults,
    Forwarder,
    Locate,
    PolicyBackend,
)
from app.clock import Clock, SystemClock
from app.errors import RetriableError
from app.notify.delivery import EMAIL, WEBHOOK, Delivery, DeliveryResult, DoneCallback
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.settings import PREFIX, AlertingSettings, KafkaSettings, Settings
from tables.state import partition_context

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

Table = MutableMapping[bytes, Any]
PublishAlerts = Callable[[Sequence[AlertEvent]], Awaitable[None]]
"""Sends events to the alerts topic and returns once the broker acknowledged all of them."""

OUTBOX_PREFIX = b"o|"


def partition_for(app: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and the Java client) picks for
    key = app: where the app's minutes, commands and table values live."""
    h: int = murmur2(app.encode())
    return (h & 0x7FFFFFFF) % partitions


def minute_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")


def peek_minute(value: bytes) -> tuple[dict[str, Any], str, str, int] | None:
    """The record and its (app, process type, start) without decoding digests; None when malformed."""
    try:
        rec = orjson.loads(value)
        app, proc, start_ms = rec["app"], rec["proc"], rec["start_ms"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not (isinstance(app, str) and isinstance(proc, str) and isinstance(start_ms, int)):
        return None
    return rec, app, proc, start_ms


class Outbox:
    """Deliveries kept in an agent's table until their receiver settled them (``o|{app}|{delivery id}``).

    :meth:`put` runs inside the agent's stream (the current event routes the write); the done-callback and
    :meth:`sweep` run outside any stream and set the app's partition explicitly, and only while this worker
    still owns that partition (otherwise its new owner settles the delivery).
    """

    def __init__(self, table: Table, notifier: Notifier, *, context_topic: str,
                 owns: Callable[[int], bool]) -> None:
        self.table = table
        self.notifier = notifier
        self.context_topic = context_topic
        self.owns = owns

    @staticmethod
    def key(app: str, slot: str) -> bytes:
        return b"o|" + f"{app}|{slot}".encode()

    def put(self, app: str, partition: int, deliveries: Sequence[tuple[str, Delivery]]) -> None:
        """``(slot, delivery)`` pairs; a slot holds one pending delivery (a newer one replaces it)."""
        for slot, d in deliveries:
            self.table[self.key(app, slot)] = orjson.dumps({"p": partition, "app": app, "slot": slot,
                                                            "d": d.to_record()})

    def send(self, app: str, partition: int, deliveries: Sequence[tuple[str, Delivery]]) -> None:
        for slot, d in deliveries:
            self.notifier.submit(d, self._on_done(app, partition, slot))

    def _on_done(self, app: str, partition: int, slot: str) -> DoneCallback:
        def done(d: Delivery, result: DeliveryResult) -> None:
            if not result.final or not self.owns(partition):
                return  # kept: sent again by the next sweep here, or by the partition's new owner
            key = self.key(app, slot)
            with partition_context(self.context_topic, partition):
                raw = self.table.get(key)
                # Only if the slot still holds this delivery: a newer one written meanwhile stays.
                if raw is not None and orjson.loads(raw)["d"]["id"] == d.id:
                    del self.table[key]
        return done

    def sweep(self) -> int:
        """Submit every pending delivery of an owned partition that is not already on its way."""
        inflight = self.notifier.inflight
        n = 0
        for k, raw in list(self.table.items()):
            if raw is None or not bytes(k).startswith(OUTBOX_PREFIX):
                continue
            rec = orjson.loads(raw)
            p = int(rec["p"])
            d = Delivery.from_record(rec["d"])
            if d.id in inflight or not self.owns(p):
                continue
            if self.notifier.submit(d, self._on_done(rec["app"], p, rec["slot"])):
                n += 1
        if n:
            log.info("outbox: %d pending deliveries submitted again", n)
        return n


# --- alert notifications --------------------------------------------------------------------------------

def describe(e: AlertEvent) -> tuple[str, str]:
    """(subject, text) of an alert e-mail."""
    if e.metric == LATENCY:
        what = "p95 response time"
        value = "no requests" if e.value is None else f"{e.value:.0f} ms"
        threshold = f"{e.threshold:g} ms"
    else:
        what = "error rate"
        value = "no requests" if e.value is None else f"{e.value:.2%}"
        threshold = f"{e.threshold:.2%}"
    head = {"firing": "FIRING", "still_firing": "STILL FIRING", "resolved": "RESOLVED"}[e.event]
    deleted = e.reason == MONITOR_DELETED
    # No "[tag]" prefix: Python's header folder splits a long subject that starts with "[" after the colon.
    subject = (f"{head} {e.app}/{e.process_type}: monitor deleted ({what}, threshold {threshold})" if deleted
               else f"{head} {e.app}/{e.process_type}: {what} {value} (threshold {threshold})")
    lines = [
        f"App:           {e.app}",
        f"Process type:  {e.process_type}",
        f"Monitor:       {e.monitor_id} ({e.metric} >= {threshold} for {e.sensitivity_min} min)",
    ]
    if deleted:
        lines += [f"State:         {e.event}: the monitor was deleted while firing; no further events follow",
                  f"Minute:        {minute_iso(e.minute_start_ms)} (the first one it no longer evaluates)"]
    else:
        lines += [f"State:         {e.event}",
                  f"Minute:        {minute_iso(e.minute_start_ms)} ({e.requests} requests)",
                  f"Value:         {value}"]
    if e.firing_since_ms is not None:
        lines.append(f"Firing since:  {minute_iso(e.firing_since_ms)}")
    lines.append(f"Event id:      {e.event_id}")
    return subject, "\n".join(lines) + "\n"


def event_deliveries(kind: str, event_id: str, body: dict[str, Any], targets: Targets, subject: str,
                     text: str) -> list[tuple[str, Delivery]]:
    """One delivery per target of an event; the slot is the delivery id (each is kept until settled)."""
    payload = orjson.dumps({"type": kind, **body}).decode()
    out: list[tuple[str, Delivery]] = []
    for addr in targets.email:
        d = Delivery(f"{event_id}/email/{addr}", event_id, EMAIL, addr, text, subject=subject)
        out.append((d.id, d))
    for i, hook in enumerate(targets.webhooks):
        d = Delivery(f"{event_id}/webhook/{i}", event_id, WEBHOOK, hook.url, payload, secret=hook.secret)
        out.append((d.id, d))
    return out


def alert_deliveries(e: AlertEvent, targets: Targets) -> list[tuple[str, Delivery]]:
    subject, text = describe(e)
    return event_deliveries("alert", e.event_id, e.to_record(), targets, subject, text)


# --- the engine ---------------------------------------------------------------------------------------------

def doc_key(app: str) -> bytes:
    return b"m|" + app.encode()


class AlertEngine:
    """Applies minutes and monitor commands to the ``monitors`` table (any mapping: tests use a dict)."""

    def __init__(self, table: Table, alerting: AlertingSettings, counters: Counters, *, publish: PublishAlerts,
                 outbox: Outbox, results: CommandResults | None = None, clock: Clock | None = None) -> None:
        self.table = table
        self.alerting = alerting
        self.counters = counters
        self.publish = publish
        self.outbox = outbox
        self.results = results
        self.clock = clock or SystemClock()

    def doc(self, app: str) -> AppMonitors | None:
        raw = self.table.get(doc_key(app))
        return None if raw is None else AppMonitors.from_bytes(raw)

    async def on_minute(self, partition: int, value: bytes, *, closed_at_ms: int | None = None) -> list[AlertEvent]:
        peeked = peek_minute(value)
        if peeked is None:
            self.counters.inc("policy_minutes_invalid")
            log.warning("alerts: skipped a metrics-1m record that is not a minute")
            return []
        rec, app, proc, start_ms = peeked
        doc = self.doc(app)
        if doc is None or not any(m.config.process_type == proc and start_ms > m.state.last_minute_ms
                                  for m in doc.monitors.values()):
            return []  # no monitor for this process type, or a replayed minute
        try:
            minute = Minute.from_record(rec)
        except ValueError as exc:
            self.counters.inc("policy_minutes_invalid")
            log.warning("alerts: skipped minute %s/%s/%d: %s", app, proc, start_ms, exc)
            return []
        events = doc.observe(minute)
        if events:
            await self.publish(events)
            self.counters.inc("alerts_published", len(events))
        deliveries = [d for e in events for d in alert_deliveries(e, doc.monitors[e.monitor_id].config.targets)]
        self.outbox.put(app, partition, deliveries)
        self.table[doc_key(app)] = doc.to_bytes()
        self.outbox.send(app, partition, deliveries)
        if closed_at_ms is not None:
            now_ms = self.clock.now_ms()
            for e in events:
                if e.event != "still_firing":
                    self.counters.observe("alert_lag_seconds", max(0, now_ms - closed_at_ms) / 1000)
        for e in events:
            log.info("alert %s %s: %s=%s threshold %s minute %s", e.event, e.monitor_id, e.metric, e.value,
                     e.threshold, minute_iso(e.minute_start_ms))
        return events

    async def on_command(self, partition: int, cmd: Command) -> Outcome | None:
        """Apply a monitor command. Deleting a firing monitor resolves it: the ``resolved`` event is published
        and its deliveries kept in the outbox with the same ordering of effects as a minute's."""
        if cmd.op not in MONITOR_OPS:
            return None
        doc = self.doc(cmd.app) or AppMonitors()
        gone = doc.monitors.get(cmd.monitor_id) if cmd.op == MONITOR_DELETE else None
        outcome = apply_monitor_command(doc, cmd, max_monitors=self.alerting.max_monitors_per_app)
        if outcome.applied:
            resolved = gone.deleted(cmd.app) if gone is not None else None
            deliveries: list[tuple[str, Delivery]] = []
            if resolved is not None and gone is not None:
                await self.publish([resolved])
                self.counters.inc("alerts_published")
                deliveries = alert_deliveries(resolved, gone.config.targets)
                self.outbox.put(cmd.app, partition, deliveries)
                log.info("alert resolved %s: monitor deleted while firing", resolved.monitor_id)
            if doc.monitors:
                self.table[doc_key(cmd.app)] = doc.to_bytes()
            elif doc_key(cmd.app) in self.table:
                del self.table[doc_key(cmd.app)]
            self.outbox.send(cmd.app, partition, deliveries)
            self.counters.inc("policy_commands_applied")
        log.info("policy command %s %s %s -> %s", cmd.id, cmd.op, cmd.app, outcome.result)
        if self.results is not None:
            self.results.resolve(cmd.id, outcome)
        return outcome


def decode_command(value: bytes | None, counters: Counters | None) -> Command | None:
    """None for a malformed command (counted and logged when ``counters`` is given: one agent reports)."""
    if value is None:
        return None
    try:
        return Command.from_bytes(value)
    except ValueError as exc:
        if counters is not None:
            counters.inc("policy_commands_rejected")
            log.warning("skipped a malformed policy command: %s", exc)
        return None


# --- Faust binding ---------------------------------------------------------------------------------------------

def owned_partitions(faust_app: Any, topic: str) -> set[int] | None:
    """Partitions of ``topic`` this worker actively owns; None while partitions move or tables recover."""
    if faust_app.rebalancing or not faust_app.tables.recovery.completed.is_set():
        return None
    return {tp.partition for tp in faust_app.assignor.assigned_actives() if tp.topic == topic}


def owns_partition(faust_app: Any, kafka: KafkaSettings) -> Callable[[int], bool]:
    def owns(p: int) -> bool:
        owned = owned_partitions(faust_app, kafka.metrics_topic)
        return owned is not None and p in owned
    return owns


def bind(wiring: Wiring, settings: Settings, counters: Counters, notifier: Notifier,
         results: CommandResults) -> AlertEngine:
    from app.notify.notifier import validate_settings

    faust_app, alerts_topic, monitors_table = wiring.app, wiring.alerts_topic, wiring.monitors_table

    validate_settings(settings.alerting)
    source = faust_app.topic(settings.kafka.metrics_topic, settings.kafka.policy_commands_topic, key_type=bytes,
                             value_type=bytes)

    async def publish(events: Sequence[AlertEvent]) -> None:
        futs = [await alerts_topic.send(key=e.app.encode(), value=orjson.dumps(e.to_record())) for e in events]
        for fut in futs:
            await fut

    outbox = Outbox(monitors_table, notifier, context_topic=settings.kafka.metrics_topic,
                    owns=owns_partition(faust_app, settings.kafka))
    engine = AlertEngine(monitors_table, settings.alerting, counters, publish=publish, outbox=outbox, results=results)

    @faust_app.agent(source, name="alerts")
    async def alerts_agent(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            if msg.topic == settings.kafka.policy_commands_topic:
                cmd = decode_command(event.value, counters)
                if cmd is not None:
                    await engine.on_command(msg.partition, cmd)
            elif event.value is not None:
                closed_at_ms = int(msg.timestamp * 1000) if msg.timestamp else None
                await engine.on_minute(msg.partition, event.value, closed_at_ms=closed_at_ms)

    @faust_app.timer(settings.alerting.outbox_sweep_interval_s, name="alerts_outbox_sweep")
    async def sweep() -> None:
        if owned_partitions(faust_app, settings.kafka.metrics_topic) is not None:
            outbox.sweep()

    return engine


def owner_locator(faust_app: Any, kafka: KafkaSettings, *, table_name: str = "monitors") -> Locate:
    """The advertised URL (Faust ``canonical_url``) of the worker that owns an app, from Faust's router.

    ``router.key_store(table, key)`` hashes the key with the producer's partitioner over the table's
    changelog topic and looks the partition up in the assignment every member received. The key is the
    app itself, not the table key (``m|{app}``): the table's values live in the partition of the app's
    minutes, which the changelog shares (same partition count, co-partitioned). That this is
    :func:`partition_for` is checked on every call -- a different partitioner or partition count would
    otherwise route reads to the wrong worker silently.
    """
    async def locate(app: str) -> str | None:
        changelog: str = faust_app.tables[table_name].changelog_topic.get_topic_name()
        key = app.encode()
        try:
            tp = faust_app.producer.key_partition(changelog, key)
        except TypeError:
            # The producer has no metadata for the changelog topic yet (it never wrote to it): fetch it.
            try:
                await faust_app.producer._ensure_producer().partitions_for(changelog)
                tp = faust_app.producer.key_partition(changelog, key)
            except Exception as exc:  # noqa: BLE001 - any failure here means "not known yet"
                log.warning("owner of %r unknown: no metadata for %s: %r", app, changelog, exc)
                return None
        expected = partition_for(app, kafka.partitions)
        if tp.partition != expected:
            log.error("owner of %r unknown: Faust puts key %r in partition %d of %s, the app's minutes are in "
                      "partition %d; check %sPARTITIONS against the topics", app, key, tp.partition,
                      changelog, expected, PREFIX)
            return None
        try:
            url = faust_app.router.key_store(table_name, key)
        except KeyError:
            return None  # no assignment received yet for that partition
        return str(url)
    return locate


def command_sender(topic: Any, kafka: KafkaSettings) -> Callable[[str, bytes], Awaitable[None]]:
    """Produce a policy command to ``topic`` (a Faust topic: ``send`` returns a future resolved on the
    broker's acknowledgement) and return once it is acknowledged, within ``produce_timeout_s``: a broker that
    does not answer is a RetriableError (the API's 503 with Retry-After), not a request that hangs (security
    review L7). The command may still reach the topic after the timeout: the client's retry is a new command,
    as after any 503."""
    from aiokafka.errors import KafkaError

    timeout_s = kafka.produce_timeout_s

    async def produce(app: str, value: bytes) -> None:
        fut = await topic.send(key=app.encode(), value=value)
        # Shielded: on the timeout only the wait ends; Faust's producer still settles its own future.
        await asyncio.shield(fut)

    async def send(app: str, value: bytes) -> None:
        try:
            await asyncio.wait_for(produce(app, value), timeout=timeout_s)
        except TimeoutError:
            raise RetriableError(f"policy command for {app!r} not acknowledged by the broker within {timeout_s:g} s",
                                 action=f"check the brokers ({PREFIX}BROKER_URL); the client may retry",
                                 retry_after_s=max(1.0, min(timeout_s, 5.0))) from None
        except KafkaError as exc:
            raise RetriableError(f"policy command not acknowledged: {exc!r}",
                                 action="check the brokers; the client may retry") from None
    return send


def policy_backend(wiring: Wiring, settings: Settings, *, monitors: Callable[[str], AppMonitors | None],
                   policies: Callable[[str], AppPolicies | None], results: CommandResults,
                   forwarder: Forwarder | None = None) -> PolicyBackend:
    """The web API's view of this worker: ownership, local tables, the commands topic, and where another
    worker's app is read (when ``forwarder`` is given, limited to ``forward_allowed_suffix``)."""
    faust_app = wiring.app
    if forwarder is not None:
        forwarder.allow_only(settings.web.forward_allowed_suffix)
    send = command_sender(wiring.policy_commands_topic, settings.kafka)

    def owner(app: str) -> str:
        owned = owned_partitions(faust_app, settings.kafka.metrics_topic)
        if owned is None:
            return UNKNOWN
        return LOCAL if partition_for(app, settings.kafka.partitions) in owned else REMOTE

    return PolicyBackend(owner=owner, monitors=monitors, policies=policies, send=send, results=results,
                         apply_timeout_s=settings.alerting.policy_apply_timeout_s,
                         locate=owner_locator(faust_app, settings.kafka) if forwarder is not None else None,
                         forwarder=forwarder)
