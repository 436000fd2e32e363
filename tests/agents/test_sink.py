"""The sink job (agents/sink.py) against an in-memory store that can throttle or refuse, and against
DynamoStore on moto: items are refused one at a time, operator errors stop the sink without dead-lettering."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any
from unittest.mock import ANY

import orjson
import pytest

from agents.sink import ISOLATE_STREAK, OFFLOAD_ITEMS, Sink, dead_letter_record, decode_minute
from app.errors import ItemsRefused, PipelineError, StoreError, StoreFatal, StoreUnavailable
from app.ops.health import Readiness
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import MetricItem
from tables import record as records
from tables.aggregate import Aggregate, BucketKey
from tests.storage.test_dynamodb import T0, StoreFactory, _moto_aio, aws, client_error, make_store  # noqa: F401

FATAL_RETRY_S = Settings().storage.fatal_retry_s


class FlakyStore:
    """Fails the first calls with ``failures``; refuses any batch holding a minute ``refuse`` picks."""

    def __init__(self, failures: list[Exception], refuse: Callable[[MetricItem], bool] = lambda i: False,
                 pre_check: Callable[[MetricItem], bool] = lambda i: False) -> None:
        self.failures = failures
        self.refuse = refuse
        self.pre_check = pre_check
        self.items: dict[tuple[str, str, int], MetricItem] = {}
        self.calls = 0
        self.writes = 0

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if any(self.refuse(i) for i in items):  # as DynamoDB refuses a whole BatchWriteItem
            raise StoreError("ValidationException: Item size has exceeded the maximum allowed size",
                             action="make it smaller")
        refused = [(i, StoreError("item over the limit", action="lower the size")) for i in items if self.pre_check(i)]
        for i in items:
            if not self.pre_check(i):
                self.items[(i.app, i.process_type, i.ts_s)] = i
                self.writes += 1
        if refused:
            raise ItemsRefused("refused", refused=refused, action="lower the size")

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int) -> list[MetricItem]:
        return []


def minute(app: str, start_ms: int, proc: str = "web") -> bytes:
    agg = Aggregate(BucketKey(app, proc, start_ms), max_centroids=50)
    agg.add_request(200, 5.0, None)
    return orjson.dumps(agg.to_record())


def make(store: Any, *, during_sleep: Callable[[], Any] | None = None
         ) -> tuple[Sink, list[float], list[tuple[bytes, str]], Counters]:
    sleeps: list[float] = []
    dead: list[tuple[bytes, str]] = []
    counters = Counters()

    async def sleep(s: float) -> None:
        sleeps.append(s)
        if during_sleep is not None:
            await during_sleep()

    async def dead_letter(bad: Sequence[tuple[bytes, str]]) -> None:
        dead.extend(bad)

    sink = Sink(store, Settings().storage, dead_letter=dead_letter, counters=counters, sleep=sleep)
    return sink, sleeps, dead, counters


async def test_minutes_are_stored_in_the_record_format_set_and_read_back_the_same() -> None:
    values = [minute(f"a{n}", 60_000 * n) for n in range(OFFLOAD_ITEMS + 8)]  # converted in a worker thread
    for fmt in (2, 1):
        store = FlakyStore([])
        sink, _, dead, _ = make(store)
        sink.storage = Settings.of(store_record_format=fmt).storage
        assert await sink.write(values) == len(values) and not dead
        for v in values:
            rec = orjson.loads(v)
            payload = store.items[(rec["app"], "web", rec["start_ms"] // 1000)].payload
            assert payload[0] == (records.V2 if fmt == 2 else ord("{"))
            assert fmt == 2 or payload == v  # version 1 is the record itself
            assert records.decode(payload) == (ANY, None)
            assert records.decode(payload)[0].to_record() == Aggregate.from_record(rec).to_record()


async def test_a_refused_minute_is_dead_lettered_as_its_metrics_1m_record_not_the_stored_bytes() -> None:
    store = FlakyStore([], pre_check=lambda i: i.app == "big")
    sink, _, dead, _ = make(store)
    value = minute("big", 0)
    assert await sink.write([minute("a", 0), value]) == 1
    assert [v for v, _ in dead] == [value] and store.items[("a", "web", 0)].payload[0] == records.V2

    class Copying(FlakyStore):
        """Refuses with copies of the items: equal items, so the record is still found."""

        async def put_many(self, items: Sequence[MetricItem]) -> None:
            raise ItemsRefused("refused", refused=[(dataclasses.replace(i), StoreError("no", action="x"))
                                                   for i in items], action="x")

    sink, _, dead, _ = make(Copying([]))
    assert await sink.write([value]) == 0
    assert [orjson.loads(v) for v, _ in dead] == [orjson.loads(value)]


def test_a_record_that_is_no_aggregate_is_refused_before_storing() -> None:
    not_an_aggregate = orjson.dumps({"app": "a", "proc": "web", "start_ms": 0, "res_s": 60, "v": 99})
    with pytest.raises(ValueError, match="malformed metrics-1m record"):
        decode_minute(not_an_aggregate)
    assert decode_minute(not_an_aggregate, 1).payload == not_an_aggregate  # version 1 stores it as it is


async def test_retries_until_dynamodb_accepts() -> None:
    store = FlakyStore([StoreUnavailable("throttled", retry_after_s=0.1)] * 3)
    sink, sleeps, dead, counters = make(store)
    assert await sink.write([minute("a", 0), minute("b", 60_000)]) == 2
    assert len(store.items) == 2 and store.calls == 4 and len(sleeps) == 3 and not dead
    assert all(0.1 <= s <= 5.0 for s in sleeps)  # the store's retry_after_s is the floor (app/retry.py)
    assert counters.values["sink_retries"] == 3 and counters.values["sink_items_written"] == 2


async def test_credential_hiccups_and_clock_skew_are_retried_not_dead_lettered() -> None:
    from botocore.exceptions import NoCredentialsError

    from app.storage.dynamodb import classify_error

    skew = client_error("InvalidSignatureException", message="Signature expired: 20240101T000000Z is now "
                        "earlier than 20240101T000500Z")
    failures = [classify_error(e, operation="BatchWriteItem", table="t", dynamodb=Settings().dynamodb,
                               storage=Settings().storage)
                for e in (NoCredentialsError(), client_error("ExpiredTokenException"), skew)]
    store = FlakyStore(list(failures))
    sink, sleeps, dead, _ = make(store)
    assert await sink.write([minute("a", 0)]) == 1
    assert not dead and len(store.items) == 1 and len(sleeps) == 3 and max(sleeps) <= 5.0


async def test_an_item_refused_before_writing_is_dead_lettered_alone() -> None:
    store = FlakyStore([], pre_check=lambda i: i.app == "big")
    sink, _, dead, counters = make(store)
    assert await sink.write([minute("a", 0), minute("big", 0), minute("b", 0)]) == 2
    assert sorted(store.items) == [("a", "web", 0), ("b", "web", 0)] and store.calls == 1
    assert [orjson.loads(v)["app"] for v, _ in dead] == ["big"] and "over the limit" in dead[0][1]
    assert counters.values["sink_dead_lettered"] == 1 and counters.values["sink_items_written"] == 2


async def test_a_batch_the_store_refuses_is_written_item_by_item() -> None:
    """One bad minute among 20 costs only itself, as agents/rollup.py isolates bad items."""
    store = FlakyStore([], refuse=lambda i: i.app == "bad")
    sink, _, dead, _ = make(store)
    values = [minute(f"a{n}", 0) for n in range(10)] + [minute("bad", 0)] + [minute(f"b{n}", 0) for n in range(9)]
    assert await sink.write(values) == 19
    assert len(store.items) == 19 and [orjson.loads(v)["app"] for v, _ in dead] == ["bad"]
    assert "ValidationException" in dead[0][1]


async def test_garbage_is_dead_lettered_and_valid_minutes_still_written() -> None:
    store = FlakyStore([])
    sink, _, dead, _ = make(store)
    await sink.write([b"nope", orjson.dumps({"app": "a"}), minute("a", 0)])
    assert list(store.items) == [("a", "web", 0)]
    assert [r for _, r in dead] and len(dead) == 2


async def test_an_operator_error_stops_the_sink_until_fixed_and_dead_letters_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    fatal = StoreFatal("DynamoDB BatchWriteItem on metrics failed: AccessDeniedException: not authorized",
                       action="grant dynamodb:BatchWriteItem on table metrics to this worker's IAM role")
    store = FlakyStore([fatal] * 3)
    seen: list[str] = []

    async def probe() -> None:  # /readyz while the sink is stopped
        results = await Readiness({"sink": sink.check}, cache_s=0).run()
        seen.append(results["sink"])

    sink, sleeps, dead, counters = make(store, during_sleep=probe)
    with caplog.at_level(logging.WARNING, logger="agents.sink"):
        # write() returns only once stored: the agent takes (and commits) nothing past this batch meanwhile.
        assert await sink.write([minute("a", 0), minute("b", 0)]) == 2
    assert not dead and len(store.items) == 2 and store.writes == 2  # stored once, after the fix
    assert sleeps == [FATAL_RETRY_S] * 3
    assert len(seen) == 3 and all("grant dynamodb:BatchWriteItem on table metrics" in s and "stopped" in s
                                  for s in seen)
    stopped = [r for r in caplog.records if r.levelno == logging.ERROR and "STOPPED" in r.getMessage()]
    assert len(stopped) == 1 and "AccessDeniedException" in stopped[0].getMessage()
    assert "grant dynamodb:BatchWriteItem" in stopped[0].getMessage()
    assert any("resumes" in r.getMessage() for r in caplog.records)
    await sink.check()  # ready again
    assert counters.values["sink_dead_lettered"] == 0


async def test_many_items_refused_in_a_row_count_as_the_store_not_the_items() -> None:
    """A schema mismatch refuses every item the same way: after ISOLATE_STREAK in a row the sink stops as
    on a fatal error instead of dead-lettering the whole stream."""
    broken = {"on": True}
    store = FlakyStore([], refuse=lambda i: broken["on"])

    async def fix() -> None:
        assert sink.writer.halted is not None
        broken["on"] = False

    sink, sleeps, dead, _ = make(store, during_sleep=fix)
    values = [minute(f"a{n}", 0) for n in range(ISOLATE_STREAK + 4)]
    assert await sink.write(values) == len(values)
    assert not dead and sleeps == [FATAL_RETRY_S] and len(store.items) == len(values)


def test_decode_minute_uses_deterministic_keys() -> None:
    item = decode_minute(minute("shop", 1_764_000_060_000))
    assert (item.app, item.process_type, item.resolution_s, item.ts_s) == ("shop", "web", 60, 1_764_000_060)


def test_dead_letter_record_holds_the_minute_and_its_identity() -> None:
    value = minute("shop", 1_764_000_060_000)
    key, rec = dead_letter_record(value, "too big", topic="metrics-1m", max_bytes=100_000)
    doc = orjson.loads(rec)
    assert key == b"shop" and doc["record"].encode() == value and "truncated" not in doc
    assert (doc["app"], doc["proc"], doc["start_ms"], doc["topic"]) == ("shop", "web", 1_764_000_060_000, "metrics-1m")


def test_a_dead_letter_too_large_for_the_broker_is_truncated_but_traceable() -> None:
    pad = base64.b64encode(os.urandom(300_000)).decode()
    value = orjson.dumps({"app": "shop", "proc": "web", "start_ms": 1_764_000_060_000, "res_s": 60, "pad": pad})
    key, rec = dead_letter_record(value, "x" * 100_000, topic="metrics-1m", max_bytes=64_000)
    doc = orjson.loads(rec)
    assert len(rec) <= 64_000 and key == b"shop"
    assert doc["truncated"] is True and "record" not in doc and doc["record_bytes"] == len(value)
    assert (doc["app"], doc["proc"], doc["start_ms"]) == ("shop", "web", 1_764_000_060_000)
    assert len(doc["reason"]) <= 2048 and len(doc["record_sha256"]) == 64
    # Undecodable bytes: no identity to keep, but the digest and first bytes still trace it.
    key, rec = dead_letter_record(os.urandom(70_000), "not a metrics-1m record", topic="metrics-1m", max_bytes=64_000)
    doc = orjson.loads(rec)
    assert key is None and doc["truncated"] and "app" not in doc and doc["record_prefix"]


# --- against DynamoStore on moto -------------------------------------------------------------------------


async def test_on_dynamodb_one_oversize_minute_is_dead_lettered_and_the_rest_stored(
        make_store: StoreFactory) -> None:  # noqa: F811  the fixture imported above
    store = await make_store()
    sink, _, dead, _ = make(store)
    agg = Aggregate(BucketKey("big", "web", T0 * 1000), max_centroids=50)
    for n in range(10_000):  # random names: ~480 KB even deflated (tables/record.py)
        agg.add_metric(base64.b64encode(os.urandom(48)).decode(), "counter", 1.0, T0 * 1000 + n)
    big = orjson.dumps(agg.to_record())
    assert await sink.write([minute("a", T0 * 1000), big, minute("b", T0 * 1000)]) == 2
    assert [orjson.loads(v)["app"] for v, _ in dead] == ["big"] and "400 KB" in dead[0][1]
    for app in ("a", "b"):
        assert len(await store.query(app, "web", 60, T0, T0 + 60)) == 1


async def test_on_dynamodb_access_denied_stops_then_resumes_once_granted(
        make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811  the fixture imported above
    store = await make_store()
    original = store._client.batch_write_item
    denied = {"left": 2}

    async def batch_write_item(**kwargs: Any) -> Any:
        if denied["left"]:
            denied["left"] -= 1
            raise client_error("AccessDeniedException", message="User is not authorized to perform "
                               "dynamodb:BatchWriteItem")
        return await original(**kwargs)

    monkeypatch.setattr(store._client, "batch_write_item", batch_write_item)
    reasons: list[str] = []

    async def probe() -> None:
        try:
            await sink.check()
        except PipelineError as exc:
            reasons.append(str(exc))

    sink, sleeps, dead, _ = make(store, during_sleep=probe)
    assert await sink.write([minute("a", T0 * 1000)]) == 1
    assert not dead and sleeps == [FATAL_RETRY_S] * 2
    assert all(f"grant dynamodb:BatchWriteItem on table {store._table}" in r for r in reasons) and len(reasons) == 2
    assert len(await store.query("a", "web", 60, T0, T0 + 60)) == 1


async def test_a_registered_check_is_part_of_every_readyz(monkeypatch: pytest.MonkeyPatch) -> None:
    """bind() registers the sink's check (app/ops/health.py register_check): the composition roots, which
    list their own checks, need no change for /readyz to report a stopped sink."""
    from aiohttp import web

    from app.ops import health

    sink, _, _, _ = make(FlakyStore([]))
    sink.writer.halted = StoreFatal("AccessDeniedException", action="grant dynamodb:BatchWriteItem")
    monkeypatch.setattr(health, "_REGISTERED", {})
    health.register_check("sink", sink.check)
    webapp = web.Application()
    health.add_ops_routes(webapp, counters=Counters(), checks={"store": _ok})
    results = await webapp[health.READINESS_KEY].run()
    assert results["store"] == "ok" and "grant dynamodb:BatchWriteItem" in results["sink"]


async def _ok() -> None:
    return None
