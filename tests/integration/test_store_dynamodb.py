"""DynamoStore against real DynamoDB servers over HTTP: dynalite (the embedded stack's server) and moto's
server, each test on both, so behaviour one emulator has and the other lacks shows here. What every backend
must do is in test_store_protocol.py.

Covers what in-process moto cannot vouch for: the wire format of binary attributes, 1 MB Query pages, the
duplicate-key rule of BatchWriteItem, and each server's TTL API (dynalite has none).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from app.clock import ManualClock
from app.errors import StoreError
from app.local.embedded import DynamoServer
from app.settings import Settings
from app.storage import dynamodb
from app.storage.dynamodb import DynamoStore
from app.storage.protocol import MetricItem
from tests.storage.test_dynamodb import drop_stores

pytestmark = pytest.mark.integration

# Servers that implement TTL may delete against the machine's clock (moto does on read), so test minutes
# must be recent: a fixed 2023 timestamp would be swept mid-test.
NOW_MS = time.time_ns() // 1_000_000
T0 = (NOW_MS // 1000 - 3600) // 60 * 60

StoreFactory = Callable[..., Awaitable[DynamoStore]]


@pytest.fixture(scope="module")
def moto_server() -> Iterator[DynamoServer]:
    server = DynamoServer(kind="moto")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["dynalite", "moto"])
def server(request: pytest.FixtureRequest) -> DynamoServer:
    fixture = "dynamo" if request.param == "dynalite" else "moto_server"
    found: DynamoServer = request.getfixturevalue(fixture)
    return found


@pytest.fixture
async def make_store(server: DynamoServer) -> AsyncIterator[StoreFactory]:
    """Factory: a started store on a uniquely named table; every table is deleted afterwards."""
    stores: list[DynamoStore] = []

    async def make(*, clock: ManualClock | None = None, **overrides: Any) -> DynamoStore:
        values: dict[str, Any] = {"table_name": f"it-{uuid.uuid4().hex[:12]}",
                                  "dynamodb_endpoint": server.endpoint}
        values.update(overrides)
        settings = Settings.of(**values)
        store = DynamoStore(settings.storage, settings.dynamodb, clock=clock or ManualClock(NOW_MS))
        stores.append(store)
        await store.start()
        return store

    yield make
    await drop_stores(stores)


def item(ts_s: int, payload: bytes = b'{"n":1}', *, app: str = "shop", pt: str = "web") -> MetricItem:
    return MetricItem(app=app, process_type=pt, resolution_s=60, ts_s=ts_s, payload=payload)


async def test_dynamodb_rejects_duplicate_keys_in_one_batch(make_store: StoreFactory, server: DynamoServer) -> None:
    """Why put_many dedupes: DynamoDB (and dynalite) refuse two items with one key in a batch."""
    if server.kind == "moto":
        pytest.skip("moto only rejects identical items, not different items with the same key")
    store = await make_store()
    put = [{"PutRequest": {"Item": {"pk": {"S": "shop#web#60"}, "ts": {"N": str(T0)}, "d": {"B": p}}}}
           for p in (b"a", b"b")]
    with pytest.raises(ClientError) as err:
        await store._client.batch_write_item(RequestItems={store._table: put})
    assert err.value.response["Error"]["Code"] == "ValidationException"


async def test_compression(make_store: StoreFactory) -> None:
    store = await make_store(compress_over_bytes=1024)
    big = b"[" + b",".join(b"[%d.25,%d]" % (i, i % 5) for i in range(50_000)) + b"]"  # ~600 KB raw
    await store.put_many([item(T0, big), item(T0 + 60, b"tiny")])
    raw = await store._client.get_item(TableName=store._table,
                                       Key={"pk": {"S": "shop#web#60"}, "ts": {"N": str(T0)}})
    assert raw["Item"]["z"] == {"N": "1"} and len(raw["Item"]["d"]["B"]) < 400_000
    got = await store.query("shop", "web", 60, T0, T0 + 120)
    assert [g.payload for g in got] == [big, b"tiny"]


async def test_oversized_item_is_rejected(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(StoreError) as err:
        await store.put_many([item(T0, os.urandom(400_001))])
    assert not err.value.retriable


async def test_ttl_enabled_and_expired_items_filtered(make_store: StoreFactory, server: DynamoServer) -> None:
    clock = ManualClock(NOW_MS)
    store = await make_store(clock=clock, ttl_days=1.0)
    ttl = await store._client.describe_time_to_live(TableName=store._table)
    status = ttl["TimeToLiveDescription"].get("TimeToLiveStatus")
    if server.kind == "dynalite":
        # No UpdateTimeToLive there: one clear warning, and the store goes on (reads filter expired items).
        assert status == "DISABLED"
        # The real server answered UnknownOperationException; its warning is said once per endpoint
        # (tests/storage/test_dynamodb.py), by whichever test set up a table there first.
        assert server.endpoint in dynamodb._TTL_UNSUPPORTED_WARNED
    else:
        assert status in ("ENABLED", "ENABLING")
    await store.put_many([item(T0, b"old"), item(T0 + 60, b"new")])
    # Past T0's expires_at on the store's clock, but not on the server's (which might delete the item).
    clock.set((T0 + 86400) * 1000)
    assert await store.query("shop", "web", 60, T0, T0 + 120) == [item(T0 + 60, b"new")]
    clock.set(NOW_MS)
    assert len(await store.query("shop", "web", 60, T0, T0 + 120)) == 2  # not deleted, only hidden


async def test_query_paginates(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    pages = 0
    original = store._client.query

    async def counting(**kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        return await original(**kwargs)

    monkeypatch.setattr(store._client, "query", counting)
    items = [item(T0 + 60 * i, os.urandom(100_000)) for i in range(15)]  # ~1.5 MB: Query pages at 1 MB
    await store.put_many(items)
    assert await store.query("shop", "web", 60, T0, T0 + 60 * 15) == items
    assert pages >= 2


async def test_start_twice_on_existing_table(make_store: StoreFactory) -> None:
    first = await make_store()
    await first.put_many([item(T0)])
    second = await make_store(table_name=first._table)  # exists, TTL already enabled
    assert await second.query("shop", "web", 60, T0, T0 + 60) == [item(T0)]
