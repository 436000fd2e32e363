"""Apache Cassandra behind the store protocols (``METRICS_STORE=cassandra``), on acsylla.

One partition per series, item kind and bounded time bucket (:func:`bucket_span_s`); retention is the native
TTL counted from the item's own time; frames are claimed with lightweight transactions. :func:`schema` is the
CQL for IaC.
Reference: docs/design/storage.md#cassandra-store-metrics_storecassandra
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import acsylla
import orjson

from app.clock import Clock, SystemClock
from app.errors import ConfigError, ItemsRefused, StoreError, StoreFatal, StoreUnavailable
from app.settings import PREFIX, CassandraSettings, StorageSettings
from app.storage._shared import decode, encode, fan_out
from app.storage.codec import pack, unpack
from app.storage.protocol import DIGEST, SUMMARY, Kind, MetricItem, Progress, TokenInfo

log = logging.getLogger(__name__)

DAY_S = 86_400
PARTITION_ROWS = 720
"""A partition holds one series' items of one kind over at least a day and at least this many steps."""
MAX_TTL_S = 630_720_000
"""Cassandra's largest TTL (20 years)."""
MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Half the default commit log segment (32 MiB): a larger mutation is refused by the node."""
PAGE_ROWS = 1_000
PROGRESS_SCOPE = "metrics-1m"

_RETRIABLE = tuple(getattr(acsylla.errors, n) for n in (
    "CassErrorLibNoHostsAvailable", "CassErrorLibRequestTimedOut", "CassErrorLibUnableToConnect",
    "CassErrorLibRequestQueueFull", "CassErrorLibNoStreams", "CassErrorLibWriteError",
    "CassErrorLibUnableToDetermineProtocol", "CassErrorServerUnavailable", "CassErrorServerOverloaded",
    "CassErrorServerIsBootstrapping", "CassErrorServerReadTimeout", "CassErrorServerWriteTimeout",
    "CassErrorServerReadFailure", "CassErrorServerWriteFailure", "CassErrorServerTruncateError",
    "CassErrorServerServerError", "CassExceptionConnectionError"))
"""Failures where the same statement may succeed later: the node is down, overloaded or slow. A write that
timed out may have been applied; every write here is idempotent (deterministic keys, or an LWT)."""


class _ShardInfoFilter(logging.Filter):
    """acsylla is built on ScyllaDB's C++ driver, which logs an error on every connection to Apache
    Cassandra because Cassandra has no shards; nothing is wrong, and the line would bury real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not retrieve sharding info" not in record.getMessage()


logging.getLogger("acsylla").addFilter(_ShardInfoFilter())


def bucket_span_s(step_s: int) -> int:
    """The time span of one partition for items ``step_s`` apart (a resolution, or a block's span). Part of
    the schema: changing it hides stored rows."""
    return max(DAY_S, step_s * PARTITION_ROWS) // DAY_S * DAY_S


def _step_s(resolution_s: int, kind: Kind) -> int:
    """The step a partition's span is sized from: a bucket's resolution, or for summary blocks 60 of them
    (blocks span 24 to 84 resolutions, tables/summary.py: a partition holds at most a few hundred)."""
    return resolution_s * 60 if kind == SUMMARY else resolution_s


