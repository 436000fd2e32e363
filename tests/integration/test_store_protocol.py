"""The store protocols (app/storage/protocol.py), the same assertions on every backend against its real
server: DynamoDB on dynalite, Apache Cassandra 5.0 on the embedded node. What only one backend has (the
DynamoDB batch rules, its TTL API) is tested in its own file."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.local.embedded import CassandraServer, DynamoServer
from app.settings import Settings
from app.storage.backends import frame_table, metrics_store, token_table
from app.storage.protocol import (
    DIGEST,
    SUMMARY,
    FrameTable,
    MetricItem,
    MetricsBackend,
    Progress,
    TokenInfo,
    TokenTable,
)

pytestmark = pytest.mark.integration

NOW_MS = time.time_ns() // 1_000_000
T0 = (NOW_MS // 1000 - 3600) // 60 * 60


@dataclass
class Parts:
    settings: Settings
    clock: ManualClock
    metrics: MetricsBackend
    tokens: TokenTable
    frames: FrameTable


PartsFactory = Callable[..., Awaitable[Parts]]


@pytest.fixture(params=["dynamodb", "cassandra"])
def backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The backend's name and the settings pointing at its server (a fresh table / keyspace per test)."""
    if request.param == "dynamodb":
        server: DynamoServer = request.getfixturevalue("dynamo")
        return "dynamodb", {"dynamodb_endpoint": server.endpoint, "table_name": f"it-{uuid.uuid4().hex[:12]}"}
    node: CassandraServer = request.getfixturevalue("cassandra")
    return "cassandra", {"cassandra_port": node.port, "cassandra_keyspace": f"it_{uuid.uuid4().hex[:12]}"}


@pytest.fixture
async def make(backend: tuple[str, dict[str, Any]]) -> AsyncIterator[PartsFactory]:
    name, where = backend
    made: list[Parts] = []

    async def factory(**overrides: Any) -> Parts:
        settings = Settings.of(store=name, **where, **overrides)
        clock = ManualClock(NOW_MS)
        parts = Parts(settings, clock, metrics_store(settings, clock=clock), token_table(settings),
                      frame_table(settings))
        for p in (parts.metrics, parts.tokens, parts.frames):
            await p.start()
        made.append(parts)
        return parts

    yield factory
    for parts in made:
        await drop(name, parts)


async def drop(name: str, parts: Parts) -> None:
    """Delete what the test created, then stop."""
    if name == "cassandra":
        from app.storage.cassandra import CassandraSession
        session = CassandraSession.of(parts.settings.storage, parts.settings.cassandra)
        await session.rows(f"DROP KEYSPACE IF EXISTS {parts.settings.cassandra.keyspace}", [],
                           operation="DROP KEYSPACE")
    else:
        for table in (parts.metrics, parts.tokens, parts.frames):
            client = getattr(table, "_client", None)
            name_ = getattr(table, "_table", None) or getattr(table, "table", None)
            if client is not None:
                with contextlib.suppress(Exception):  # already gone
                    await client.delete_table(TableName=name_)
    for p in (parts.frames, parts.tokens, parts.metrics):
        await p.stop()


def item(ts_s: int, payload: bytes = b'{"n":1}', *, app: str = "shop", pt: str = "web", res: int = 60,
         kind: Any = DIGEST, span_s: int = 0) -> MetricItem:
    return MetricItem(app=app, process_type=pt, resolution_s=res, ts_s=ts_s, payload=payload, kind=kind,
                      span_s=span_s)


async def test_round_trip_range_bounds_and_series_apart(make: PartsFactory) -> None:
    store = (await make()).metrics
    await store.ping()
    payloads = [b"", b"\x00\xff binary-safe", b'{"p99":12.5}']
    await store.put_many([item(T0 + 60 * i, p) for i, p in enumerate(payloads)]
                         + [item(T0, b"other", app="other"), item(T0, b"worker", pt="worker"),
                            item(T0, b"10m", res=600)])
    assert await store.query("shop", "web", 60, T0, T0 + 120) == [item(T0, payloads[0]), item(T0 + 60, payloads[1])]
    assert await store.query("shop", "web", 60, T0 + 60, T0 + 180) == [item(T0 + 60, payloads[1]),
                                                                          item(T0 + 120, payloads[2])]
    assert await store.query("other", "web", 60, T0, T0 + 60) == [item(T0, b"other", app="other")]
    assert await store.query("shop", "worker", 60, T0, T0 + 60) == [item(T0, b"worker", pt="worker")]
    assert await store.query("shop", "web", 600, T0, T0 + 600) == [item(T0, b"10m", res=600)]
    assert await store.query("shop", "web", 60, T0, T0) == []


