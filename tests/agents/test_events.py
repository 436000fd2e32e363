"""The events job (agents/events.py): alert/autoscale records -> per-minute event items, merged by id."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agents.events import ALERT, AUTOSCALE, EventsJob, decode_event
from app.api.query import MetricsQuery
from app.clock import ManualClock
from app.errors import PipelineError, StoreError, StoreFatal
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.events import EVENTS_RESOLUTION_S, events_of
from tests.api.test_query import SETTINGS, T0, MemoryStore

NOW_S = T0 + 3600

FATAL_RETRY_S = Settings().storage.fatal_retry_s


def alert(minute_s: int, event: str = "firing", monitor: str = "mon_a", app: str = "shop",
          metric: str = "LATENCY") -> bytes:
    """As agents/alerts.py publishes it (app/alerting/monitors.py AlertEvent.to_record)."""
    ms = minute_s * 1000
    return orjson.dumps({"event_id": f"{app}/{monitor}/{ms}/{event}", "event": event, "app": app,
                         "process_type": "web", "monitor_id": monitor, "metric": metric, "minute_start_ms": ms,
                         "value": 812.5, "requests": 400, "threshold": 500.0, "sensitivity_min": 1,
                         "firing_since_ms": ms})


def decision(minute_s: int, frm: int, to: int, app: str = "shop") -> bytes:
    """As agents/autoscale.py publishes it (app/alerting/autoscale.py Decision.to_record)."""
    ms = minute_s * 1000
    action = "hold" if frm == to else ("up" if to > frm else "down")
    return orjson.dumps({"event_id": f"{app}/web/{ms}/autoscale", "app": app, "process_type": "web",
                         "minute_start_ms": ms, "action": action, "from_dynos": frm, "to_dynos": to,
                         "reason": "p95 over target", "requests": 900, "p95_ms": 420.0, "p95_target_ms": 300.0,
                         "capacity_per_dyno": 300.0, "needed_dynos": to, "min_dynos": 1, "max_dynos": 10,
                         "pinned_at_max": False})


def make_job(store: Any) -> tuple[EventsJob, Counters, list[float]]:
    counters = Counters()
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    return EventsJob(store, SETTINGS.storage, counters, sleep=sleep, jitter=lambda: 0.5), counters, slept


def stored(store: MemoryStore, app: str = "shop") -> dict[int, list[dict[str, Any]]]:
    return {ts: orjson.loads(v)["events"] for (a, p, r, ts), v in sorted(store.items.items())
            if a == app and p == "web" and r == EVENTS_RESOLUTION_S}


def test_decode_keeps_alerts_and_count_changes_and_refuses_garbage() -> None:
    app, proc, e = decode_event(ALERT, alert(T0 + 60, "resolved")) or ("", "", {})
    assert (app, proc) == ("shop", "web")
    assert e == {"kind": "alert", "id": f"shop/mon_a/{(T0 + 60) * 1000}/resolved", "ts": T0 + 60,
                 "status": "resolved", "monitor_id": "mon_a", "metric": "LATENCY", "value": 812.5,
                 "threshold": 500.0}
    up = decode_event(AUTOSCALE, decision(T0, 2, 3))
    assert up is not None and up[2]["kind"] == "autoscale" and (up[2]["from_dynos"], up[2]["to_dynos"]) == (2, 3)
    assert decode_event(AUTOSCALE, decision(T0, 3, 3)) == ("shop", "web", {})  # a hold: valid, not stored
    for bad in (b"not json", b"[1]", b'{"app": "shop"}', orjson.dumps({**orjson.loads(alert(T0)), "event": 5})):
        assert decode_event(ALERT, bad) is None


async def test_events_of_one_minute_share_an_item_and_replays_change_nothing() -> None:
    clock = ManualClock(NOW_S * 1000)
    store = MemoryStore(clock)
    job, counters, _ = make_job(store)
    # Two monitors fire in the same minute as a scaling step: three events, one item, none lost.
    batch = [(ALERT, alert(T0 + 120, monitor="mon_a")), (ALERT, alert(T0 + 120, monitor="mon_b", metric="ERROR_RATE")),
             (AUTOSCALE, decision(T0 + 120, 2, 3)), (AUTOSCALE, decision(T0 + 180, 3, 3)),
             (ALERT, b"garbage")]
    assert await job.write(batch, now_s=NOW_S) == 1
    items = stored(store)
    assert list(items) == [T0 + 120] and len(items[T0 + 120]) == 3
    assert counters.values["events_stored"] == 3 and counters.values["events_invalid"] == 1
    # A later batch adds to the same minute (merged with what is stored) ...
    assert await job.write([(ALERT, alert(T0 + 120, "resolved", monitor="mon_c"))], now_s=NOW_S) == 1
    assert len(stored(store)[T0 + 120]) == 4
    # ... and redelivering everything (at-least-once) writes nothing and duplicates nothing.
    puts = store.puts
    assert await job.write(batch, now_s=NOW_S) == 0
    assert store.puts == puts and len(stored(store)[T0 + 120]) == 4


async def test_retriable_failures_back_off_and_expired_events_are_skipped() -> None:
    store = MemoryStore(ManualClock(NOW_S * 1000))
    job, counters, slept = make_job(store)
    store.fail_queries = 1
    store.fail_puts = 1
    assert await job.write([(ALERT, alert(T0))], now_s=NOW_S) == 1
    assert counters.values["events_retries"] == 2
    # The read asked for 2 s (its retry_after_s is the floor); the put's 0.01 s is below half the first
    # backoff ceiling (jitter pinned at 0.5 of 50 ms), so the jitter decides (app/retry.py).
    assert slept == pytest.approx([2.0, 0.025])
    assert await job.write([(ALERT, alert(T0 - SETTINGS.storage.ttl_s))], now_s=NOW_S) == 0  # past the retention
    assert list(stored(store)) == [T0]


async def test_an_item_the_store_refuses_costs_only_its_own_markers() -> None:
    """L9: one refused item no longer drops the batch's other markers."""
    class Refusing(MemoryStore):
        async def put_many(self, items: Any) -> None:
            if any(i.app == "bad" for i in items):
                raise StoreError("ValidationException: item too large", action="make it smaller")
            await super().put_many(items)

    store = Refusing(ManualClock(NOW_S * 1000))
    job, counters, slept = make_job(store)
    batch = [(ALERT, alert(T0)), (ALERT, alert(T0, app="bad")), (ALERT, alert(T0 + 60, app="other"))]
    assert await job.write(batch, now_s=NOW_S) == 2
    assert list(stored(store)) == [T0] and list(stored(store, "other")) == [T0 + 60] and not stored(store, "bad")
    assert counters.values["events_failed"] == 1 and counters.values["events_stored"] == 2 and not slept