def classify(exc: BaseException, *, operation: str, cassandra: CassandraSettings,
             storage: StorageSettings) -> StoreError | StoreUnavailable:
    """A driver failure as StoreUnavailable (retry later) or StoreFatal (an operator must act: credentials,
    grants, schema, or a failure nobody classified). The driver reports nothing as one row's fault; a row
    too large is refused before sending (:meth:`CassandraStore._encode_all`)."""
    if isinstance(exc, (StoreError, StoreUnavailable)):
        return exc
    where = f"{cassandra.hosts}:{cassandra.port}"
    msg = f"Cassandra {operation} at {where} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, (*_RETRIABLE, OSError, TimeoutError)):
        return StoreUnavailable(msg, action=f"the cluster is down, overloaded or unreachable: check the nodes "
                                            f"and {PREFIX}CASSANDRA_HOSTS; retrying",
                                retry_after_s=storage.backoff_base_ms / 1000)  # then the backoff rule
    e = acsylla.errors
    if isinstance(exc, (e.CassErrorServerBadCredentials,)):
        action = f"fix {PREFIX}CASSANDRA_USERNAME / {PREFIX}CASSANDRA_PASSWORD"
    elif isinstance(exc, (e.CassErrorServerUnauthorized,)):
        action = f"grant this role MODIFY and SELECT on keyspace {cassandra.keyspace}"
    elif isinstance(exc, (e.CassErrorServerInvalidQuery, e.CassExceptionInvalidQuery, e.KeyspaceNotFound,
                          e.TableNotFound, e.CassErrorServerConfigError)):
        action = (f"the keyspace {cassandra.keyspace} lacks this schema: set {PREFIX}CREATE_TABLE=1 "
                  "once, or apply the CQL in app/storage/cassandra.py SCHEMA")
    else:
        action = "unexpected error: read the message above and fix the cause (or report a bug); writes stop until then"
    return StoreFatal(msg, action=action)


KEYSPACE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
"""An unquoted CQL keyspace name (Cassandra allows 48 characters). It is interpolated into every statement,
so nothing else is accepted."""
_REPLICATION_ITEM = re.compile(r"\s*'([A-Za-z0-9_.:-]{1,128})'\s*:\s*(?:'([A-Za-z0-9_./:-]{1,128})'|(\d{1,4}))\s*")


def check_keyspace(name: str, *, source: str = f"{PREFIX}CASSANDRA_KEYSPACE") -> str:
    """``name`` if it is a plain CQL keyspace name, else a ConfigError naming where it came from."""
    if not isinstance(name, str) or not KEYSPACE_RE.fullmatch(name):
        raise ConfigError(f"invalid Cassandra keyspace {str(name)[:80]!r} (from {source})",
                          action=f"fix {source}: a letter, then up to 47 letters, digits or _")
    return name


def replication_cql(value: str) -> str:
    """The replication setting parsed as a CQL map (``{'class': '<strategy>', '<key>': <int or 'string'>,
    ...}``) and written back from what was parsed, so only a map reaches the CREATE KEYSPACE statement."""
    action = (f"set {PREFIX}CASSANDRA_REPLICATION to a CQL map such as {{'class': 'NetworkTopologyStrategy', "
              f"'dc1': 3}} (quoted keys; integer or quoted values; no other syntax)")
    text = value.strip() if isinstance(value, str) else ""
    if not (text.startswith("{") and text.endswith("}")) or len(text) > 2048:
        raise ConfigError(f"invalid {PREFIX}CASSANDRA_REPLICATION {str(value)[:80]!r}: not a CQL map", action=action)
    items: dict[str, str] = {}
    for part in text[1:-1].split(","):
        m = _REPLICATION_ITEM.fullmatch(part)
        if m is None:
            raise ConfigError(f"invalid {PREFIX}CASSANDRA_REPLICATION entry {part.strip()[:80]!r}", action=action)
        key, string, number = m.groups()
        if key in items:
            raise ConfigError(f"{PREFIX}CASSANDRA_REPLICATION names {key!r} twice", action=action)
        items[key] = f"'{string}'" if string is not None else str(int(number))
    if not items.get("class", "").startswith("'"):
        raise ConfigError(f"{PREFIX}CASSANDRA_REPLICATION has no 'class' (string)", action=action)
    return "{" + ", ".join(f"'{k}': {v}" for k, v in items.items()) + "}"


def check_config(cassandra: CassandraSettings) -> None:
    """The settings interpolated into CQL, checked at start (a ConfigError says what to fix)."""
    check_keyspace(cassandra.keyspace)
    replication_cql(cassandra.replication)


