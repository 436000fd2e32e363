"""Stream job: ``alerts`` and ``autoscale`` -> one store item per (app, process type, minute), the
dashboard's markers (``GET /v1/apps/{app}/events``).

Events are merged by ``event_id``, so redelivery is idempotent; a batch is acknowledged only after the store
accepted it, with the sink's failure rules (agents/sink.py).
Reference: docs/dashboard.md#markers
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from agents.sink import StoreWriter
from app.errors import StoreError
from app.ops.stats import Counters
from app.retry import Sleep
from app.settings import WINDOW_S, Settings, StorageSettings
from app.storage.events import EVENTS_RESOLUTION_S, merge_items
from app.storage.protocol import MetricItem, MetricsStore

if TYPE_CHECKING:
    from app.app import Wiring

log = logging.getLogger(__name__)

ALERT, AUTOSCALE = "alert", "autoscale"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def decode_event(kind: str, value: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """A record of the ``alerts`` (``kind`` = alert) or ``autoscale`` topic -> (app, process type, the event
    as stored), or None when it is not one. Autoscaling decisions that keep the count are None too."""
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    app, proc, event_id, start_ms = rec.get("app"), rec.get("process_type"), rec.get("event_id"), \
        rec.get("minute_start_ms")
    if not (isinstance(app, str) and isinstance(proc, str) and isinstance(event_id, str)
            and isinstance(start_ms, int) and not isinstance(start_ms, bool)):
        return None
    ts = start_ms // 1000 - (start_ms // 1000) % WINDOW_S
    if kind == ALERT:
        status = rec.get("event", rec.get("status"))
        if not isinstance(status, str):
            return None
        return app, proc, {"kind": ALERT, "id": event_id, "ts": ts, "status": status,
                           "monitor_id": rec.get("monitor_id"), "metric": rec.get("metric"),
                           "value": _num(rec.get("value")), "threshold": _num(rec.get("threshold"))}
    from_dynos, to_dynos = rec.get("from_dynos"), rec.get("to_dynos")
    if not (isinstance(from_dynos, int) and isinstance(to_dynos, int)):
        return None
    if from_dynos == to_dynos:
        return app, proc, {}  # a hold: valid, not stored
    return app, proc, {"kind": AUTOSCALE, "id": event_id, "ts": ts, "action": rec.get("action"),
                       "from_dynos": from_dynos, "to_dynos": to_dynos, "reason": rec.get("reason"),
                       "pinned_at_max": bool(rec.get("pinned_at_max"))}


class EventsJob:
    def __init__(self, store: MetricsStore, storage: StorageSettings, counters: Counters, *,
                 sleep: Sleep = asyncio.sleep, jitter: Callable[[], float] = random.random) -> None:
        self.store = store
        self.storage = storage
        self.counters = counters
        self.writer = StoreWriter(store, storage, counters, job="events", retries_counter="events_retries",
                                  sleep=sleep, jitter=jitter)

    async def check(self) -> None:
        await self.writer.check()

    async def write(self, records: Sequence[tuple[str, bytes]], *, now_s: int) -> int:
        """Store a batch of ``(kind, value)`` records; returns the number of items written."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        oldest = now_s - self.storage.ttl_s
        for kind, value in records:
            got = decode_event(kind, value)
            if got is None:
                self.counters.inc("events_invalid")
                continue
            app, proc, event = got
            if event and event["ts"] > oldest:  # an expired event would be deleted by TTL at once
                groups.setdefault((app, proc), []).append(event)
        items: list[MetricItem] = []
        events_of_item: dict[tuple[str, str, int], int] = {}
        read_events = 0
        for (app, proc), events in groups.items():
            lo = min(e["ts"] for e in events)
            hi = max(e["ts"] for e in events) + WINDOW_S

            async def read(app: str = app, proc: str = proc, lo: int = lo, hi: int = hi) -> list[MetricItem]:
                return await self.store.query(app, proc, EVENTS_RESOLUTION_S, lo, hi)

            try:
                existing = await self.writer.call(read)
            except StoreError as exc:  # this series cannot be read (a name the store cannot key): skip it
                self.counters.inc("events_failed")
                log.error("events: the store refused %s/%s for good (%d markers dropped): %s", app, proc,
                          len(events), exc)
                continue
            read_events += len(events)
            for item in merge_items(app, proc, existing, events):
                items.append(item)
                events_of_item[(app, proc, item.ts_s)] = sum(1 for e in events if e["ts"] == item.ts_s)
        if not items:
            return 0
        refused = await self.writer.put(items)
        for item, why in refused:
            self.counters.inc("events_failed")
            log.error("events: the store refused the markers of %s/%s at %d for good (dropped; the dashboard "
                      "will miss them): %s", item.app, item.process_type, item.ts_s, why)
        refused_keys = {(i.app, i.process_type, i.ts_s) for i, _ in refused}
        self.counters.inc("events_stored", read_events - sum(events_of_item[k] for k in refused_keys))
        return len(items) - len(refused)


def bind(wiring: Wiring, settings: Settings, store: MetricsStore, counters: Counters,
         ready: asyncio.Event) -> EventsJob:
    import time

    from app.ops.health import register_check

    faust_app = wiring.app

    job = EventsJob(store, settings.storage, counters)
    register_check("events", job.check)
    # Both topics keyed by app with the same partition count: Faust assigns an app's partitions of both to
    # the same worker, so each minute item has one writer.
    source = faust_app.topic(settings.kafka.alerts_topic, settings.kafka.autoscale_topic, key_type=bytes,
                             value_type=bytes)

    @faust_app.agent(source, name="events")
    async def events_agent(stream: Any) -> None:
        async for batch in stream.take_events(settings.storage.sink_batch_max, within=settings.storage.sink_within_s):
            await ready.wait()  # the store is started, and written in the migration's phase (app/writer.py)
            records = [(ALERT if ev.message.topic == settings.kafka.alerts_topic else AUTOSCALE, ev.value)
                       for ev in batch if ev.value is not None]
            await job.write(records, now_s=int(time.time()))

    return job