async def test_ranges_across_days_come_back_whole_and_in_order(make: PartsFactory) -> None:
    """Thirty days of 2-hour buckets and three days of minutes: on Cassandra that crosses partitions."""
    store = (await make()).metrics
    day0 = (NOW_MS // 1000 - 3 * 86400) // 86400 * 86400
    minutes = [item(day0 + 60 * i, str(i).encode()) for i in range(0, 3 * 1440, 7)]
    start2h = (NOW_MS // 1000 - 29 * 86400) // 7200 * 7200
    buckets = [item(start2h + 7200 * i, str(i).encode(), res=7200) for i in range(29 * 12)]
    await store.put_many(minutes + buckets)
    assert await store.query("shop", "web", 60, day0, day0 + 3 * 86400) == minutes
    assert await store.query("shop", "web", 60, day0 + 86400 - 600, day0 + 86400 + 600) == [
        m for m in minutes if day0 + 86400 - 600 <= m.ts_s < day0 + 86400 + 600]
    assert await store.query("shop", "web", 7200, start2h, start2h + 29 * 86400) == buckets


async def test_summary_blocks_and_digests_are_separate_items(make: PartsFactory) -> None:
    store = (await make()).metrics
    await store.put_many([item(T0, b"digest"), item(T0, b"block", kind=SUMMARY, span_s=3600),
                          item(T0 + 3600, b"x" * 20_000, kind=SUMMARY, span_s=3600)])
    assert await store.query("shop", "web", 60, T0, T0 + 3600) == [item(T0, b"digest")]
    assert [(i.ts_s, i.payload, i.kind) for i in await store.query("shop", "web", 60, T0, T0 + 7200, SUMMARY)] == [
        (T0, b"block", SUMMARY), (T0 + 3600, b"x" * 20_000, SUMMARY)]


async def test_replays_overwrite_and_the_last_of_a_key_wins(make: PartsFactory) -> None:
    store = (await make()).metrics
    await store.put_many([item(T0, b"first")])
    await store.put_many([item(T0, b"second")])
    assert await store.query("shop", "web", 60, T0, T0 + 60) == [item(T0, b"second")]
    many = [item(T0 + 60 * (i % 200), f"v{i}".encode()) for i in range(260)]  # 60 keys given twice
    await store.put_many(many)
    got = await store.query("shop", "web", 60, T0, T0 + 60 * 200)
    assert len(got) == 200
    assert got[0].payload == b"v200" and got[59].payload == b"v259" and got[60].payload == b"v60"


async def test_large_payloads_round_trip(make: PartsFactory) -> None:
    store = (await make(compress_over_bytes=1024)).metrics
    big = b"[" + b",".join(b"[%d.25,%d]" % (i, i % 5) for i in range(50_000)) + b"]"  # ~600 KB raw
    await store.put_many([item(T0, big), item(T0 + 60, b"tiny")])
    assert [g.payload for g in await store.query("shop", "web", 60, T0, T0 + 120)] == [big, b"tiny"]


async def test_retention_counts_from_the_items_own_time(make: PartsFactory) -> None:
    """Expired items are never returned; an item already past retention is not kept."""
    parts = await make(ttl_days=1.0)
    now_s = NOW_MS // 1000
    old = now_s - 86400 + 2  # expires two seconds from now (its minute is a day old)
    block = now_s - 86400 - 3600 + 2  # a block's retention counts from its end
    await parts.metrics.put_many([item(old, b"old"), item(old + 60, b"new"), item(now_s - 90_000, b"gone"),
                                  item(block, b"block", kind=SUMMARY, span_s=3600)])
    assert await parts.metrics.query("shop", "web", 60, now_s - 90_000, now_s) == [item(old, b"old"),
                                                                                    item(old + 60, b"new")]
    await asyncio.sleep(3)  # the server's clock (Cassandra's TTL) ...
    parts.clock.advance(3_000)  # ... and the store's (DynamoDB's lazy TTL is filtered on read)
    assert await parts.metrics.query("shop", "web", 60, now_s - 90_000, now_s) == [item(old + 60, b"new")]
    assert await parts.metrics.query("shop", "web", 60, block - 3600, now_s, SUMMARY) == []


async def test_series_lists_every_series_with_minutes(make: PartsFactory) -> None:
    store = (await make()).metrics
    assert await store.series() == []
    await store.put_many([item(T0), item(T0 + 60), item(T0, app="blog", pt="worker"), item(T0, res=600, app="x"),
                          item(T0, kind=SUMMARY, span_s=3600, app="y")])
    assert await store.series() == [("blog", "worker"), ("shop", "web")]


async def test_progress_is_overwritten_per_partition(make: PartsFactory) -> None:
    store = (await make()).metrics
    assert await store.progress() == []
    await store.put_progress([Progress(1, 1_000, 2_000, {}), Progress(0, 3_000, 4_000, {"shop": 5_000})])
    await store.put_progress([Progress(1, 6_000, 7_000, {"a.b-c": 8_000})])
    assert await store.progress() == [Progress(0, 3_000, 4_000, {"shop": 5_000}),
                                      Progress(1, 6_000, 7_000, {"a.b-c": 8_000})]


async def test_token_table(make: PartsFactory) -> None:
    tokens = (await make()).tokens
    a, b = TokenInfo("aaaaaaaaaaaa", "shop", "read", 1_700_000_000), TokenInfo("bbbbbbbbbbbb", "blog", "drain", 1)
    await tokens.put_token("a" * 64, a)
    await tokens.put_token("b" * 64, b)
    assert await tokens.get_token("a" * 64) == a
    assert await tokens.get_token("c" * 64) is None
    assert sorted(await tokens.all_tokens()) == [("a" * 64, a), ("b" * 64, b)]
    await tokens.delete_token("a" * 64)
    assert await tokens.get_token("a" * 64) is None and await tokens.all_tokens() == [("b" * 64, b)]


async def test_frame_table_claims_once_takes_over_a_dead_lease_and_forgets_after_the_window(
        make: PartsFactory) -> None:
    frames = (await make()).frames
    now_ms = int(time.time() * 1000)
    exp_s = now_ms // 1000 + 60
    assert await frames.claim("shop#1", now_ms=now_ms, lease_until_ms=now_ms + 10_000, expires_s=exp_s)
    assert not await frames.claim("shop#1", now_ms=now_ms + 1, lease_until_ms=now_ms + 10_001, expires_s=exp_s)
    assert not await frames.is_done("shop#1")  # pending: another attempt is in flight
    # Its producer died: once the lease is over, one claimant (not two) takes it over.
    later = now_ms + 10_001
    won = await asyncio.gather(*(frames.claim("shop#1", now_ms=later, lease_until_ms=later + 10_000,
                                              expires_s=exp_s) for _ in range(4)))
    assert sorted(won) == [False, False, False, True]
    await frames.mark_done("shop#1", expires_s=exp_s)
    assert await frames.is_done("shop#1")
    assert not await frames.claim("shop#1", now_ms=later + 20_000, lease_until_ms=later + 30_000, expires_s=exp_s)
    await frames.release("shop#1")  # a done frame stays done
    assert await frames.is_done("shop#1")
    # A failed delivery gives its claim up: the retry claims it at once.
    assert await frames.claim("shop#2", now_ms=now_ms, lease_until_ms=now_ms + 10_000, expires_s=exp_s)
    await frames.release("shop#2")
    assert await frames.claim("shop#2", now_ms=now_ms, lease_until_ms=now_ms + 10_000, expires_s=exp_s)
    # Past its window an entry is gone (Cassandra's TTL; DynamoDB's claim treats it as absent).
    assert await frames.claim("shop#3", now_ms=now_ms, lease_until_ms=now_ms + 10_000,
                              expires_s=now_ms // 1000 + 1)
    await frames.mark_done("shop#3", expires_s=now_ms // 1000 + 2)
    await asyncio.sleep(3)
    after = int(time.time() * 1000)
    assert await frames.claim("shop#3", now_ms=after, lease_until_ms=after + 10_000, expires_s=after // 1000 + 60)


async def test_an_unreachable_store_is_retriable_and_the_process_stays_up(
        backend: tuple[str, dict[str, Any]]) -> None:
    name, where = backend
    from app.local.embedded import free_port
    dead = {"dynamodb_endpoint": f"http://127.0.0.1:{free_port()}"} if name == "dynamodb" else {
        "cassandra_port": free_port()}
    settings = Settings.of(store=name, **{**where, **dead}, connect_timeout_s=0.5, max_attempts=0)
    store = metrics_store(settings)
    await store.start()  # does not raise: not ready until the store answers
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.put_many([item(T0)])
    finally:
        await store.stop()


def test_one_cassandra_session_object_serves_loop_after_loop(cassandra: CassandraServer) -> None:
    """A CLI (or a test) runs several event loops in turn with the same settings: the shared session's
    asyncio primitives and prepared statements must follow the running loop."""
    settings = Settings.of(store="cassandra", cassandra_port=cassandra.port,
                           cassandra_keyspace=f"it_{uuid.uuid4().hex[:12]}", cassandra_max_inflight=2)

    async def round_trip(ts_s: int) -> list[MetricItem]:
        store = metrics_store(settings)
        await store.start()
        try:
            await store.put_many([item(ts_s + 60 * i) for i in range(8)])  # 8 writes through a gate of 2
            return await store.query("shop", "web", 60, ts_s, ts_s + 480)
        finally:
            await store.stop()

    assert len(asyncio.run(round_trip(T0))) == 8
    assert len(asyncio.run(round_trip(T0 + 3600))) == 8