def schema(cassandra: CassandraSettings) -> list[str]:
    """The keyspace and tables, as CQL (``IF NOT EXISTS``: safe on every start, and for IaC to apply)."""
    ks = check_keyspace(cassandra.keyspace)
    replication = replication_cql(cassandra.replication)
    twcs = ("compaction = {'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', "
            "'compaction_window_size': 1}")
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}",
        f"CREATE TABLE IF NOT EXISTS {ks}.items (app text, proc text, res int, kind text, bucket bigint, "
        f"ts bigint, d blob, z boolean, PRIMARY KEY ((app, proc, res, kind, bucket), ts)) "
        f"WITH CLUSTERING ORDER BY (ts ASC) AND {twcs} AND gc_grace_seconds = 10800",
        f"CREATE TABLE IF NOT EXISTS {ks}.progress (scope text, partition int, through_ms bigint, "
        f"updated_ms bigint, changed blob, PRIMARY KEY (scope, partition))",
        f"CREATE TABLE IF NOT EXISTS {ks}.tokens (key text PRIMARY KEY, app text, kind text, id text, "
        f"created_s bigint, revoked_s bigint)",
        # Tables made before revocation tombstones (Cassandra 5.0's IF NOT EXISTS keeps this safe to re-run).
        f"ALTER TABLE {ks}.tokens ADD IF NOT EXISTS revoked_s bigint",
        f"CREATE TABLE IF NOT EXISTS {ks}.frames (key text PRIMARY KEY, st text, lease_ms bigint) "
        f"WITH gc_grace_seconds = 3600",
    ]