async def test_an_operator_error_is_waited_out_instead_of_dropping_markers() -> None:
    class Denied(MemoryStore):
        denials = 2

        async def put_many(self, items: Any) -> None:
            if self.denials:
                self.denials -= 1
                raise StoreFatal("AccessDeniedException", action="grant dynamodb:BatchWriteItem")
            await super().put_many(items)

    store = Denied(ManualClock(NOW_S * 1000))
    job, counters, slept = make_job(store)
    reasons: list[str] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        with pytest.raises(PipelineError) as err:
            await job.check()
        reasons.append(str(err.value))

    job.writer.sleep = sleep
    assert await job.write([(ALERT, alert(T0))], now_s=NOW_S) == 1
    assert slept == [FATAL_RETRY_S] * 2 and all("grant dynamodb:BatchWriteItem" in r for r in reasons)
    assert list(stored(store)) == [T0] and counters.values["events_failed"] == 0
    await job.check()


async def test_query_reads_events_in_range_oldest_first() -> None:
    store = MemoryStore(ManualClock(NOW_S * 1000))
    job, _, _ = make_job(store)
    await job.write([(AUTOSCALE, decision(T0 + 600, 1, 2)), (ALERT, alert(T0 + 60)),
                     (ALERT, alert(T0 + 60, app="other")), (ALERT, alert(T0 + 1200, "resolved"))], now_s=NOW_S)
    q = MetricsQuery(store, settings=SETTINGS, clock=store.clock)
    doc = orjson.loads(await q.events("shop", "web", T0 + 30, T0 + 1200))
    assert [(e["kind"], e["ts"]) for e in doc["events"]] == [("alert", T0 + 60), ("autoscale", T0 + 600)]
    assert doc["since"] == T0 + 30 and doc["until"] == T0 + 1200
    assert events_of([]) == []


@pytest.mark.parametrize("kind,value", [(ALERT, alert(T0)), (AUTOSCALE, decision(T0, 4, 3))])
def test_event_ids_are_the_producers(kind: str, value: bytes) -> None:
    got = decode_event(kind, value)
    assert got is not None and got[2]["id"] == orjson.loads(value)["event_id"]
