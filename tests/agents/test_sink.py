"""The sink job (agents/sink.py) against an in-memory store that can throttle or refuse."""

from __future__ import annotations

from typing import Sequence

import orjson

from agents.sink import Sink, decode_minute
from app.errors import StoreError, StoreUnavailable
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import MetricItem
from tables.aggregate import Aggregate, BucketKey


class FlakyStore:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.items: dict[tuple[str, str, int], MetricItem] = {}
        self.calls = 0

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        for i in items:
            self.items[(i.app, i.process_type, i.ts_s)] = i

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int) -> list[MetricItem]:
        return []


def minute(app: str, start_ms: int) -> bytes:
    agg = Aggregate(BucketKey(app, "web", start_ms), max_centroids=50)
    agg.add_request(200, 5.0, None)
    return orjson.dumps(agg.to_record())


def make(store: FlakyStore) -> tuple[Sink, list[float], list[tuple[bytes, str]], Counters]:
    sleeps: list[float] = []
    dead: list[tuple[bytes, str]] = []
    counters = Counters()

    async def sleep(s: float) -> None:
        sleeps.append(s)

    async def dead_letter(bad: Sequence[tuple[bytes, str]]) -> None:
        dead.extend(bad)

    return Sink(store, Settings(), dead_letter=dead_letter, counters=counters, sleep=sleep), sleeps, dead, counters


async def test_retries_until_dynamodb_accepts() -> None:
    store = FlakyStore([StoreUnavailable("throttled", retry_after_s=0.1)] * 3)
    sink, sleeps, dead, counters = make(store)
    assert await sink.write([minute("a", 0), minute("b", 60_000)]) == 2
    assert len(store.items) == 2 and store.calls == 4 and len(sleeps) == 3 and not dead
    assert all(0 < s <= 5.0 for s in sleeps)
    assert counters.values["sink_retries"] == 3 and counters.values["sink_items_written"] == 2


async def test_permanent_rejection_goes_to_dead_letter() -> None:
    store = FlakyStore([StoreError("AccessDenied", action="grant dynamodb:BatchWriteItem")])
    sink, _, dead, counters = make(store)
    await sink.write([minute("a", 0)])
    assert not store.items and len(dead) == 1 and "AccessDenied" in dead[0][1]
    assert counters.values["sink_dead_lettered"] == 1


async def test_garbage_is_dead_lettered_and_valid_minutes_still_written() -> None:
    store = FlakyStore([])
    sink, _, dead, _ = make(store)
    await sink.write([b"nope", orjson.dumps({"app": "a"}), minute("a", 0)])
    assert list(store.items) == [("a", "web", 0)]
    assert [r for _, r in dead] and len(dead) == 2


def test_decode_minute_uses_deterministic_keys() -> None:
    item = decode_minute(minute("shop", 1_764_000_060_000))
    assert (item.app, item.process_type, item.resolution_s, item.ts_s) == ("shop", "web", 60, 1_764_000_060)