class CassandraSession:
    """One driver session per process and cluster, shared by the metrics store and the token and frame
    tables (each holds a reference; the last ``stop`` closes it). A cluster that is down at start leaves
    the process up and not ready: every call retries the connection (StoreUnavailable meanwhile)."""

    _shared: ClassVar[dict[tuple[str, int, str, str], CassandraSession]] = {}

    def __init__(self, storage: StorageSettings, cassandra: CassandraSettings) -> None:
        check_config(cassandra)
        self.storage, self.cassandra = storage, cassandra
        self._users = 0
        self._session: Any = None
        self._connecting: asyncio.Lock | None = None
        self._prepared: dict[str, asyncio.Task[Any]] = {}
        self._gate: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def of(cls, storage: StorageSettings, cassandra: CassandraSettings) -> CassandraSession:
        key = (cassandra.hosts, cassandra.port, cassandra.keyspace, cassandra.username)
        shared = cls._shared.get(key)
        if shared is None:
            shared = cls._shared[key] = cls(storage, cassandra)
        return shared

    async def acquire(self) -> None:
        self._users += 1
        try:
            await self._connect()
        except StoreUnavailable as exc:
            log.warning("Cassandra unavailable at start; retried on use: %s", exc)

    async def release(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._session is not None:
            session, self._session = self._session, None
            self._prepared.clear()
            await session.close()

    def _for_loop(self) -> asyncio.Semaphore:
        """The in-flight bound of the running loop (asyncio primitives belong to one loop; a CLI or a test
        may run several loops in turn on one session object)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._gate is None or self._connecting is None:
            if self._loop is not None and self._loop is not loop:
                # A session and prepared statements made in another loop cannot be used here: start over.
                self._session = None
                self._prepared.clear()
            self._loop = loop
            self._gate = asyncio.Semaphore(self.cassandra.max_inflight)
            self._connecting = asyncio.Lock()
        return self._gate

    async def _connect(self) -> Any:
        if self._session is not None:
            return self._session
        self._for_loop()
        assert self._connecting is not None
        async with self._connecting:
            if self._session is not None:
                return self._session
            c = self.cassandra
            cluster = acsylla.create_cluster(
                [h.strip() for h in c.hosts.split(",") if h.strip()], port=c.port,
                username=c.username or None, password=c.password.get_secret_value() or None,
                consistency=c.consistency, serial_consistency="LOCAL_SERIAL",
                request_timeout=c.request_timeout_s, connect_timeout=self.storage.connect_timeout_s,
                token_aware_routing=True, log_level="error")
            try:
                session = await cluster.create_session()
                if self.storage.create_table:
                    for cql in schema(c):
                        await session.execute(acsylla.create_statement(cql, timeout=60))
            except Exception as exc:
                raise classify(exc, operation="connect", cassandra=c, storage=self.storage) from exc
            self._session = session
            log.info("Cassandra session ready: %s:%d keyspace %s", c.hosts, c.port, c.keyspace)
            return session

    async def _statement(self, session: Any, cql: str) -> Any:
        task = self._prepared.get(cql)
        if task is None or (task.done() and task.exception() is not None):
            task = self._prepared[cql] = asyncio.ensure_future(session.create_prepared(cql))
        return await asyncio.shield(task)

    async def rows(self, cql: str, params: Sequence[Any], *, operation: str, serial: bool = False,
                   page_rows: int = PAGE_ROWS) -> list[tuple[Any, ...]]:
        """Every row of one prepared statement (all pages), as tuples in the statement's column order.
        ``serial``: read at LOCAL_SERIAL, seeing any lightweight transaction in progress."""
        async with self._for_loop():
            try:
                session = await self._connect()
                prepared = await self._statement(session, cql)
                stmt = prepared.bind(page_size=page_rows,
                                     consistency=acsylla.Consistency.LOCAL_SERIAL if serial else None)
                stmt.bind_list(list(params))
                out: list[tuple[Any, ...]] = []
                while True:
                    result = await session.execute(stmt)
                    out.extend(row.as_tuple() for row in result)
                    if not result.has_more_pages():
                        return out
                    stmt.set_page_state(result.page_state())
            except Exception as exc:
                raise classify(exc, operation=operation, cassandra=self.cassandra, storage=self.storage) from exc

    async def applied(self, cql: str, params: Sequence[Any], *, operation: str) -> tuple[bool, dict[str, Any]]:
        """A lightweight transaction: whether it applied, and the row it found when it did not."""
        async with self._for_loop():
            try:
                session = await self._connect()
                prepared = await self._statement(session, cql)
                stmt = prepared.bind()
                stmt.bind_list(list(params))
                row = (await session.execute(stmt)).first()
            except Exception as exc:
                raise classify(exc, operation=operation, cassandra=self.cassandra, storage=self.storage) from exc
        found: dict[str, Any] = row.as_dict() if row is not None else {}
        return bool(found.pop("[applied]", False)), found

    async def ping(self) -> None:
        await self.rows("SELECT release_version FROM system.local", (), operation="ping")


class _Part:
    """What the store and the tables share: the session, and start/stop/ping on it."""

    def __init__(self, storage: StorageSettings, cassandra: CassandraSettings, clock: Clock | None = None) -> None:
        self.storage, self.cassandra = storage, cassandra
        self.ks = cassandra.keyspace
        self.db = CassandraSession.of(storage, cassandra)
        self.clock: Clock = clock or SystemClock()
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.db.acquire()

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.db.release()

    async def ping(self) -> None:
        await self.db.ping()


class CassandraStore(_Part):
    """MetricsStore on Cassandra (table ``items`` and ``progress``)."""

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        """Every item as its own single-partition INSERT, sent concurrently (bounded by the session);
        returns when all were acknowledged at the configured consistency. An item too large for a mutation
        does not cost the others: they are written, then ItemsRefused names it."""
        if not items:
            return
        rows, refused = await encode(items, self.storage.compress_over_bytes, self._encode_all)
        cql = (f"INSERT INTO {self.ks}.items (app, proc, res, kind, bucket, ts, d, z) "
               f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?")
        await fan_out(self.db.rows(cql, row, operation="INSERT items") for row in rows)
        if refused:
            raise ItemsRefused(f"Cassandra cannot store {len(refused)} of {len(items)} items; the others were "
                               f"written: {refused[0][1]}", refused=refused, action=refused[0][1].action)

    def _encode_all(self, items: Sequence[MetricItem]) -> tuple[list[list[Any]], list[tuple[MetricItem, StoreError]]]:
        now_s = self.clock.now_ms() // 1000
        rows: dict[tuple[str, str, int, str, int], list[Any]] = {}
        refused: list[tuple[MetricItem, StoreError]] = []
        for item in items:
            ttl_s = min(MAX_TTL_S, item.ts_s + item.span_s + self.storage.ttl_s - now_s)
            if ttl_s <= 0:
                continue  # already past retention: it would expire on arrival
            data, zipped = pack(item.payload, self.storage.compress_over_bytes)
            if len(data) > MAX_VALUE_BYTES:
                refused.append((item, StoreError(
                    f"item {item.app}/{item.process_type}/{item.resolution_s} ts={item.ts_s} is "
                    f"{len(data)} bytes after compression, over the node's mutation limit",
                    action="lower the aggregate's size (e.g. METRICS_DIGEST_MAX_CENTROIDS); retrying cannot help")))
                continue
            bucket = item.ts_s - item.ts_s % bucket_span_s(_step_s(item.resolution_s, item.kind))
            rows[(item.app, item.process_type, item.resolution_s, item.kind, item.ts_s)] = [
                item.app, item.process_type, item.resolution_s, item.kind, bucket, item.ts_s, data, zipped,
                ttl_s]
        return list(rows.values()), refused

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int, kind: Kind = DIGEST) -> list[MetricItem]:
        """One slice per partition the range touches, read concurrently, concatenated in time order."""
        if until_s <= since_s:
            return []
        span = bucket_span_s(_step_s(resolution_s, kind))
        buckets = range(since_s - since_s % span, until_s, span)
        cql = (f"SELECT ts, d, z FROM {self.ks}.items WHERE app = ? AND proc = ? AND res = ? AND kind = ? "
               f"AND bucket = ? AND ts >= ? AND ts < ?")
        parts = await fan_out(
            self.db.rows(cql, [app, process_type, resolution_s, kind, b, since_s, until_s],
                         operation="SELECT items") for b in buckets)
        raws = [r for part in parts for r in part]

        def build() -> list[MetricItem]:
            return [MetricItem(app, process_type, resolution_s, ts, unpack(d, bool(z), f"{app}/{process_type} ts={ts}"),
                               kind) for ts, d, z in raws]

        return await decode(build, sum(len(d) for _, d, z in raws if z))

    async def series(self) -> list[tuple[str, str]]:
        """The partition keys only (a scan of every token range)."""
        rows = await self.db.rows(f"SELECT DISTINCT app, proc, res, kind, bucket FROM {self.ks}.items", [],
                                  operation="SELECT DISTINCT items")
        return sorted({(app, proc) for app, proc, res, kind, _ in rows if res == 60 and kind == DIGEST})

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        cql = (f"INSERT INTO {self.ks}.progress (scope, partition, through_ms, updated_ms, changed) "
               f"VALUES (?, ?, ?, ?, ?) USING TTL ?")
        await fan_out(self.db.rows(cql, [PROGRESS_SCOPE, p.partition, p.stored_through_ms, p.updated_ms,
                                         orjson.dumps(p.changed), self.storage.ttl_s],
                                   operation="INSERT progress") for p in progress)

    async def progress(self) -> list[Progress]:
        rows = await self.db.rows(f"SELECT partition, through_ms, updated_ms, changed FROM {self.ks}.progress "
                                  f"WHERE scope = ?", [PROGRESS_SCOPE], operation="SELECT progress")
        return [Progress(p, through, updated, {str(k): int(v) for k, v in orjson.loads(changed).items()})
                for p, through, updated, changed in rows]


class CassandraTokens(_Part):
    """TokenTable on table ``tokens`` (``revoked_s`` set on a revoked token's tombstone)."""

    async def put_token(self, key: str, info: TokenInfo) -> None:
        # A live token's INSERT does not name revoked_s, so a stored one stays (columns merge): a revocation is
        # never undone by a copy.
        if info.revoked_s:
            await self.db.rows(f"INSERT INTO {self.ks}.tokens (key, app, kind, id, created_s, revoked_s) "
                               f"VALUES (?, ?, ?, ?, ?, ?)",
                               [key, info.app, info.kind, info.id, info.created_s, info.revoked_s],
                               operation="INSERT tokens")
            return
        await self.db.rows(f"INSERT INTO {self.ks}.tokens (key, app, kind, id, created_s) VALUES (?, ?, ?, ?, ?)",
                           [key, info.app, info.kind, info.id, info.created_s], operation="INSERT tokens")

    async def get_token(self, key: str) -> TokenInfo | None:
        rows = await self.db.rows(f"SELECT id, app, kind, created_s, revoked_s FROM {self.ks}.tokens WHERE key = ?",
                                  [key], operation="SELECT tokens")
        return self._info(*rows[0]) if rows else None

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        rows = await self.db.rows(f"SELECT key, id, app, kind, created_s, revoked_s FROM {self.ks}.tokens", [],
                                  operation="SELECT tokens")
        return [(key, self._info(*rest)) for key, *rest in rows]

    @staticmethod
    def _info(id: str, app: str, kind: str, created_s: int, revoked_s: int | None) -> TokenInfo:
        return TokenInfo(id, app, kind, created_s, revoked_s or 0)

    async def delete_token(self, key: str) -> None:
        await self.db.rows(f"DELETE FROM {self.ks}.tokens WHERE key = ?", [key], operation="DELETE tokens")


class CassandraFrames(_Part):
    """FrameTable on table ``frames``, with lightweight transactions (Paxos) for every change, so a claim,
    its takeover and its completion are ordered even across ingest processes."""

    def _ttl_s(self, expires_s: int) -> int:
        return max(1, expires_s - self.clock.now_ms() // 1000)

    async def claim(self, key: str, *, now_ms: int, lease_until_ms: int, expires_s: int) -> bool:
        ttl_s = self._ttl_s(expires_s)
        applied, found = await self.db.applied(
            f"INSERT INTO {self.ks}.frames (key, st, lease_ms) VALUES (?, 'pending', ?) IF NOT EXISTS USING TTL ?",
            [key, lease_until_ms, ttl_s], operation="INSERT frames IF NOT EXISTS")
        if applied:
            return True
        if found.get("st") != "pending" or int(found.get("lease_ms") or 0) >= now_ms:
            return False
        # Pending with an expired lease: its producer died. Take it over unless another process just did.
        applied, _ = await self.db.applied(
            f"UPDATE {self.ks}.frames USING TTL ? SET lease_ms = ? WHERE key = ? IF st = 'pending' AND lease_ms = ?",
            [ttl_s, lease_until_ms, key, found["lease_ms"]], operation="UPDATE frames IF")
        return applied

    async def is_done(self, key: str) -> bool:
        rows = await self.db.rows(f"SELECT st FROM {self.ks}.frames WHERE key = ?", [key], serial=True,
                                  operation="SELECT frames")
        return bool(rows) and rows[0][0] == "done"

    async def mark_done(self, key: str, *, expires_s: int) -> None:
        ttl_s = self._ttl_s(expires_s)
        applied, _ = await self.db.applied(
            f"UPDATE {self.ks}.frames USING TTL ? SET st = 'done', lease_ms = 0 WHERE key = ? IF EXISTS",
            [ttl_s, key], operation="UPDATE frames IF EXISTS")
        if not applied:  # the claim expired meanwhile: record the delivery anyway
            await self.db.applied(
                f"INSERT INTO {self.ks}.frames (key, st, lease_ms) VALUES (?, 'done', 0) IF NOT EXISTS USING TTL ?",
                [key, ttl_s], operation="INSERT frames IF NOT EXISTS")

    async def release(self, key: str) -> None:
        await self.db.applied(f"DELETE FROM {self.ks}.frames WHERE key = ? IF st = 'pending'", [key],
                              operation="DELETE frames IF")
