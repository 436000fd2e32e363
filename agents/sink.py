"""Stream job: ``metrics-1m`` -> DynamoDB.

Minutes are consumed in batches and written with BatchWriteItem (app/storage/dynamodb.py: <= 25 items per call, no
duplicate keys, UnprocessedItems retried with backoff). The batch's input offsets are acknowledged only
after ``put_many`` returned, i.e. after DynamoDB accepted every item: while DynamoDB throttles or is down
the sink retries with backoff and stops consuming (backpressure), so nothing is committed unwritten.
A minute DynamoDB rejects for good (permissions, schema, size) goes to ``metrics-1m-dlq`` with the
reason, so one bad item cannot stall every app.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Awaitable, Callable, Sequence

import orjson

from app.errors import RetriableError, StoreError, retry_delay_s
from app.ops.stats import Counters
from app.settings import WINDOW_S, Settings
from app.storage.protocol import MetricItem, MetricsStore

log = logging.getLogger(__name__)

DeadLetter = Callable[[Sequence[tuple[bytes, str]]], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


def decode_minute(value: bytes) -> MetricItem:
    """A ``metrics-1m`` record -> the item stored for it. Raises ValueError when it is not one."""
    rec = orjson.loads(value)
    if not isinstance(rec, dict):
        raise ValueError("metrics-1m record must be a JSON object")
    try:
        app, proc, start_ms, res_s = rec["app"], rec["proc"], rec["start_ms"], rec["res_s"]
    except KeyError as exc:
        raise ValueError(f"metrics-1m record lacks {exc}") from None
    if not (isinstance(app, str) and isinstance(proc, str) and isinstance(start_ms, int)
            and res_s == WINDOW_S):
        raise ValueError("metrics-1m record has wrong-typed app/proc/start_ms/res_s")
    return MetricItem(app=app, process_type=proc, resolution_s=res_s, ts_s=start_ms // 1000, payload=value)


class Sink:
    def __init__(self, store: MetricsStore, settings: Settings, *, dead_letter: DeadLetter, counters: Counters,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.store = store
        self.settings = settings
        self.dead_letter = dead_letter
        self.counters = counters
        self.sleep = sleep

    async def write(self, values: Sequence[bytes]) -> int:
        """Store a batch of minutes; returns when every valid one is in DynamoDB or dead-lettered."""
        items: list[MetricItem] = []
        bad: list[tuple[bytes, str]] = []
        for v in values:
            try:
                items.append(decode_minute(v))
            except (ValueError, orjson.JSONDecodeError) as exc:
                bad.append((v, f"not a metrics-1m record: {exc}"))
        attempt = 0
        started = time.monotonic()
        while items:
            try:
                await self.store.put_many(items)
                self.counters.inc("sink_items_written", len(items))
                self.counters.observe("sink_batch_seconds", time.monotonic() - started)
                break
            except RetriableError as exc:
                attempt += 1
                self.counters.inc("sink_retries")
                delay_s = retry_delay_s(exc, attempt, base_ms=self.settings.backoff_base_ms,
                                        max_ms=self.settings.backoff_max_ms, jitter=random.random())
                log.warning("sink: DynamoDB unavailable (%s); retry %d in %.2f s", exc, attempt, delay_s)
                await self.sleep(delay_s)
            except StoreError as exc:
                log.error("sink: DynamoDB rejected %d minutes for good: %s", len(items), exc)
                bad.extend((item.payload, str(exc)) for item in items)
                break
        if bad:
            self.counters.inc("sink_dead_lettered", len(bad))
            await self.dead_letter(bad)
        return len(items)


def bind(faust_app: Any, settings: Settings, store: MetricsStore, counters: Counters,
         ready: asyncio.Event) -> Sink:
    from app.app import metrics_topic, sink_dlq_topic

    async def dead_letter(bad: Sequence[tuple[bytes, str]]) -> None:
        for value, reason in bad:
            await sink_dlq_topic.send(value=orjson.dumps({"reason": reason,
                                                         "record": value.decode("utf-8", "replace")}))

    sink = Sink(store, settings, dead_letter=dead_letter, counters=counters)

    @faust_app.agent(metrics_topic, name="sink")
    async def sink_agent(stream: Any) -> None:
        async for values in stream.take(settings.sink_batch_max, within=settings.sink_within_s):
            # Set once the store's client is started, and while a migration writes this store (app/writer.py).
            await ready.wait()
            await sink.write(values)

    return sink
