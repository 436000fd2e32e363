"""DynamoStore against moto in-process (``mock_aws``): fast, no network, no sleeping.

moto answers aiobotocore with a synchronous botocore response; ``_moto_aio`` wraps it in an
AioAWSResponse (aiobotocore issue #1320 / moto #8694). moto only rejects batches whose *items* are identical,
not (as DynamoDB does) batches naming a key twice, so the duplicate-key test inspects our calls directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiobotocore.awsrequest import AioAWSResponse
from botocore.awsrequest import AWSResponse
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from moto import mock_aws
from moto.core.botocore_stubber import BotocoreStubber

from app.clock import ManualClock
from app.errors import ItemsRefused, StoreError, StoreFatal, StoreUnavailable
from app.settings import Settings
from app.storage.dynamodb import (
    MAX_WRITE_ROUNDS,
    DynamoStore,
    classify_error,
    client_credentials,
)
from app.storage.protocol import SUMMARY, MetricItem

T0 = 1_700_000_040  # a minute boundary
NOW_MS = (T0 + 3600) * 1000

StoreFactory = Callable[..., Awaitable[DynamoStore]]


@pytest.fixture
def _moto_aio(monkeypatch: pytest.MonkeyPatch) -> None:
    original = BotocoreStubber.__call__

    def call(self: BotocoreStubber, event_name: str, request: Any, **kwargs: Any) -> Any:
        resp = original(self, event_name, request, **kwargs)
        if isinstance(resp, AWSResponse) and not isinstance(resp, AioAWSResponse):
            aio = AioAWSResponse(resp.url, resp.status_code, resp.headers, resp.raw)
            aio._content = resp.content
            return aio
        return resp

    monkeypatch.setattr(BotocoreStubber, "__call__", call)


@pytest.fixture
def aws(_moto_aio: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


class Sleeps:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
async def make_store(aws: None) -> AsyncIterator[StoreFactory]:
    """Factory: a started store on a uniquely named table; tables deleted and clients closed after."""
    stores: list[DynamoStore] = []

    async def make(*, clock: ManualClock | None = None, sleep: Sleeps | None = None,
                   jitter: Callable[[], float] = lambda: 1.0, **overrides: Any) -> DynamoStore:
        values: dict[str, Any] = {"table_name": f"test-{uuid.uuid4().hex[:12]}", "dynamodb_endpoint": ""}
        values.update(overrides)
        settings = Settings.of(**values)
        store = DynamoStore(settings.storage, settings.dynamodb, clock=clock or ManualClock(NOW_MS),
                            sleep=sleep or Sleeps(), jitter=jitter)
        await store.start()
        stores.append(store)
        return store

    yield make
    await drop_stores(stores)


async def drop_stores(stores: list[DynamoStore]) -> None:
    """Delete the tables of started stores and stop them (the store fixtures' teardown)."""
    for store in stores:
        if store._client is not None:
            # another store in the test shares (and may have deleted) the table
            with contextlib.suppress(ClientError):
                await store._client.delete_table(TableName=store._table)
            await store.stop()


def item(ts_s: int, payload: bytes = b'{"n":1}', *, app: str = "shop", pt: str = "web",
         res: int = 60) -> MetricItem:
    return MetricItem(app=app, process_type=pt, resolution_s=res, ts_s=ts_s, payload=payload)


def spy_batches(store: DynamoStore, monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    """Wrap the client's batch_write_item; returns the list of put-request lists sent."""
    sent: list[list[dict[str, Any]]] = []
    original = store._client.batch_write_item

    async def spy(**kwargs: Any) -> Any:
        sent.append(list(kwargs["RequestItems"][store._table]))
        return await original(**kwargs)

    monkeypatch.setattr(store._client, "batch_write_item", spy)
    return sent


def keys_of(batch: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["PutRequest"]["Item"]["pk"]["S"], r["PutRequest"]["Item"]["ts"]["N"]) for r in batch]


async def raw_item(store: DynamoStore, pk: str, ts_s: int) -> dict[str, Any]:
    resp = await store._client.get_item(TableName=store._table, Key={"pk": {"S": pk}, "ts": {"N": str(ts_s)}})
    got: dict[str, Any] = resp["Item"]
    return got


# --- behaviour ---------------------------------------------------------------------------------------


async def test_round_trip_range_is_half_open_and_sorted(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_many([item(T0 + 120, b"c"), item(T0, b"a"), item(T0 + 60, b"b"), item(T0 + 180, b"d"),
                          item(T0 + 60, b"other-app", app="other"), item(T0 + 60, b"10m", res=600)])
    got = await store.query("shop", "web", 60, T0, T0 + 180)
    assert got == [item(T0, b"a"), item(T0 + 60, b"b"), item(T0 + 120, b"c")]
    assert await store.query("shop", "web", 60, T0 + 180, T0 + 180) == []
    assert await store.query("shop", "web", 600, 0, T0 + 10**6) == [item(T0 + 60, b"10m", res=600)]
    assert await store.query("nobody", "web", 60, 0, T0 + 10**6) == []
    raw = await raw_item(store, "shop#web#60", T0)
    assert raw["expires_at"] == {"N": str(T0 + store.storage.ttl_s)}
    assert "z" not in raw


async def test_put_many_empty_is_a_no_op(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    sent = spy_batches(store, monkeypatch)
    await store.put_many([])
    assert sent == []


async def test_more_than_25_items_are_split(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    sent = spy_batches(store, monkeypatch)
    items = [item(T0 + 60 * i, str(i).encode()) for i in range(60)]
    await store.put_many(items)
    assert sorted(len(b) for b in sent) == [10, 25, 25]
    assert await store.query("shop", "web", 60, T0, T0 + 3600) == items


async def test_duplicate_keys_are_deduped_last_wins(make_store: StoreFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    sent = spy_batches(store, monkeypatch)
    items = [item(T0 + 60 * (i % 30), f"v{i}".encode()) for i in range(45)]  # 15 keys given twice
    await store.put_many(items)
    for batch in sent:
        assert len(keys_of(batch)) == len(set(keys_of(batch)))
    assert sum(len(b) for b in sent) == 30
    got = await store.query("shop", "web", 60, T0, T0 + 3600)
    assert [g.payload for g in got] == [f"v{i + 30}".encode() if i < 15 else f"v{i}".encode()
                                        for i in range(30)]


async def test_concurrency_is_bounded(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store(sink_concurrency=3)
    original = store._client.batch_write_item
    in_flight = peak = 0

    async def slow(**kwargs: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        try:
            return await original(**kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(store._client, "batch_write_item", slow)
    await store.put_many([item(T0 + 60 * i) for i in range(250)])
    assert peak == 3
    assert len(await store.query("shop", "web", 60, T0, T0 + 60 * 250)) == 250


async def test_large_payload_is_compressed_and_read_back(make_store: StoreFactory) -> None:
    store = await make_store(compress_over_bytes=1024)
    big = b'{"centroids":[' + b",".join(b"[%d.5,%d]" % (i, i % 7) for i in range(5000)) + b"]}"
    small = b"x" * 1024  # at the threshold: stored as is
    noise = os.urandom(4096)  # over it but incompressible: stored as is
    await store.put_many([item(T0, big), item(T0 + 60, small), item(T0 + 120, noise)])
    raw = await raw_item(store, "shop#web#60", T0)
    assert raw["z"] == {"N": "1"}
    assert len(raw["d"]["B"]) < len(big) // 3
    assert gzip.decompress(raw["d"]["B"]) == big
    assert "z" not in await raw_item(store, "shop#web#60", T0 + 60)
    assert "z" not in await raw_item(store, "shop#web#60", T0 + 120)
    got = await store.query("shop", "web", 60, T0, T0 + 180)
    assert [g.payload for g in got] == [big, small, noise]


async def test_compressible_megabyte_is_accepted(make_store: StoreFactory) -> None:
    store = await make_store()
    payload = b"[1.0,2]," * 150_000  # 1.2 MB raw, a few KB compressed
    await store.put_many([item(T0, payload)])
    assert (await store.query("shop", "web", 60, T0, T0 + 60))[0].payload == payload


async def test_item_over_400kb_after_compression_is_rejected_before_writing(
        make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    sent = spy_batches(store, monkeypatch)
    with pytest.raises(ItemsRefused) as err:
        await store.put_many([item(T0, b"ok"), item(T0 + 60, os.urandom(400_000))])
    assert not err.value.retriable and not isinstance(err.value, StoreFatal)
    assert "after compression" in str(err.value) and "400" in str(err.value)
    assert err.value.action
    # The oversize item alone is refused (named, with its reason); its neighbour is written.
    assert [(i.ts_s, "400 KB" in str(e)) for i, e in err.value.refused] == [(T0 + 60, True)]
    assert [len(c) for c in sent] == [1]
    assert await store.query("shop", "web", 60, T0, T0 + 120) == [item(T0, b"ok")]
    # Just under the limit (key, names and numbers included) is accepted.
    await store.put_many([item(T0, os.urandom(400_000 - 80))])


async def test_summary_blocks_live_apart_from_digests_and_expire_after_their_span(
        make_store: StoreFactory) -> None:
    """A block and a digest item with the same series and ts are different items (a chart's read never
    touches a digest); a block lives until its span's end plus the retention."""
    clock = ManualClock(NOW_MS)
    store = await make_store(clock=clock, ttl_days=1.0)
    block = MetricItem("shop", "web", 60, T0, b"points", SUMMARY, 3600)
    await store.put_many([item(T0, b"digest"), block])
    assert await store.query("shop", "web", 60, T0, T0 + 1) == [item(T0, b"digest")]
    assert await store.query("shop", "web", 60, T0, T0 + 1, SUMMARY) == [
        MetricItem("shop", "web", 60, T0, b"points", SUMMARY)]
    assert (await raw_item(store, "shop#web#60#s", T0))["expires_at"] == {"N": str(T0 + 3600 + 86400)}
    clock.set((T0 + 86400 + 1) * 1000)  # the digest expired; the block still holds younger points
    assert await store.query("shop", "web", 60, T0, T0 + 1) == []
    assert len(await store.query("shop", "web", 60, T0, T0 + 1, SUMMARY)) == 1


async def test_expired_items_are_filtered_on_read(make_store: StoreFactory) -> None:
    clock = ManualClock(NOW_MS)
    store = await make_store(clock=clock, ttl_days=1.0)
    await store.put_many([item(T0, b"old"), item(T0 + 60, b"edge"), item(T0 + 120, b"new")])
    clock.set((T0 + 60 + 86400) * 1000)  # T0 expired a minute ago; T0+60 expires exactly now
    assert await store.query("shop", "web", 60, T0, T0 + 180) == [item(T0 + 120, b"new")]
    # DynamoDB TTL deletes lazily: the expired item is still in the table, only reads hide it.
    assert (await raw_item(store, "shop#web#60", T0))["expires_at"] == {"N": str(T0 + 86400)}


async def test_unprocessed_items_are_retried_with_growing_bounded_backoff(
        make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Sleeps()
    store = await make_store(sleep=sleeps, backoff_base_ms=50, backoff_max_ms=5000)
    original = store._client.batch_write_item
    calls: list[int] = []

    async def flaky(**kwargs: Any) -> Any:
        requests = kwargs["RequestItems"][store._table]
        calls.append(len(requests))
        if len(calls) <= 2:  # accept half, hand the rest back as DynamoDB does under throttling
            half = len(requests) // 2
            await original(RequestItems={store._table: requests[:half]})
            return {"UnprocessedItems": {store._table: requests[half:]}}
        return await original(**kwargs)

    monkeypatch.setattr(store._client, "batch_write_item", flaky)
    items = [item(T0 + 60 * i, str(i).encode()) for i in range(20)]
    await store.put_many(items)
    assert calls == [20, 10, 5]
    assert sleeps.calls == [0.05, 0.1]  # jitter pinned at 1.0: the full exponential cap
    assert await store.query("shop", "web", 60, T0, T0 + 3600) == items


async def test_unprocessed_items_give_up_as_retriable_after_bounded_rounds(
        make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Sleeps()
    store = await make_store(sleep=sleeps, backoff_base_ms=50, backoff_max_ms=400)
    calls = 0

    async def throttled(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return {"UnprocessedItems": kwargs["RequestItems"]}

    monkeypatch.setattr(store._client, "batch_write_item", throttled)
    with pytest.raises(StoreUnavailable) as err:
        await store.put_many([item(T0)])
    assert err.value.retriable and err.value.retry_after_s > 0
    assert calls == MAX_WRITE_ROUNDS
    assert sleeps.calls == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    assert all(b >= a for a, b in itertools.pairwise(sleeps.calls))


async def test_full_jitter_stays_within_the_cap(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Sleeps()
    store = await make_store(sleep=sleeps, jitter=lambda: 0.5, backoff_base_ms=100, backoff_max_ms=300)

    async def throttled(**kwargs: Any) -> Any:
        return {"UnprocessedItems": kwargs["RequestItems"]}

    monkeypatch.setattr(store._client, "batch_write_item", throttled)
    with pytest.raises(StoreUnavailable):
        await store.put_many([item(T0)])
    assert sleeps.calls[:3] == [0.05, 0.1, 0.15]
    assert max(sleeps.calls) == 0.15


def client_error(code: str, status: int = 400, op: str = "BatchWriteItem", message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message or f"simulated {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


async def test_throttling_error_is_retriable(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()

    async def throttled(**kwargs: Any) -> Any:
        raise client_error("ProvisionedThroughputExceededException")

    monkeypatch.setattr(store._client, "batch_write_item", throttled)
    with pytest.raises(StoreUnavailable) as err:
        await store.put_many([item(T0 + 60 * i) for i in range(60)])
    assert err.value.retriable
    assert isinstance(err.value.__cause__, ClientError)


async def test_missing_table_is_not_retriable_and_says_what_to_do(make_store: StoreFactory) -> None:
    store = await make_store(create_table=False)
    with pytest.raises(StoreFatal) as err:
        await store.put_many([item(T0)])
    assert not err.value.retriable
    assert "ResourceNotFoundException" in str(err.value)
    assert "METRICS_CREATE_TABLE=1" in err.value.action
    with pytest.raises(StoreError):
        await store.query("shop", "web", 60, T0, T0 + 60)
    with pytest.raises(StoreError):
        await store.ping()


@pytest.mark.parametrize(("exc", "retriable"), [
    (client_error("ThrottlingException"), True),
    (client_error("RequestLimitExceeded"), True),
    (client_error("InternalServerError", 500), True),
    (client_error("ServiceUnavailable", 503), True),
    (client_error("SomethingNew", 502), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (client_error("ExpiredTokenException"), True),
    (client_error("InvalidSignatureException", message="Signature expired: 20240101T000000Z is now earlier "
                  "than 20240101T000500Z"), True),
    (client_error("InvalidSignatureException", message="Signature not yet current: 20300101T000000Z"), True),
    (NoCredentialsError(), True),
    (CredentialRetrievalError(provider="assume-role-with-web-identity", error_msg="STS timed out"), True),
    (client_error("ResourceNotFoundException"), False),
    (client_error("ValidationException"), False),
    (client_error("AccessDeniedException"), False),
    (client_error("SomethingNew", 400), False),
])
def test_error_classification(exc: BaseException, retriable: bool) -> None:
    err = classify_error(exc, operation="BatchWriteItem", table="t", dynamodb=Settings().dynamodb,
                         storage=Settings().storage)
    assert err.retriable is retriable
    assert isinstance(err, StoreUnavailable if retriable else StoreError)
    assert err.action


def test_an_outage_is_retried_with_jitter_not_at_a_fixed_delay() -> None:
    """A throttled or unreachable store asks for at least the backoff base, so the one backoff rule's full
    jitter spreads writers that failed together (a floor of the maximum made every wait exactly that)."""
    import random

    from app.retry import RetryPolicy

    storage = Settings().storage
    err = classify_error(client_error("ThrottlingException"), operation="BatchWriteItem", table="t",
                         dynamodb=Settings().dynamodb, storage=storage)
    assert isinstance(err, StoreUnavailable) and err.retry_after_s == storage.backoff_base_ms / 1000
    policy = RetryPolicy.from_ms(storage.backoff_base_ms, storage.backoff_max_ms, jitter=random.Random(3).random)
    delays = [policy.delay_s(7, err.retry_after_s) for _ in range(20)]
    assert len(set(delays)) == 20 and all(err.retry_after_s <= d <= storage.backoff_max_ms / 1000 for d in delays)


@pytest.mark.parametrize(("exc", "fatal"), [
    (client_error("AccessDeniedException"), True),
    (client_error("ResourceNotFoundException"), True),
    (client_error("UnrecognizedClientException"), True),
    (client_error("InvalidSignatureException", message="The request signature we calculated does not match "
                  "the signature you provided."), True),  # a wrong secret key, not the clock
    (client_error("ResourceInUseException"), True),
    (client_error("SomethingNew", 400), True),
    (RuntimeError("something nobody classified"), True),
    (client_error("ValidationException", message="Item size has exceeded the maximum allowed size"), False),
])
def test_operator_errors_are_fatal_and_item_errors_are_not(exc: BaseException, fatal: bool) -> None:
    """Fatal: every request fails until an operator acts, so no item may be dead-lettered for it. Not fatal:
    this item is refused, another may pass."""
    err = classify_error(exc, operation="BatchWriteItem", table="metrics", dynamodb=Settings().dynamodb,
                         storage=Settings().storage)
    assert isinstance(err, StoreError) and not err.retriable
    assert isinstance(err, StoreFatal) is fatal
    assert err.action


def test_access_denied_names_the_permission() -> None:
    err = classify_error(client_error("AccessDeniedException"), operation="Query", table="metrics",
                         dynamodb=Settings().dynamodb, storage=Settings().storage)
    assert "grant dynamodb:Query on table metrics" in err.action


async def test_start_is_idempotent_and_reuses_an_existing_table(make_store: StoreFactory) -> None:
    first = await make_store()
    await first.put_many([item(T0)])
    second = await make_store(table_name=first._table)  # table exists, TTL already on
    await second.start()
    await second.ping()
    assert await second.query("shop", "web", 60, T0, T0 + 60) == [item(T0)]
    ttl = await second._client.describe_time_to_live(TableName=first._table)
    assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


async def test_existing_table_with_another_schema_is_refused(make_store: StoreFactory) -> None:
    store = await make_store()
    name = f"test-{uuid.uuid4().hex[:12]}"
    await store._client.create_table(
        TableName=name, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    try:
        with pytest.raises(StoreError) as err:
            await make_store(table_name=name)
        assert "METRICS_TABLE_NAME" in err.value.action
    finally:
        await store._client.delete_table(TableName=name)


async def test_hash_in_names_is_refused(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(StoreError):
        await store.put_many([item(T0, app="a#b")])
    with pytest.raises(StoreError):
        await store.query("a", "b#c", 60, T0, T0 + 60)


async def test_use_before_start_is_a_programming_error() -> None:
    store = DynamoStore(Settings().storage, Settings().dynamodb)
    with pytest.raises(RuntimeError):
        await store.put_many([item(T0)])


def test_emulator_gets_dummy_credentials_only_without_real_ones() -> None:
    local = Settings.of(dynamodb_endpoint="http://127.0.0.1:8000")
    assert client_credentials(local.dynamodb, {}) == {"aws_access_key_id": "local", "aws_secret_access_key": "local"}
    assert client_credentials(local.dynamodb, {"AWS_ACCESS_KEY_ID": "AKIA..."}) == {}
    assert client_credentials(local.dynamodb, {"AWS_PROFILE": "dev"}) == {}
    assert client_credentials(Settings.of(dynamodb_endpoint="").dynamodb, {}) == {}  # AWS: the standard chain decides


async def test_bulk_compression_runs_off_the_event_loop(make_store: StoreFactory,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make_store()
    offloaded: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        offloaded.append(getattr(func, "__name__", "?"))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    items = [item(T0 + 60 * i, os.urandom(30_000).hex().encode()) for i in range(12)]  # ~55 % compressible
    await store.put_many(items)
    assert await store.query("shop", "web", 60, T0, T0 + 3600) == items
    assert offloaded == ["_encode_all", "build"]
    offloaded.clear()
    await store.put_many([item(T0, b"small")])
    await store.query("shop", "web", 60, T0, T0 + 60)
    assert offloaded == []


async def test_unreachable_endpoint_is_retriable() -> None:
    """A real refused connection (no moto): aiohttp/botocore transport errors become StoreUnavailable."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    # botocore: 0 retries, one request
    settings = Settings.of(dynamodb_endpoint=f"http://127.0.0.1:{port}", create_table=False, max_attempts=0,
                           connect_timeout_s=1.0)
    store = DynamoStore(settings.storage, settings.dynamodb)
    await store.start()
    try:
        with pytest.raises(StoreUnavailable) as err:
            await store.ping()
        assert err.value.retriable and "unreachable" in str(err.value)
        with pytest.raises(StoreUnavailable):
            await store.put_many([item(T0)])
    finally:
        await store.stop()


async def test_start_with_dynamodb_down_keeps_running_and_ping_reports() -> None:
    """A process started while DynamoDB is unreachable stays up (not ready) instead of crash-looping."""
    s = Settings.of(dynamodb_endpoint="http://127.0.0.1:9", connect_timeout_s=0.2, max_attempts=0, table_name="down")
    store = DynamoStore(s.storage, s.dynamodb)
    await store.start()
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.stop()


def test_the_ttl_warning_is_said_once_per_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    """dynalite answers UnknownOperationException to UpdateTimeToLive (checked above on the real server);
    the warning is printed once per endpoint, however many tables a process sets up."""
    import asyncio

    from botocore.exceptions import ClientError as CE

    from app.storage import dynamodb

    class NoTTL:
        async def describe_time_to_live(self, **_: Any) -> Any:
            return {"TimeToLiveDescription": {"TimeToLiveStatus": "DISABLED"}}

        async def update_time_to_live(self, **_: Any) -> Any:
            raise CE({"Error": {"Code": "UnknownOperationException", "Message": ""}}, "UpdateTimeToLive")

    endpoint = f"http://127.0.0.1:1/{uuid.uuid4().hex}"
    caplog.set_level("WARNING", logger="app.storage.dynamodb")
    for table in ("a", "b", "c"):
        asyncio.run(dynamodb.ensure_ttl(NoTTL(), table, "expires_at", endpoint=endpoint))
    said = [r.getMessage() for r in caplog.records if endpoint in r.getMessage()]
    assert len(said) == 1 and "TTL not supported by this endpoint" in said[0]
    assert "expired items are still filtered on read" in said[0]


def test_item_size_counts_names_and_values_as_dynamodb_does() -> None:
    from app.storage.dynamodb import item_size_bytes

    item: dict[str, dict[str, Any]] = {"pk": {"S": "shop#web#60"}, "ts": {"N": "1795344600"},
                                       "d": {"B": b"x" * 1000}, "expires_at": {"N": "1797936600"}}
    assert item_size_bytes(item) == (2 + 11) + (2 + 11) + (1 + 1000) + (10 + 11)
    assert item_size_bytes({"s": {"S": "é"}}) == 1 + 2  # UTF-8 bytes, not characters
    with pytest.raises(ValueError, match="flat"):
        item_size_bytes({"m": {"M": {}}})
