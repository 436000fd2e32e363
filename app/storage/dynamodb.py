"""DynamoDB behind the store protocols (``METRICS_STORE=dynamodb``): the metrics store and the token and frame
tables, on one client lifecycle (:class:`DynamoTable`).

Keys are deterministic (a replayed minute overwrites its item), payloads are opaque blobs, and reads drop
expired items themselves (TTL deletion is lazy). ``app`` and ``process_type`` never contain ``#``.
Reference: docs/design/storage.md#dynamodb-table
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import aioboto3
import aiohttp
import orjson
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    WaiterError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from app.clock import Clock, SystemClock
from app.errors import ItemsRefused, PipelineError, StoreError, StoreFatal, StoreUnavailable
from app.ops.stats import Counters
from app.retry import RetryPolicy
from app.settings import PREFIX, DynamoSettings, StorageSettings
from app.storage._shared import decode, encode, fan_out
from app.storage.codec import pack, unpack
from app.storage.protocol import DIGEST, SUMMARY, Kind, MetricItem, Progress, TokenInfo

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

MAX_ITEM_BYTES = 400_000
"""DynamoDB's item size limit (attribute names + values) is "400 KB"; the decimal reading is the conservative
one (the service is reported to accept up to ~409.6 KB)."""
BATCH_MAX_ITEMS = 25
"""BatchWriteItem's limit on put requests per call."""
MAX_WRITE_ROUNDS = 10
"""BatchWriteItem calls per chunk before UnprocessedItems becomes StoreUnavailable (about 20 s of backoff
at the default 50 ms..5 s)."""
TABLE_ACTIVE_POLLS = 120
"""DescribeTable polls (1 s apart, botocore's ``table_exists`` waiter) waiting for a table to become ACTIVE."""

PROGRESS_PK = "#progress"
"""The partition key of the pipeline's progress items (``ts`` = the metrics-1m partition). A series key
always has three parts after a non-empty app, so it cannot collide."""

# Attribute names are part of every item's size: keep them short.
A_PK, A_TS, A_DATA, A_ZIP, A_EXPIRES = "pk", "ts", "d", "z", "expires_at"

# Codes where the same request may succeed later. botocore's 'standard' retries have already retried these
# max_attempts times when we see them; the caller backs off further by the one backoff rule (app/retry.py),
# floored at METRICS_BACKOFF_BASE_MS: exponential with full jitter, so writers that failed together do not
# come back together (a floor of the maximum made every retry wait exactly that long).
_RETRIABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "InternalServerError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException",
    "LimitExceededException", "TransactionInProgressException", "ExpiredTokenException",
    "RequestTimeout", "RequestTimeoutException",
})
# Transport failures: DynamoDB is unreachable or slow, nothing was decided about the request.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    HTTPClientError,  # ReadTimeoutError, ConnectionClosedError
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,  # OSError family: resets, refused
)
# Environment variables that mean "the standard credential chain has something to use".
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def partition_key(app: str, process_type: str, resolution_s: int, kind: Kind = DIGEST) -> str:
    """The series key; '#' in a name would make two series collide, so it is refused. Digest items keep
    the key they had before summaries existed, so old items read as they are."""
    if "#" in app or "#" in process_type:
        raise StoreError(f"app {app!r} / process type {process_type!r} contains '#'",
                         action="reject such names at ingestion; '#' separates the parts of the key")
    return f"{app}#{process_type}#{resolution_s}" + ("#s" if kind == SUMMARY else "")


def _number_size(n: int) -> int:
    # DynamoDB stores numbers as ~1 byte per 2 significant digits + 1; one byte per digit + 1 is an upper bound.
    return len(str(abs(n))) + 1


def item_size_bytes(item: Mapping[str, Mapping[str, Any]]) -> int:
    """An item's size as DynamoDB counts it for the 400 KB limit and for read and write units: attribute
    names plus values (S as UTF-8, B as bytes, N by :func:`_number_size`), for the flat items we write."""
    size = 0
    for name, value in item.items():
        size += len(name.encode())
        if "S" in value:
            size += len(value["S"].encode())
        elif "B" in value:
            size += len(value["B"])
        elif "N" in value:
            size += _number_size(int(value["N"]))
        else:
            raise ValueError(f"attribute {name!r}: only flat S/B/N attributes are sized, got {sorted(value)}")
    return size


def client_credentials(dynamodb: DynamoSettings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Dummy credentials for an emulator on a machine without an AWS account; otherwise none, so the
    standard chain (env, profile, IRSA, instance role) stays in charge."""
    env = os.environ if env is None else env
    if dynamodb.endpoint and not any(env.get(k) for k in _CREDENTIAL_ENV):
        return {"aws_access_key_id": "local", "aws_secret_access_key": "local"}
    return {}


def client_config(dynamodb: DynamoSettings, storage: StorageSettings) -> AioConfig:
    """The one client's configuration; each value is a Settings field, documented there."""
    return AioConfig(
        # aiohttp connector limit: sink_concurrency BatchWriteItem calls plus queries and pings share it;
        # the default 10 would queue requests behind each other.
        max_pool_connections=dynamodb.max_pool_connections,
        # Fail fast on an unreachable endpoint; 'standard' retries then try again.
        connect_timeout=storage.connect_timeout_s,
        # Per socket read, not per request: a stuck connection is abandoned and retried instead of
        # stalling the sink.
        read_timeout=dynamodb.read_timeout_s,
        # 'standard' (not the DynamoDB 'legacy' default of 10 attempts): bounded retries of throttling and
        # 5xx with jitter; our own backoff handles UnprocessedItems and longer outages. Note botocore's
        # 'max_attempts' here counts retries after the first request (5 -> up to 6 requests); the
        # total would be 'total_max_attempts'.
        retries={"max_attempts": dynamodb.max_attempts, "mode": "standard"},
        # Keep idle pooled connections longer than the 12 s default so minute-spaced sink batches reuse
        # them instead of paying a TLS handshake each time. (tcp_keepalive is a no-op in aiobotocore.)
        connector_args={"keepalive_timeout": dynamodb.keepalive_timeout_s},
    )


class DynamoTable:
    """One table and the one aioboto3 client that reaches it, from start() to stop(): long-lived, since
    short-lived clients pay endpoint resolution, credential lookup and TLS handshakes on every use. When
    settings allow, start() creates the table (on-demand), waits until it is ACTIVE, checks its keys and
    turns TTL on. DynamoDB unreachable at start keeps the process up and not ready: ping() retries the
    setup, and writes back off until it succeeds (the sink applies backpressure)."""

    key_schema: ClassVar[tuple[tuple[str, str, str], ...]] = ((A_PK, "S", "HASH"),)
    """(attribute, type, key type) of each key attribute."""
    ttl_attribute: ClassVar[str | None] = None

    def __init__(self, storage: StorageSettings, dynamodb: DynamoSettings, table: str) -> None:
        self.storage, self.dynamodb = storage, dynamodb
        self.table = table
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._setup_pending = False  # table setup waiting for DynamoDB to answer (see start/ping)

    async def start(self) -> None:
        if self._client is not None:
            return
        session = aioboto3.Session(region_name=self.dynamodb.region, **client_credentials(self.dynamodb))
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(session.client(
                "dynamodb", endpoint_url=self.dynamodb.endpoint or None,
                config=client_config(self.dynamodb, self.storage)))
            self._stack = stack
            if self.storage.create_table:
                try:
                    await self._setup()
                except PipelineError as exc:
                    if not exc.retriable:
                        raise
                    log.warning("table %s: setup deferred, DynamoDB unavailable: %s", self.table, exc)
                    self._setup_pending = True
        except BaseException:
            self._client = None
            self._stack = None
            await stack.aclose()
            raise
        log.info("table %s ready (%s)", self.table, self.dynamodb.endpoint or f"AWS {self.dynamodb.region}")

    async def stop(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def ping(self) -> None:
        """Readiness: the table answers (and was set up, if that had to wait for DynamoDB)."""
        if self._setup_pending:
            await self._setup()
        try:
            await self.client.describe_table(TableName=self.table)
        except Exception as exc:
            raise self.error(exc, "DescribeTable") from exc

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} used before start() or after stop()")
        return self._client

    def error(self, exc: BaseException, operation: str) -> StoreError | StoreUnavailable:
        return classify_error(exc, operation=operation, table=self.table, dynamodb=self.dynamodb,
                              storage=self.storage)

    async def pages(self, operation: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Every item a Query or Scan returns, over all its pages (botocore's paginator), classified."""
        out: list[dict[str, Any]] = []
        try:
            async for page in self.client.get_paginator(key).paginate(TableName=self.table, **kwargs):
                out.extend(page.get("Items", []))
        except Exception as exc:
            raise self.error(exc, operation) from exc
        return out

    async def _setup(self) -> None:
        """Create the table if missing, wait until ACTIVE, check its keys, then make sure TTL is on."""
        c = self.client
        try:
            await c.describe_table(TableName=self.table)
        except c.exceptions.ResourceNotFoundException:
            log.info("creating DynamoDB table %s (PAY_PER_REQUEST)", self.table)
            try:
                await c.create_table(
                    TableName=self.table, BillingMode="PAY_PER_REQUEST",
                    KeySchema=[{"AttributeName": a, "KeyType": k} for a, _, k in self.key_schema],
                    AttributeDefinitions=[{"AttributeName": a, "AttributeType": t} for a, t, _ in self.key_schema])
            except c.exceptions.ResourceInUseException:
                pass  # created concurrently by another process
            except Exception as exc:
                raise self.error(exc, "CreateTable") from exc
        except Exception as exc:
            raise self.error(exc, "DescribeTable") from exc
        try:
            await c.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": TABLE_ACTIVE_POLLS})
            table = (await c.describe_table(TableName=self.table))["Table"]
        except WaiterError as exc:
            raise StoreUnavailable(f"table {self.table} did not become ACTIVE in {TABLE_ACTIVE_POLLS} s: {exc}",
                                   action="check the table in the DynamoDB console", retry_after_s=10.0) from exc
        except Exception as exc:
            raise self.error(exc, "DescribeTable") from exc
        self._check_schema(table)
        if self.ttl_attribute:
            await ensure_ttl(c, self.table, self.ttl_attribute, endpoint=self.dynamodb.endpoint)
        self._setup_pending = False

    def _check_schema(self, table: Mapping[str, Any]) -> None:
        """A same-named table with other keys would fail every write with a ValidationException: say so
        at start instead."""
        keys = {k["AttributeName"]: k["KeyType"] for k in table.get("KeySchema", [])}
        types = {a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", [])}
        if keys != {a: k for a, _, k in self.key_schema} or any(types.get(a) != t for a, t, _ in self.key_schema):
            expected = ", ".join(f"{a} ({t}, {k})" for a, t, k in self.key_schema)
            raise StoreFatal(f"table {self.table} has key schema {keys} {types}, expected {expected}",
                             action=f"point {PREFIX}TABLE_NAME at a table with this schema, or drop the table")


class DynamoStore(DynamoTable):
    """MetricsStore on DynamoDB (table ``table_name``, the design above)."""

    key_schema = ((A_PK, "S", "HASH"), (A_TS, "N", "RANGE"))
    ttl_attribute = A_EXPIRES

    def __init__(self, storage: StorageSettings, dynamodb: DynamoSettings, *, clock: Clock | None = None,
                 sleep: Sleep = asyncio.sleep, jitter: Callable[[], float] = random.random,
                 counters: Counters | None = None) -> None:
        """``sleep`` and ``jitter`` (a float in [0, 1)) are injected so backoff is tested without waiting.
        ``counters`` receives ``sink_unprocessed_items`` (throttling shows there before writes fail)."""
        super().__init__(storage, dynamodb, dynamodb.table_name)
        self._counters = counters
        self._table = dynamodb.table_name
        self._clock: Clock = clock or SystemClock()
        self._sleep = sleep
        self._jitter = jitter

    # --- writes -------------------------------------------------------------------------------------

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        """Write all items in concurrent BatchWriteItem calls; returns when every item was accepted.

        Every item is encoded (and size-checked) before anything is written. An item that cannot be stored
        (over 400 KB, a name with '#') does not cost the others: they are written, then ItemsRefused names
        it. Duplicate keys are collapsed, last one winning, because DynamoDB rejects a batch that names a key
        twice.
        """
        client = self._c()
        requests, refused = await encode(items, self.storage.compress_over_bytes, self._encode_all)
        if requests:
            await self._write_all(client, requests)
        if refused:
            raise ItemsRefused(f"DynamoDB cannot store {len(refused)} of {len(items)} items; the others were "
                               f"written: {refused[0][1]}", refused=refused, action=refused[0][1].action)

    async def _write_all(self, client: Any, requests: list[dict[str, Any]]) -> None:
        chunks = [requests[i:i + BATCH_MAX_ITEMS] for i in range(0, len(requests), BATCH_MAX_ITEMS)]
        gate = asyncio.Semaphore(max(1, self.dynamodb.sink_concurrency))

        async def write(chunk: list[dict[str, Any]]) -> None:
            async with gate:
                await self._write_chunk(client, chunk)

        await fan_out(write(c) for c in chunks)

    async def _write_chunk(self, client: Any, chunk: list[dict[str, Any]]) -> None:
        """One <=25-item batch, re-sending UnprocessedItems (which the SDK never retries) with backoff."""
        backoff = RetryPolicy.from_ms(self.storage.backoff_base_ms, self.storage.backoff_max_ms,
                                      jitter=self._jitter)
        pending = chunk
        for attempt in range(MAX_WRITE_ROUNDS):
            if attempt:  # a partial success, not an error: no retry_after_s to honour
                await self._sleep(backoff.delay_s(attempt))
            try:
                resp = await client.batch_write_item(RequestItems={self._table: pending})
            except Exception as e:
                raise self._classify(e, "BatchWriteItem") from e
            pending = resp.get("UnprocessedItems", {}).get(self._table, [])
            if not pending:
                return
            if self._counters is not None:
                self._counters.inc("sink_unprocessed_items", len(pending))
            log.debug("BatchWriteItem left %d of %d items unprocessed (round %d)",
                      len(pending), len(chunk), attempt + 1)
        raise StoreUnavailable(
            f"DynamoDB left {len(pending)} items unprocessed after {MAX_WRITE_ROUNDS} BatchWriteItem rounds",
            action=f"table {self._table} is throttling: raise its capacity (or on-demand limits) or lower "
                   f"{PREFIX}SINK_CONCURRENCY",
            retry_after_s=self.storage.backoff_base_ms / 1000,
        )

    def _encode_all(self, items: Sequence[MetricItem]
                    ) -> tuple[list[dict[str, Any]], list[tuple[MetricItem, StoreError]]]:
        """Put requests for items, one per key (the last item given for a key wins), and the items that
        cannot be stored with the reason."""
        unique: dict[tuple[str, int], dict[str, Any]] = {}
        refused: list[tuple[MetricItem, StoreError]] = []
        for item in items:
            try:
                encoded = self._encode(item)
            except StoreError as exc:
                refused.append((item, exc))
                continue
            unique[(encoded[A_PK]["S"], item.ts_s)] = encoded
        return [{"PutRequest": {"Item": it}} for it in unique.values()], refused

    def _encode(self, item: MetricItem) -> dict[str, Any]:
        pk = partition_key(item.app, item.process_type, item.resolution_s, item.kind)
        data, zipped = pack(item.payload, self.storage.compress_over_bytes)
        expires_at = item.ts_s + item.span_s + self.storage.ttl_s
        encoded: dict[str, Any] = {
            A_PK: {"S": pk},
            A_TS: {"N": str(item.ts_s)},
            A_DATA: {"B": data},
            A_EXPIRES: {"N": str(expires_at)},
        }
        if zipped:
            encoded[A_ZIP] = {"N": "1"}
        size = item_size_bytes(encoded)
        if size > MAX_ITEM_BYTES:
            raise StoreError(
                f"item {pk} ts={item.ts_s} is {size} bytes after compression "
                f"(payload {len(item.payload)} bytes), over DynamoDB's 400 KB item limit "
                f"(we allow {MAX_ITEM_BYTES} bytes)",
                action="lower the aggregate's size (e.g. METRICS_DIGEST_MAX_CENTROIDS) or split the payload; "
                       "retrying cannot help",
            )
        return encoded

    # --- reads --------------------------------------------------------------------------------------

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int, kind: Kind = DIGEST) -> list[MetricItem]:
        """One series' items of ``kind`` with since_s <= ts < until_s in time order, expired items omitted."""
        pk = partition_key(app, process_type, resolution_s, kind)
        if until_s <= since_s:
            return []
        now_s = self._clock.now_ms() // 1000
        found = await self.pages(
            "Query", "query",
            KeyConditionExpression="#pk = :pk AND #ts BETWEEN :since AND :last",
            # Expired items are still returned until TTL gets round to deleting them (days). Filtering on
            # the server saves transfer and parsing; the check below keeps the contract on any backend.
            FilterExpression="#e > :now",
            ProjectionExpression="#ts, #d, #z, #e",
            ExpressionAttributeNames={"#pk": A_PK, "#ts": A_TS, "#d": A_DATA, "#z": A_ZIP, "#e": A_EXPIRES},
            ExpressionAttributeValues={":pk": {"S": pk}, ":since": {"N": str(since_s)},
                                       ":last": {"N": str(until_s - 1)}, ":now": {"N": str(now_s)}})
        raws = [r for r in found if int(r[A_EXPIRES]["N"]) > now_s]

        def build() -> list[MetricItem]:
            out = [MetricItem(app, process_type, resolution_s, int(r[A_TS]["N"]), self._decode(pk, r), kind)
                   for r in raws]
            out.sort(key=lambda m: m.ts_s)  # already in key order; cheap insurance for the contract
            return out

        return await decode(build, sum(len(r[A_DATA]["B"]) for r in raws if A_ZIP in r))

    @staticmethod
    def _decode(pk: str, raw: Mapping[str, Any]) -> bytes:
        return unpack(raw[A_DATA]["B"], A_ZIP in raw and raw[A_ZIP]["N"] == "1", f"{pk} ts={raw[A_TS]['N']}")

    async def series(self) -> list[tuple[str, str]]:
        """A Scan of the keys only (it still reads, and bills, every item)."""
        found: set[tuple[str, str]] = set()
        for r in await self.pages("Scan", "scan", ProjectionExpression="#pk", ExpressionAttributeNames={"#pk": A_PK}):
            parts = r[A_PK]["S"].split("#")
            if len(parts) == 3 and parts[2] == "60":
                found.add((parts[0], parts[1]))
        return sorted(found)

    # --- pipeline progress ----------------------------------------------------------------------------

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        """One small item per partition, rewritten about once a second by each worker."""
        if not progress:
            return
        client = self._c()
        now_s = self._clock.now_ms() // 1000
        requests = [{"PutRequest": {"Item": {
            A_PK: {"S": PROGRESS_PK}, A_TS: {"N": str(p.partition)},
            A_DATA: {"B": orjson.dumps({"through_ms": p.stored_through_ms, "updated_ms": p.updated_ms,
                                        "changed": p.changed})},
            A_EXPIRES: {"N": str(now_s + self.storage.ttl_s)}}}} for p in progress]
        for i in range(0, len(requests), BATCH_MAX_ITEMS):
            await self._write_chunk(client, requests[i:i + BATCH_MAX_ITEMS])

    async def progress(self) -> list[Progress]:
        out: list[Progress] = []
        for r in await self.pages("Query", "query", KeyConditionExpression="#pk = :pk",
                                  ExpressionAttributeNames={"#pk": A_PK},
                                  ExpressionAttributeValues={":pk": {"S": PROGRESS_PK}}):
            rec = orjson.loads(r[A_DATA]["B"])
            out.append(Progress(int(r[A_TS]["N"]), int(rec["through_ms"]), int(rec["updated_ms"]),
                                {str(k): int(v) for k, v in rec.get("changed", {}).items()}))
        return sorted(out, key=lambda p: p.partition)

    # --- helpers ------------------------------------------------------------------------------------

    def _c(self) -> Any:
        return self.client

    def _classify(self, exc: BaseException, operation: str) -> StoreError | StoreUnavailable:
        return self.error(exc, operation)


def _code(e: ClientError) -> str:
    code: str = e.response.get("Error", {}).get("Code", "")
    return code


def classify_error(exc: BaseException, *, operation: str, table: str,
                   dynamodb: DynamoSettings, storage: StorageSettings) -> StoreError | StoreUnavailable:
    """Map a botocore/aiohttp failure to StoreUnavailable (retry later), StoreError (this item is refused)
    or StoreFatal (every request fails until an operator acts: nothing is the item's fault, so nothing may be
    dead-lettered). Callers decide from the type, never from the message."""
    retry_after_s = storage.backoff_base_ms / 1000
    where = dynamodb.endpoint or f"AWS region {dynamodb.region}"
    if isinstance(exc, (StoreError, StoreUnavailable)):
        return exc
    if isinstance(exc, ClientError):
        code = _code(exc)
        text = exc.response.get("Error", {}).get("Message", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = f"DynamoDB {operation} on {table} failed: {code}: {text}"
        if code in _RETRIABLE_CODES or (code not in _ACTIONS and isinstance(status, int) and status >= 500):
            return StoreUnavailable(msg, action="DynamoDB is throttling or failing; retry later, and raise "
                                                "table capacity if it persists", retry_after_s=retry_after_s)
        if code == "InvalidSignatureException" and _CLOCK_SKEW.search(text):
            # Signed with a clock that is off: botocore corrects its skew on the next attempts.
            return StoreUnavailable(msg, action="this host's clock is off: sync it (chrony/NTP); retrying",
                                    retry_after_s=retry_after_s)
        action = _ACTIONS.get(code, "")
        if code in _ITEM_CODES:
            return StoreError(msg, action=action.format(op=operation, table=table, where=where, prefix=PREFIX))
        return StoreFatal(msg, action=(action or "unexpected DynamoDB error: read the message above and fix the "
                                                 "cause; writes stop until then").format(
            op=operation, table=table, where=where, prefix=PREFIX))
    if isinstance(exc, (NoCredentialsError, CredentialRetrievalError)):
        # The credential chain (IRSA web identity, instance metadata) failed to answer this time: IRSA's STS
        # call and IMDS have transient failures. A deployment without credentials stays in this retry loop,
        # and says so in every warning.
        return StoreUnavailable(f"DynamoDB {operation}: no AWS credentials available ({type(exc).__name__}: {exc})",
                                action="retrying; if it persists provide credentials (env, profile, IRSA) or set "
                                       f"{PREFIX}DYNAMODB_ENDPOINT for a local emulator",
                                retry_after_s=retry_after_s)
    if isinstance(exc, _TRANSPORT_ERRORS):
        return StoreUnavailable(f"DynamoDB {operation} on {table} unreachable at {where}: "
                                f"{type(exc).__name__}: {exc}",
                                action=f"check the network / {PREFIX}DYNAMODB_ENDPOINT; retrying",
                                retry_after_s=retry_after_s)
    return StoreFatal(f"DynamoDB {operation} on {table} failed: {type(exc).__name__}: {exc}",
                      action="unexpected error: read the message above and fix the cause (or report a bug); "
                             "writes stop until then")


_ACTIONS = {
    "ResourceNotFoundException": "create table {table} at {where}, or set {prefix}CREATE_TABLE=1, or fix "
                                 "{prefix}TABLE_NAME / {prefix}AWS_REGION / {prefix}DYNAMODB_ENDPOINT",
    "AccessDeniedException": "grant dynamodb:{op} on table {table} to this worker's IAM role",
    "UnrecognizedClientException": "the AWS credentials are invalid for {where}: fix the credentials or region",
    "InvalidSignatureException": "the AWS credentials or clock are wrong: fix credentials, sync the clock",
    "ValidationException": "the request does not fit table {table}: check it has keys pk (S) and ts (N); "
                           "otherwise report this as a bug",
    "ResourceInUseException": "table {table} is being created, updated or deleted; wait and restart",
}
_ITEM_CODES = frozenset({"ValidationException"})
"""Refusals of what was sent (an item over the size limit, a malformed value): another item may pass. Every
other refusal is StoreFatal: it holds for every request until someone acts."""
_CLOCK_SKEW = re.compile(r"signature expired|not yet current|clock skew|too skewed", re.IGNORECASE)
"""InvalidSignatureException texts of a request signed with a clock that is off (retriable), as opposed to
a wrong secret key ("signature we calculated does not match", fatal)."""


_TTL_UNSUPPORTED_WARNED: set[str] = set()


async def ensure_ttl(client: Any, table: str, attribute: str, *, endpoint: str) -> None:
    """Enable TTL on ``attribute``. Failure only costs storage (every read filters expired items), so it is
    a warning, never an error: "already enabled" is success, and a server without TTL (dynalite answers
    UnknownOperationException) gets one warning per endpoint and process."""
    try:
        desc = await client.describe_time_to_live(TableName=table)
        ttl = desc.get("TimeToLiveDescription", {})
        status, attr = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
        if status in ("ENABLED", "ENABLING"):
            if attr != attribute:
                log.warning("table %s has TTL on %r, not %r: items will not expire -- disable TTL and "
                            "restart to switch it", table, attr, attribute)
            return
        await client.update_time_to_live(TableName=table,
                                          TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute})
        log.info("enabled TTL on %s.%s", table, attribute)
    except ClientError as e:
        code = _code(e)
        if code == "ValidationException" and "already enabled" in str(e).lower():
            return
        if code == "UnknownOperationException":
            if endpoint not in _TTL_UNSUPPORTED_WARNED:
                _TTL_UNSUPPORTED_WARNED.add(endpoint)
                log.warning("TTL not supported by this endpoint (%s); expired items are still filtered on read, "
                            "but nothing is deleted: storage grows until the tables are dropped", endpoint)
            return
        log.warning("could not enable TTL on %s.%s (%s): items will not expire and storage grows -- "
                    "grant dynamodb:UpdateTimeToLive or enable TTL in the table's IaC", table, attribute, e)
    except BotoCoreError as e:
        log.warning("could not enable TTL on %s.%s (%s)", table, attribute, e)


class DynamoTokens(DynamoTable):
    """Tokens in table ``<table_name>-tokens``: ``pk`` = hex digest, ``app``, ``kind``, ``id``, ``created_s``,
    and ``revoked_s`` on a revoked token's tombstone."""

    def __init__(self, storage: StorageSettings, dynamodb: DynamoSettings) -> None:
        super().__init__(storage, dynamodb, f"{dynamodb.table_name}-tokens")

    async def put_token(self, key: str, info: TokenInfo) -> None:
        item = {"pk": {"S": key}, "app": {"S": info.app}, "kind": {"S": info.kind}, "id": {"S": info.id},
                "created_s": {"N": str(info.created_s)}}
        # A live token's put never replaces a tombstone (the protocol's "a revocation is never undone"); the
        # condition needs no permission beyond PutItem.
        condition: dict[str, str] = {"ConditionExpression": "attribute_not_exists(revoked_s)"}
        if info.revoked_s:
            item["revoked_s"], condition = {"N": str(info.revoked_s)}, {}
        try:
            await self.client.put_item(TableName=self.table, Item=item, **condition)
        except self.client.exceptions.ConditionalCheckFailedException:
            return  # revoked meanwhile: the tombstone stays
        except Exception as exc:  # classified: the caller gets retriable or not
            raise self.error(exc, "PutItem") from exc

    async def get_token(self, key: str) -> TokenInfo | None:
        try:
            resp = await self.client.get_item(TableName=self.table, Key={"pk": {"S": key}}, ConsistentRead=True)
        except Exception as exc:
            raise self.error(exc, "GetItem") from exc
        item = resp.get("Item")
        return None if item is None else self._info(item)

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        return [(i["pk"]["S"], self._info(i)) for i in await self.pages("Scan", "scan", ConsistentRead=True)]

    async def delete_token(self, key: str) -> None:
        try:
            await self.client.delete_item(TableName=self.table, Key={"pk": {"S": key}})
        except Exception as exc:
            raise self.error(exc, "DeleteItem") from exc

    @staticmethod
    def _info(item: Mapping[str, Any]) -> TokenInfo:
        return TokenInfo(item["id"]["S"], item["app"]["S"], item["kind"]["S"], int(item["created_s"]["N"]),
                         int(item["revoked_s"]["N"]) if "revoked_s" in item else 0)


class DynamoFrames(DynamoTable):
    """Frame ids in table ``<table_name>-frames``: ``pk``, ``st`` (pending/done), ``lease_ms``, ``expires_at``
    (the TTL attribute; reads ignore expired entries too, as TTL deletion is lazy)."""

    ttl_attribute = "expires_at"

    def __init__(self, storage: StorageSettings, dynamodb: DynamoSettings) -> None:
        super().__init__(storage, dynamodb, f"{dynamodb.table_name}-frames")

    async def claim(self, key: str, *, now_ms: int, lease_until_ms: int, expires_s: int) -> bool:
        try:
            await self.client.put_item(
                TableName=self.table,
                Item={"pk": {"S": key}, "st": {"S": "pending"}, "lease_ms": {"N": str(lease_until_ms)},
                      "expires_at": {"N": str(expires_s)}},
                ConditionExpression="attribute_not_exists(pk) OR expires_at < :now_s "
                                    "OR (st = :pending AND lease_ms < :now_ms)",
                ExpressionAttributeValues={":now_s": {"N": str(now_ms // 1000)}, ":now_ms": {"N": str(now_ms)},
                                           ":pending": {"S": "pending"}})
            return True
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        except Exception as exc:
            raise self.error(exc, "PutItem") from exc

    async def is_done(self, key: str) -> bool:
        try:
            item = (await self.client.get_item(TableName=self.table, Key={"pk": {"S": key}},
                                               ConsistentRead=True)).get("Item")
        except Exception as exc:
            raise self.error(exc, "GetItem") from exc
        return item is not None and item["st"]["S"] == "done"

    async def mark_done(self, key: str, *, expires_s: int) -> None:
        try:
            await self.client.update_item(
                TableName=self.table, Key={"pk": {"S": key}}, UpdateExpression="SET st = :done, expires_at = :exp",
                ExpressionAttributeValues={":done": {"S": "done"}, ":exp": {"N": str(expires_s)}})
        except Exception as exc:
            raise self.error(exc, "UpdateItem") from exc

    async def release(self, key: str) -> None:
        try:
            await self.client.delete_item(
                TableName=self.table, Key={"pk": {"S": key}},
                ConditionExpression="st = :pending", ExpressionAttributeValues={":pending": {"S": "pending"}})
        except self.client.exceptions.ConditionalCheckFailedException:
            pass
        except Exception as exc:
            raise self.error(exc, "DeleteItem") from exc
