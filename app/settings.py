"""All settings, read once from environment variables (prefix ``METRICS_``), in sections.

The defaults run on the embedded stack (`make run`: Apache Kafka on 127.0.0.1:9092, dynalite on :8000), so
local commands need no variables; production points the same names at a real Kafka and at AWS DynamoDB
(`METRICS_DYNAMODB_ENDPOINT` empty). AWS credentials come from the standard boto chain (env, profile,
IRSA web identity), never from these settings.

:class:`Settings` is the frozen composition of one frozen section per concern (``settings.kafka``,
``settings.windows``, ``settings.dynamodb``, ...). Composition roots (the worker, the writer, the CLI) hold it
and hand each class the section it needs, so a class's signature says which settings it reads. Every field
declares its environment variable (``validation_alias``); the names are the same as when the settings were
one flat class, and :data:`FLAT` maps those flat names (``partitions``, ``table_name``) to their sections for
:meth:`Settings.of` and :meth:`Settings.replace`. A malformed value is a ConfigError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from app.errors import ConfigError

PREFIX = "METRICS_"
WINDOW_S = 60  # the pipeline's unit of aggregation; rollups are built from these minutes
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
STORES = ("dynamodb", "cassandra")
LOG_FORMATS = ("text", "json")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _env_bool(value: object) -> object:
    """Booleans as the variables have always been read: 1/0, true/false, yes/no (any case), nothing else."""
    if isinstance(value, str):
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{value!r} is not one of 1/0/true/false/yes/no")
        return value.lower() in _TRUE
    return value


EnvBool = Annotated[bool, BeforeValidator(_env_bool)]


class _EnvMapping(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ``, or a test's or a rendered
    chart's variables), matched case-sensitively by each field's ``validation_alias``. pydantic-settings'
    own cloud sources (AWS, Azure) override ``_load_env_vars`` the same way."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls, case_sensitive=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return dict(self._given)


class Section(BaseSettings):
    """A frozen group of settings. Built with its defaults (``KafkaSettings(partitions=2)`` in tests) or by
    :meth:`Settings.from_env`; the environment is read only there, never implicitly."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=True, populate_by_name=True,
                                      use_attribute_docstrings=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # only the values given: Settings.from_env reads the environment

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A whole-number setting takes digits only: pydantic's lax mode would read ``4.0`` as 4, and an
        operator who wrote 4.5 or 4.0 means something this setting cannot hold."""
        field = cls.model_fields.get(info.field_name or "")
        if (field is not None and field.annotation is int and isinstance(value, str)
                and not value.strip().lstrip("+-").isdigit()):
            raise ValueError(f"{value!r} is not a whole number")
        return value

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> its environment variable."""
        return {name: str(f.validation_alias) for name, f in cls.model_fields.items()}

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Self:
        """The section from ``env`` (``METRICS_*`` names), then ``overrides`` (field names); ConfigError when
        a value is malformed or makes no sense."""
        by_env = {alias: name for name, alias in cls.env_names().items()}
        found = {by_env[k]: v for k, v in _EnvMapping(cls, env)().items() if k in by_env}
        return _checked(cls, {**found, **overrides})

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field names), validated like the original."""
        return _checked(type(self), {**dict(self), **changes})


S = TypeVar("S", bound=Section)


def _checked(cls: type[S], values: dict[str, Any]) -> S:
    """``cls(**values)``; pydantic's type errors become a ConfigError naming the variable (a check of a
    section raises its own ConfigError with the operator's action)."""
    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = str(err["loc"][0]) if err["loc"] else ""
        name = {alias: n for n, alias in cls.env_names().items()}.get(where, where)
        field = cls.model_fields.get(name)
        env = cls.env_names().get(name, name)
        if field is None:
            raise TypeError(f"{cls.__name__} has no setting {name!r}") from None
        kind = getattr(field.annotation, "__name__", str(field.annotation))
        shown = "" if field.annotation is SecretStr else f"={err['input']!r}"
        raise ConfigError(f"{env}{shown} is not a valid {kind}",
                          action="fix the environment variable and restart") from None


class KafkaSettings(Section):
    """Where Kafka is, how every client of every role talks to it, and the topics the pipeline creates
    (app/ops/topics.py), with their partitions and sizes."""

    broker_url: str = Field("kafka://127.0.0.1:9092", validation_alias="METRICS_BROKER_URL")
    """Faust broker URL(s), ``kafka://host:port;kafka://host2:port``."""
    security_protocol: str = Field("PLAINTEXT", validation_alias="METRICS_KAFKA_SECURITY_PROTOCOL")
    """``PLAINTEXT``, ``SSL`` (TLS to every broker, e.g. Amazon MSK's TLS listener on port 9094),
    ``SASL_SSL`` (TLS plus SASL: MSK's SCRAM listener on 9096, Confluent Cloud's PLAIN) or
    ``SASL_PLAINTEXT``. Used by every Kafka client of every role: workers, ingest, topic creation, the load
    generator."""
    sasl_mechanism: str = Field("SCRAM-SHA-512", validation_alias="METRICS_KAFKA_SASL_MECHANISM")
    """With SASL_*: ``SCRAM-SHA-512`` (MSK), ``SCRAM-SHA-256`` or ``PLAIN`` (Confluent Cloud API keys)."""
    sasl_username: str = Field("", validation_alias="METRICS_KAFKA_SASL_USERNAME")
    sasl_password: SecretStr = Field(SecretStr(""), validation_alias="METRICS_KAFKA_SASL_PASSWORD")
    """With SASL_*: the credentials; put the password in a Secret (Helm ``credentials.secretEnv``)."""
    ssl_cafile: str = Field("", validation_alias="METRICS_KAFKA_SSL_CAFILE")
    """PEM bundle of the CA(s) that signed the brokers' certificates; empty: the system trust store."""
    ssl_certfile: str = Field("", validation_alias="METRICS_KAFKA_SSL_CERTFILE")
    ssl_keyfile: str = Field("", validation_alias="METRICS_KAFKA_SSL_KEYFILE")
    """Client certificate chain and key (PEM) for brokers that require mutual TLS: both or neither."""
    app_id: str = Field("minutely", validation_alias="METRICS_APP_ID")
    """Consumer group and changelog prefix. Two deployments on one Kafka need different ids."""
    partitions: int = Field(8, validation_alias="METRICS_PARTITIONS")
    """Partitions of ``observations`` (and of the window table's changelog, which must match).
    Workers scale out up to this number; it cannot be lowered later without a new app_id."""
    replication_factor: int = Field(1, validation_alias="METRICS_REPLICATION_FACTOR")
    observations_topic: str = Field("observations", validation_alias="METRICS_OBSERVATIONS_TOPIC")
    metrics_topic: str = Field("metrics-1m", validation_alias="METRICS_METRICS_TOPIC")
    dlq_topic: str = Field("observations-dlq", validation_alias="METRICS_DLQ_TOPIC")
    sink_dlq_topic: str = Field("metrics-1m-dlq", validation_alias="METRICS_SINK_DLQ_TOPIC")
    checkpoints_topic: str = Field("metrics-1m-checkpoints", validation_alias="METRICS_CHECKPOINTS_TOPIC")
    """Compacted, partitioned like ``metrics-1m``: how far each partition is closed, so a second store's
    writer (app/writer.py) can say what it has stored (agents/progress.py)."""
    alerts_topic: str = Field("alerts", validation_alias="METRICS_ALERTS_TOPIC")
    """Monitor transitions (firing, still_firing, resolved), key = app."""
    autoscale_topic: str = Field("autoscale", validation_alias="METRICS_AUTOSCALE_TOPIC")
    """One autoscaling decision per policy and closed minute, key = app."""
    policy_commands_topic: str = Field("policy-commands", validation_alias="METRICS_POLICY_COMMANDS_TOPIC")
    """Configuration changes from the web API, key = app, so each lands in the partition of the app's
    minutes and is applied by the worker that evaluates them (agents/alerts.py)."""
    topic_max_message_bytes: int = Field(1024 * 1024, validation_alias="METRICS_TOPIC_MAX_MESSAGE_BYTES")
    """``max.message.bytes`` set on ``metrics-1m``, ``observations`` and the DLQ topics when they are
    created (app/ops/topics.py); 1 MB, the broker default. Changelogs get ``changelog_max_message_bytes``."""
    changelog_max_message_bytes: int = Field(8 * 1024 * 1024, validation_alias="METRICS_CHANGELOG_MAX_MESSAGE_BYTES")
    """``max.message.bytes`` of the table changelogs (an open window holds up to 100 timers' exact values,
    zlib-compressed), and the producer's ``max_request_size``."""
    session_timeout_s: float = Field(10.0, validation_alias="METRICS_SESSION_TIMEOUT_S")
    """Group session timeout. The group join waits about half of it, and a crashed worker's partitions
    are reassigned only after it: low values recover faster but tolerate shorter GC/IO stalls."""
    heartbeat_interval_s: float = Field(1.0, validation_alias="METRICS_HEARTBEAT_INTERVAL_S")
    rebalance_timeout_s: float = Field(6.0, validation_alias="METRICS_REBALANCE_TIMEOUT_S")
    fetch_max_partition_bytes: int = Field(16 * 1024 * 1024, validation_alias="METRICS_FETCH_MAX_PARTITION_BYTES")
    """Per-partition fetch size. Faust's 1 MB default returns ~16 batched messages per fetch and leaves
    the worker waiting on the network; measured throughput rises with larger fetches."""
    max_batch_bytes: int = Field(1_000_000, validation_alias="METRICS_KAFKA_MAX_BATCH_BYTES")
    """Largest record batch the ingest producer builds. It must stay below the brokers' ``message.max.bytes``
    (1 MB by default on Apache Kafka and Amazon MSK), or Kafka refuses the batch (MessageSizeTooLarge) and
    the requests in it get 503. Raise both together for more throughput per partition."""
    produce_timeout_s: float = Field(10.0, validation_alias="METRICS_PRODUCE_TIMEOUT_S")
    """Kafka must acknowledge (acks=all) within this, else the request gets 503 and the sender retries."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.partitions < 1:
            raise ConfigError("partitions must be >= 1", action=f"set {PREFIX}PARTITIONS")
        if self.security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(f"kafka_security_protocol must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, got "
                              f"{self.security_protocol!r}", action=f"set {PREFIX}KAFKA_SECURITY_PROTOCOL")
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ConfigError(f"kafka_sasl_mechanism must be one of {', '.join(KAFKA_SASL_MECHANISMS)}, got "
                                  f"{self.sasl_mechanism!r}", action=f"set {PREFIX}KAFKA_SASL_MECHANISM")
            if not (self.sasl_username and self.sasl_password.get_secret_value()):
                raise ConfigError(f"{self.security_protocol} needs a SASL username and password",
                                  action=f"set {PREFIX}KAFKA_SASL_USERNAME and {PREFIX}KAFKA_SASL_PASSWORD")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("kafka_ssl_certfile and kafka_ssl_keyfile go together",
                              action=f"set both {PREFIX}KAFKA_SSL_CERTFILE and {PREFIX}KAFKA_SSL_KEYFILE, or neither")
        return self


class WindowSettings(Section):
    """The worker's one-minute windows (tables/windows.py) and the batches they are folded in; the worker's
    tables are kept in RocksDB under ``data_dir``."""

    grace_s: float = Field(30.0, validation_alias="METRICS_GRACE_S")
    """Event-time lateness accepted after a minute ends; later events are dead-lettered as late."""
    idle_timeout_s: float = Field(30.0, validation_alias="METRICS_IDLE_TIMEOUT_S")
    """A partition with no input for this long closes its due minutes on the wall clock."""
    closed_keep_s: float = Field(0.0, validation_alias="METRICS_CLOSED_KEEP_S")
    """Keep a closed minute in the window table this long after it was emitted; a worker restarted within
    it sends the minute again, identical (``minutes_resent``). Off by default: it was a workaround for
    restarted sinks skipping minutes emitted but not stored, whose cause was Faust's consumer
    (app/faust_patches.py fixes it; docs/design/windows.md). Set e.g. 30 for a second line of defence."""
    max_future_s: float = Field(300.0, validation_alias="METRICS_MAX_FUTURE_S")
    """Events stamped further than this ahead of the wall clock are rejected (they would close windows
    of everyone else on the partition)."""
    digest_max_centroids: int = Field(1000, validation_alias="METRICS_DIGEST_MAX_CENTROIDS")
    """t-digest size. Measured on lognormal latencies with 3,000 values a minute, worst p99 error over 20
    minutes: 300 -> 2.1 %, 500 -> 1.2 %, 1000 -> 0.0 % (30,000 values: 1.1 / 0.7 / 0.5 %). 1000 keeps
    every percentile within 1 %; a full digest is ~24-31 KB of JSON, ~4-5 KB compressed as stored."""
    max_message_bytes: int = Field(4 * 1024 * 1024, validation_alias="METRICS_MAX_MESSAGE_BYTES")
    """Larger input messages are dead-lettered whole (size only; nothing inside is trusted)."""
    minute_max_bytes: int = Field(900 * 1024, validation_alias="METRICS_MINUTE_MAX_BYTES")
    """Largest serialized minute sent to ``metrics-1m``, below the topic's ``max.message.bytes`` (leaving
    room for the key and the record's framing). A larger minute is degraded to fit (timers' exact values
    become t-digests, then fewer centroids; then its largest custom metric names are dead-lettered):
    a minute the broker refuses would stop the partition for every tenant (``minutes_degraded``)."""
    batch_max: int = Field(2000, validation_alias="METRICS_BATCH_MAX")
    """Input messages aggregated per table write; bigger batches amortize changelog writes."""
    batch_within_s: float = Field(0.2, validation_alias="METRICS_BATCH_WITHIN_S")
    """Longest a folded-in message waits to be persisted and acknowledged when input goes quiet."""
    batch_max_bytes: int = Field(8 * 1024 * 1024, validation_alias="METRICS_BATCH_MAX_BYTES")
    """Input bytes folded in per table write (about 60k batched observations): bounds the work a crash
    repeats and the changelog traffic, which grows with the number of writes."""
    close_interval_s: float = Field(1.0, validation_alias="METRICS_CLOSE_INTERVAL_S")
    """How often the wall-clock closer looks for idle partitions."""
    data_dir: str = Field("./data", validation_alias="METRICS_DATA_DIR")
    store_url: str = Field("rocksdb://", validation_alias="METRICS_STORE_URL")

    @property
    def grace_ms(self) -> int:
        return int(self.grace_s * 1000)

    @property
    def idle_timeout_ms(self) -> int:
        return int(self.idle_timeout_s * 1000)

    @property
    def closed_keep_ms(self) -> int:
        return int(self.closed_keep_s * 1000)

    @property
    def max_future_ms(self) -> int:
        return int(self.max_future_s * 1000)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.grace_s < 0 or self.idle_timeout_s <= 0:
            raise ConfigError("grace_s must be >= 0 and idle_timeout_s > 0",
                              action=f"set {PREFIX}GRACE_S / {PREFIX}IDLE_TIMEOUT_S")
        if self.closed_keep_s < 0:
            raise ConfigError("closed_keep_s must be >= 0", action=f"set {PREFIX}CLOSED_KEEP_S")
        if not 20 <= self.digest_max_centroids <= 2000:
            raise ConfigError("digest_max_centroids must be within 20..2000",
                              action=f"set {PREFIX}DIGEST_MAX_CENTROIDS")
        return self


class StorageSettings(Section):
    """Which store holds minutes, rollups, summary blocks, events, tokens and frame ids, and how every writer
    writes to it (retention, compression, backoff, the sink's batches), whichever the backend."""

    backend: str = Field("dynamodb", validation_alias="METRICS_STORE")
    """Where minutes, rollups, summary blocks, events, tokens and frame ids live: ``dynamodb`` or
    ``cassandra``. A move between stores without downtime: ``python -m app migration``
    (docs/operations/migration.md)."""
    ttl_days: float = Field(30.0, validation_alias="METRICS_TTL_DAYS")
    """Retention: items expire this long after the minute they describe (event time, so replays do not
    extend retention)."""
    create_table: EnvBool = Field(True, validation_alias="METRICS_CREATE_TABLE")
    """Create the table (on-demand billing, TTL enabled) at start. Off in production with IaC-managed tables."""
    compress_over_bytes: int = Field(1024, validation_alias="METRICS_COMPRESS_OVER_BYTES")
    """Payloads larger than this are stored gzip-compressed (flag ``z``) when that makes them smaller.
    DynamoDB bills a write unit per started KB, so anything over one is worth it: a summary block of JSON
    lines shrinks ~5x (measured by ``make bench-store``: 8 KB here cost blocks 0.77-0.85 write units per
    series-minute). A version 2 record is deflated already and stored as it is."""
    connect_timeout_s: float = Field(2.0, validation_alias="METRICS_CONNECT_TIMEOUT_S")
    backoff_base_ms: int = Field(50, validation_alias="METRICS_BACKOFF_BASE_MS")
    backoff_max_ms: int = Field(5000, validation_alias="METRICS_BACKOFF_MAX_MS")
    sink_batch_max: int = Field(500, validation_alias="METRICS_SINK_BATCH_MAX")
    sink_within_s: float = Field(0.5, validation_alias="METRICS_SINK_WITHIN_S")
    fatal_retry_s: float = Field(30.0, validation_alias="METRICS_STORE_FATAL_RETRY_S")
    """How often the sink (or the events job), stopped on an error only the operator can fix (credentials,
    permissions, a missing table), tries again; nothing is committed or dead-lettered meanwhile."""
    record_format: int = Field(2, validation_alias="METRICS_STORE_RECORD_FORMAT")
    """The format the sink and the rollup job write minute and rollup items in (tables/record.py): 2, compact
    binary (~0.5 KB a minute, one DynamoDB write unit), or 1, JSON (1-5 KB). Every reader reads both. A
    release that writes 2 must not run beside readers that know only 1: in a rolling upgrade from such a
    release, set 1 until every process is upgraded, then 2."""

    @property
    def ttl_s(self) -> int:
        return int(self.ttl_days * 86400)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.backend not in STORES:
            raise ConfigError(f"store must be one of {', '.join(STORES)}, got {self.backend!r}",
                              action=f"set {PREFIX}STORE=dynamodb or {PREFIX}STORE=cassandra")
        if self.ttl_days <= 0:
            raise ConfigError("ttl_days must be > 0", action=f"set {PREFIX}TTL_DAYS")
        if self.record_format not in (1, 2):
            raise ConfigError(f"record_format must be 1 or 2, got {self.record_format}",
                              action=f"set {PREFIX}STORE_RECORD_FORMAT=2 (or 1 while older readers run)")
        return self


class DynamoSettings(Section):
    """The DynamoDB backend (``METRICS_STORE=dynamodb``): where the table is and how the one client reaches it."""

    endpoint: str = Field("http://127.0.0.1:8000", validation_alias="METRICS_DYNAMODB_ENDPOINT")
    """The embedded stack's DynamoDB server (dynalite, ``make run``) by default, so local commands need no
    variables. Empty: AWS (the region's endpoint, credentials from the standard chain); the Helm chart sets
    it empty unless ``dynamodb.endpoint`` says otherwise."""
    region: str = Field("us-east-1", validation_alias="METRICS_AWS_REGION")
    table_name: str = Field("minutely-metrics", validation_alias="METRICS_TABLE_NAME")
    max_pool_connections: int = Field(64, validation_alias="METRICS_MAX_POOL_CONNECTIONS")
    """aiohttp connector limit. BatchWriteItem is latency bound: with 10 ms injected latency 64 connections
    gave ~30 % more throughput than the default 10 (measured on this machine kind, shared/notes/stack.md)."""
    keepalive_timeout_s: float = Field(60.0, validation_alias="METRICS_KEEPALIVE_TIMEOUT_S")
    """Idle keep-alive per pooled connection (aiobotocore default 12 s): avoids TLS handshakes between
    sink batches that arrive once per minute."""
    read_timeout_s: float = Field(10.0, validation_alias="METRICS_READ_TIMEOUT_S")
    """Per socket read; a stuck request is abandoned and retried instead of stalling the sink."""
    max_attempts: int = Field(5, validation_alias="METRICS_MAX_ATTEMPTS")
    """botocore 'standard' retries after the first request (5 -> up to 6 requests) for throttling and 5xx;
    UnprocessedItems and longer outages are retried by the store and the sink with their own backoff."""
    sink_concurrency: int = Field(16, validation_alias="METRICS_SINK_CONCURRENCY")
    """BatchWriteItem requests in flight from one sink."""


class CassandraSettings(Section):
    """The Apache Cassandra backend (``METRICS_STORE=cassandra``)."""

    hosts: str = Field("127.0.0.1", validation_alias="METRICS_CASSANDRA_HOSTS")
    """Contact points, comma-separated; the driver discovers the rest of the ring from them."""
    port: int = Field(9042, validation_alias="METRICS_CASSANDRA_PORT")
    keyspace: str = Field("minutely", validation_alias="METRICS_CASSANDRA_KEYSPACE")
    replication: str = Field("{'class': 'SimpleStrategy', 'replication_factor': 1}",
                             validation_alias="METRICS_CASSANDRA_REPLICATION")
    """Used only when the keyspace is created (``create_table``). Production: ``{'class':
    'NetworkTopologyStrategy', '<dc>': 3}``."""
    consistency: str = Field("LOCAL_QUORUM", validation_alias="METRICS_CASSANDRA_CONSISTENCY")
    """Reads and writes: a write acknowledged by a quorum is read by a quorum (no stale chart after a
    node fails). One node (the embedded stack): quorum is that node."""
    username: str = Field("", validation_alias="METRICS_CASSANDRA_USERNAME")
    password: SecretStr = Field(SecretStr(""), validation_alias="METRICS_CASSANDRA_PASSWORD")
    max_inflight: int = Field(128, validation_alias="METRICS_CASSANDRA_MAX_INFLIGHT")
    """Statements in flight from one process. Writes are single-partition INSERTs sent concurrently (an
    unlogged batch across partitions only moves the fan-out to one coordinator); this bounds them."""
    request_timeout_s: float = Field(12.0, validation_alias="METRICS_CASSANDRA_REQUEST_TIMEOUT_S")
    """Per statement, after which it fails as retriable (the server's own write timeout is 2 s)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_inflight < 1:
            raise ConfigError("cassandra_max_inflight must be >= 1", action=f"set {PREFIX}CASSANDRA_MAX_INFLIGHT")
        return self


class MigrationSettings(Section):
    """Moving between stores (app/migration/)."""

    topic: str = Field("minutely-migration", validation_alias="METRICS_MIGRATION_TOPIC")
    """Compacted, one partition: the migration state every process follows (``python -m app migration``)."""
    shadow_timeout_s: float = Field(2.0, validation_alias="METRICS_SHADOW_TIMEOUT_S")
    """A shadow read slower than this is abandoned and counted (``shadow_timeouts``)."""
    wait_s: float = Field(30.0, validation_alias="METRICS_MIGRATION_WAIT_S")
    """At start, how long a process waits for the migration state before serving with the configured store
    (and following the state once Kafka answers)."""


class IngestSettings(Section):
    """The ingest process (drains, JSON API): what one request may cost, and the frame-id dedup."""

    max_body_bytes: int = Field(4 * 1024 * 1024, validation_alias="METRICS_INGEST_MAX_BODY_BYTES")
    """Larger request bodies get 413. Logplex frames are far smaller; JSON batches should be split."""
    body_timeout_s: float = Field(10.0, validation_alias="METRICS_INGEST_BODY_TIMEOUT_S")
    """A request body must arrive within this time, or 408 and the connection is closed: slow-body clients
    (slowloris) cannot hold connections. A 4 MB body needs ~3.3 Mbit/s."""
    max_inflight_bytes: int = Field(64 * 1024 * 1024, validation_alias="METRICS_INGEST_MAX_INFLIGHT_BYTES")
    """Request bytes one ingest process holds at once (bodies being read, parsed or produced). A request that
    would go over it gets 503 with Retry-After before its body is read: under overload memory stays bounded
    and senders come back later (Logplex retries a 5xx), instead of every request queueing in memory."""
    max_line_bytes: int = Field(10_240, validation_alias="METRICS_INGEST_MAX_LINE_BYTES")
    """Longest drain line (syslog message) parsed. Logplex lines are far shorter (it splits app output
    long before this); a longer one is dead-lettered with its first 2 KB, never parsed, so no line can cost
    more than a bounded parse."""
    parse_inline_bytes: int = Field(64 * 1024, validation_alias="METRICS_INGEST_PARSE_INLINE_BYTES")
    """Bodies up to this size are parsed on the event loop (a thread hop costs more than the parse); larger
    ones in a worker thread, so health checks and other tenants' requests keep being answered."""
    max_dead_letters_per_request: int = Field(100, validation_alias="METRICS_INGEST_MAX_DEAD_LETTERS_PER_REQUEST")
    """Bad lines (drain) or records (JSON API) dead-lettered per request; the rest are only counted
    (``ingest_dead_letters_dropped``), so one bad frame cannot multiply into thousands of DLQ records."""
    max_decompressed_ratio: int = Field(100, validation_alias="METRICS_INGEST_MAX_DECOMPRESSED_RATIO")
    """A compressed JSON body may inflate to this many times its size (and never past the body limit);
    beyond it 413 (a decompression bomb)."""
    work_slots: int = Field(4, validation_alias="METRICS_INGEST_WORK_SLOTS")
    """Requests parsed at once per ingest process. When all are busy, waiting requests are served app by
    app in turn (not first come first served), so a flooding app waits behind its own backlog only."""
    max_active_requests: int = Field(16, validation_alias="METRICS_INGEST_MAX_ACTIVE_REQUESTS")
    """Requests one ingest process works on at once (reading, parsing, producing) before apps are held to
    their share of them (this over the apps with requests in progress); past its share an app's request is
    refused before its body is read. A trade-off, measured (docs/reliability.md): at 8 a quiet app beside a
    saturating one had a p99 2.3-3.8x its own alone, but two equal apps at twice the capacity got 132-207
    frames/s through; at 16, 5.1-6.8x, and 223-261 frames/s (the capacity held)."""
    max_waiting_per_app: int = Field(8, validation_alias="METRICS_INGEST_MAX_WAITING_PER_APP")
    """Requests one app may have waiting for a parse slot; beyond it the request is refused before its
    body is read (503 on the drain, 429 on the JSON API)."""
    chunk_observations: int = Field(1000, validation_alias="METRICS_INGEST_CHUNK_OBSERVATIONS")
    """Observations per produced Kafka message (the batched array form)."""
    dedup_window_s: float = Field(900.0, validation_alias="METRICS_DEDUP_WINDOW_S")
    """How long a delivered Logplex-Frame-Id is remembered: retries within it are answered 2xx, not re-counted."""
    dedup_lease_s: float = Field(30.0, validation_alias="METRICS_DEDUP_LEASE_S")
    """An in-flight claim on a frame id; a crashed attempt's claim is taken over after it."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("work_slots", "max_active_requests", "max_body_bytes", "max_line_bytes", "max_inflight_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ingest_{name} must be >= 1", action=f"set {PREFIX}INGEST_{name.upper()}")
        if self.max_waiting_per_app < 0:
            raise ConfigError("ingest_max_waiting_per_app must be >= 0",
                              action=f"set {PREFIX}INGEST_MAX_WAITING_PER_APP")
        return self


class LimitSettings(Section):
    """Per-tenant limits (app/limits.py): the defaults; per-app overrides in METRICS_LIMITS_FILE."""

    file: str = Field("", validation_alias="METRICS_LIMITS_FILE")
    """YAML/JSON file of per-app overrides (``overrides: {app: {limit: value}}``), re-read when it changes;
    empty: every app has the defaults below."""
    reload_s: float = Field(10.0, validation_alias="METRICS_LIMITS_RELOAD_S")
    ingest_rate_bytes_s: float = Field(4.0 * 1024 * 1024, validation_alias="METRICS_LIMIT_INGEST_RATE_BYTES_S")
    """Request body bytes per second one app may send (all its tokens and ingest processes' share:
    each ingest process enforces it on its own, so divide by the replicas for a global figure)."""
    ingest_burst_bytes: int = Field(16 * 1024 * 1024, validation_alias="METRICS_LIMIT_INGEST_BURST_BYTES")
    """Bytes an app may send at once above its rate (the bucket's size)."""
    inflight_bytes_per_token: int = Field(16 * 1024 * 1024, validation_alias="METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN")
    """Request bytes one token may have in flight (being read, parsed or produced) in one ingest process."""
    process_types: int = Field(50, validation_alias="METRICS_LIMIT_PROCESS_TYPES")
    """Distinct process types per app and minute; observations of more are dead-lettered."""
    addon_sources: int = Field(20, validation_alias="METRICS_LIMIT_ADDON_SOURCES")
    """Distinct add-on sources per app and minute; more are dead-lettered."""
    query_rate_per_s: float = Field(20.0, validation_alias="METRICS_LIMIT_QUERY_RATE_PER_S")
    """Read API requests per second one app may make (all its read tokens together; metrics, events and
    whoami, 304 revalidations included). Each query process enforces it on its own (a web process, a
    worker): divide by the replicas a client can reach for a global figure. Past it: 429 ``rate_limited``."""
    query_burst: int = Field(60, validation_alias="METRICS_LIMIT_QUERY_BURST")
    """Read API requests an app may make at once above its rate (the bucket's size: a dashboard's first
    load asks for a dozen series)."""
    max_metric_names: int = Field(100, validation_alias="METRICS_MAX_METRIC_NAMES")
    """Distinct custom metric names per app, process type and minute; more are dead-lettered. A name that
    carries an id (user, request) would otherwise grow a minute without bound: its aggregate past the
    store's item size (400 KB on DynamoDB), every chart and the worker's memory."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.reload_s <= 0:
            raise ConfigError("limits_reload_s must be > 0", action=f"set {PREFIX}LIMITS_RELOAD_S")
        return self


class WebSettings(Section):
    """The tenant-facing HTTP ports (read API, dashboard; ingest uses the same host and port settings) and
    how reads are forwarded between workers."""

    host: str = Field("127.0.0.1", validation_alias="METRICS_WEB_HOST")
    port: int = Field(6066, validation_alias="METRICS_WEB_PORT")
    advertised_url: str = Field("", validation_alias="METRICS_ADVERTISED_URL")
    """How the other workers reach this worker's web port (Faust's ``canonical_url``): reads of an app
    another worker owns are forwarded there. Empty: ``http://{hostname}:{web_port}``. Must differ per worker;
    on Kubernetes the StatefulSet pod's DNS name, ``http://<pod>.<headless service>.<namespace>.svc:6066``."""
    forward_allowed_suffix: str = Field("", validation_alias="METRICS_FORWARD_ALLOWED_SUFFIX")
    """Where a read may be forwarded (with the client's Authorization header): comma-separated DNS suffixes
    (``<headless service>.<namespace>.svc``) and/or IP networks. The owner's URL comes from Kafka consumer
    group metadata, so any other target is refused (503, logged). Empty: the domain of ``advertised_url``
    (the headless Service's, on Kubernetes); with no domain there (the local stack), loopback and this host
    only (app/api/policies.py ForwardTargets)."""
    forwarded_for_hops: int = Field(0, validation_alias="METRICS_FORWARDED_FOR_HOPS")
    """Proxies in front of the HTTP ports that append the client's address to ``X-Forwarded-For`` (an
    ingress: 1). 0: the TCP peer is the client. Failed-token budgets are kept per client address."""
    auth_failures_per_s: float = Field(5.0, validation_alias="METRICS_AUTH_FAILURES_PER_S")
    auth_failures_burst: int = Field(50, validation_alias="METRICS_AUTH_FAILURES_BURST")
    """Unknown (well-formed) tokens one client address may try per second, and at once, before its uncached
    tokens are refused without a store read (every process; a token already cached still works)."""
    dashboard_assets_dir: str = Field("", validation_alias="METRICS_DASHBOARD_ASSETS_DIR")
    """Directory holding uPlot's ``uPlot.iife.min.js`` and ``uPlot.min.css`` (installed by ``make install``
    into ``.deps/uplot/dist``). Empty: that directory next to the source tree."""


class QuerySettings(Section):
    """The read API (app/api/) and the rollups it reads (agents/rollup.py)."""

    timeout_s: float = Field(5.0, validation_alias="METRICS_QUERY_TIMEOUT_S")
    """A query (or its token check) the store has not answered within this gets 503 with Retry-After; the
    reads go on and fill the caches. Without it a down store holds requests for its client's whole retry
    schedule (~15 s)."""
    max_points: int = Field(10080, validation_alias="METRICS_MAX_QUERY_POINTS")
    """Largest answer (points) a query may ask for."""
    max_concurrent: int = Field(16, validation_alias="METRICS_QUERY_MAX_CONCURRENT")
    """Read API queries (metrics, events) computing at once per process; beyond it a request waits up to
    ``query_queue_timeout_s`` for a slot, then 503 ``overloaded`` with Retry-After. On a worker the read API
    shares the event loop with the stream jobs: this bounds what tenants' queries can take from them.
    0: no cap."""
    max_concurrent_per_app: int = Field(8, validation_alias="METRICS_QUERY_MAX_CONCURRENT_PER_APP")
    """Of those, the slots one app may hold (default half): one app's many concurrent queries wait for its
    own to finish, never for every slot, and freed slots go to the waiting apps in turn."""
    queue_timeout_s: float = Field(1.0, validation_alias="METRICS_QUERY_QUEUE_TIMEOUT_S")
    """How long a query waits for a slot before its 503 ``overloaded``."""
    events_max_range_days: float = Field(7.0, validation_alias="METRICS_EVENTS_MAX_RANGE_DAYS")
    """Widest ``since``..``until`` of one ``/events`` request (it is not cached: every call reads its range
    from the store); wider: 400 ``range_too_large``."""
    settle_s: float = Field(300.0, validation_alias="METRICS_QUERY_SETTLE_S")
    """A bucket is final when its end is at least this far in the past *and* at or before the stored-through
    watermark of its app's partition (agents/progress.py): only then is its stored point cached. Newer
    buckets are read on every request. Must exceed grace + idle timeout + the sink's delay (30 + 30 + ~1 s
    by default); a lagging sink holds buckets live through the watermark, not through this."""
    progress_interval_s: float = Field(1.0, validation_alias="METRICS_PROGRESS_INTERVAL_S")
    """How often a worker writes its partitions' stored-through watermarks, and how often a query process
    reads them (one small Query either way)."""
    cache_max_bytes: int = Field(64 * 1024 * 1024, validation_alias="METRICS_QUERY_CACHE_MAX_BYTES")
    """Memory bound of the in-process caches (final points per series, rendered answers); least recently
    used series are evicted beyond it."""
    cache_max_age_s: float = Field(600.0, validation_alias="METRICS_QUERY_CACHE_MAX_AGE_S")
    """Cached final ranges are re-read from the store after this long. Late minutes drop an app's cache entries
    at once (agents/progress.py); this bounds what a missed notice could cost, and how long workers keep
    the notices."""
    tail_ttl_s: float = Field(1.0, validation_alias="METRICS_QUERY_TAIL_TTL_S")
    """Answers that include non-final buckets (the live edge) are reused for this long: hot dashboards cost
    one DynamoDB read per series per interval instead of one per request."""
    tail_read_interval_s: float = Field(5.0, validation_alias="METRICS_QUERY_TAIL_READ_INTERVAL_S")
    """A live answer's refresh re-reads the stored part of its live edge (minutes since the last final bucket,
    partial rollup items) at most this often; in between it re-renders only the open minute. A minute this
    worker closed is read at once (and until it is found), so this only delays a minute written by another
    worker's sink by up to this long; it keeps DynamoDB calls (~3 ms of event loop each) off most refreshes."""
    use_rollups: EnvBool = Field(True, validation_alias="METRICS_QUERY_USE_ROLLUPS")
    """Read 10 min / 1 h / 2 h points from the rollup items (agents/rollup.py). Off: merge the minutes at
    read time (measured much slower; docs/design/rollups.md), e.g. while a new deployment backfills rollups."""
    rollup_evict_after_s: float = Field(7200.0, validation_alias="METRICS_ROLLUP_EVICT_AFTER_S")
    """Partial rollup buckets stay in the worker's table until this long after their end, so a late or
    redelivered minute merges without a DynamoDB read; after it, the stored item is read back instead."""
    rollup_flush_s: int = Field(600, validation_alias="METRICS_ROLLUP_FLUSH_S")
    """How often the open summary blocks are written: the store gets each rollup item once, when its bucket
    is final, and the minute block of the open hour at each boundary of this many seconds (docs/design/
    rollups.md). Minutes after the last boundary are read from their minute items, so the stored-through
    watermark of a busy partition moves in steps of this size. 600: ~0.3 write units per series-minute for
    blocks; 60 writes the minute block every minute (~4)."""
    rollup_batch_max: int = Field(500, validation_alias="METRICS_ROLLUP_BATCH_MAX")
    rollup_within_s: float = Field(0.5, validation_alias="METRICS_ROLLUP_WITHIN_S")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.rollup_flush_s < WINDOW_S or self.rollup_flush_s % WINDOW_S or 3600 % self.rollup_flush_s:
            raise ConfigError(f"rollup_flush_s must be whole minutes dividing an hour, got {self.rollup_flush_s}",
                              action=f"set {PREFIX}ROLLUP_FLUSH_S to 60, 120, 300, 600, 900, 1200, 1800 or 3600")
        return self


class AlertingSettings(Section):
    """Monitors, autoscaling policies and their notifications (webhooks, e-mail, the formation API)."""

    max_monitors_per_app: int = Field(20, validation_alias="METRICS_MAX_MONITORS_PER_APP")
    """Bounds the per-app table value rewritten every minute."""
    policy_apply_timeout_s: float = Field(5.0, validation_alias="METRICS_POLICY_APPLY_TIMEOUT_S")
    """How long a write request waits to see its change applied before answering 202 instead of 201/200."""
    outbox_sweep_interval_s: float = Field(10.0, validation_alias="METRICS_OUTBOX_SWEEP_INTERVAL_S")
    """How often deliveries left in the outbox (restart, full queue) are submitted again."""
    notify_queue_max: int = Field(1000, validation_alias="METRICS_NOTIFY_QUEUE_MAX")
    """Deliveries waiting to be sent; beyond it they stay in the table outbox for the next sweep."""
    notify_concurrency: int = Field(8, validation_alias="METRICS_NOTIFY_CONCURRENCY")
    """Deliveries sent at once: a slow receiver occupies one worker, not the alert agent."""
    notify_timeout_s: float = Field(10.0, validation_alias="METRICS_NOTIFY_TIMEOUT_S")
    """Per attempt (HTTP request or SMTP session)."""
    notify_max_attempts: int = Field(8, validation_alias="METRICS_NOTIFY_MAX_ATTEMPTS")
    """With the backoff below: about 4 minutes of retries before a delivery is given up (and logged)."""
    notify_backoff_base_ms: int = Field(1000, validation_alias="METRICS_NOTIFY_BACKOFF_BASE_MS")
    notify_backoff_max_ms: int = Field(120_000, validation_alias="METRICS_NOTIFY_BACKOFF_MAX_MS")
    webhook_allowed_networks: str = Field("", validation_alias="METRICS_WEBHOOK_ALLOWED_NETWORKS")
    """Comma-separated CIDRs that monitors' webhooks may reach although they are not public addresses, e.g.
    ``10.0.0.0/8`` for an in-cluster receiver. Webhook URLs come from API users, so by default only
    public addresses are reached: a monitor cannot probe the cluster or a cloud metadata endpoint
    (169.254.169.254). The operator's formation API is not restricted."""
    smtp_host: str = Field("", validation_alias="METRICS_SMTP_HOST")
    """Empty: e-mail targets fail with a logged reason (webhooks still work)."""
    smtp_port: int = Field(587, validation_alias="METRICS_SMTP_PORT")
    smtp_tls: str = Field("starttls", validation_alias="METRICS_SMTP_TLS")
    """none | starttls | tls (implicit TLS, usually port 465)."""
    smtp_username: str = Field("", validation_alias="METRICS_SMTP_USERNAME")
    smtp_password: SecretStr = Field(SecretStr(""), validation_alias="METRICS_SMTP_PASSWORD")
    smtp_from: str = Field("minutely alerts <alerts@minutely.invalid>", validation_alias="METRICS_SMTP_FROM")
    smtp_ca_file: str = Field("", validation_alias="METRICS_SMTP_CA_FILE")
    """CA bundle for the SMTP server's certificate; empty: the system's."""
    formation_url: str = Field("", validation_alias="METRICS_FORMATION_URL")
    """The platform's formation API, e.g. ``https://api.example.com/apps/{app}/formation/{process_type}``;
    each scaling decision is sent there as ``{"quantity": n, ...}``. Empty: decisions only go to the topic."""
    formation_method: str = Field("PATCH", validation_alias="METRICS_FORMATION_METHOD")
    formation_token: SecretStr = Field(SecretStr(""), validation_alias="METRICS_FORMATION_TOKEN")
    """Sent as ``Authorization: Bearer``."""
    formation_secret: SecretStr = Field(SecretStr(""), validation_alias="METRICS_FORMATION_SECRET")
    """HMAC-SHA256 key for the formation call's X-Minutely-Signature header (empty: unsigned)."""
    secrets_key: SecretStr = Field(SecretStr(""), validation_alias="METRICS_SECRETS_KEY")
    """Fernet key (urlsafe base64 of 32 bytes) that encrypts webhook HMAC secrets at rest: in the
    policy-commands topic, the monitors/policies changelogs (and RocksDB) and the notification outbox. Make
    one with ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.
    Rotation: several comma-separated keys, the first encrypts new records and all of them decrypt; keep an
    old key listed until every record written under it has been rewritten. Empty: secrets are stored in
    plaintext (as before; a JSON-logging worker warns at start). Records written under a key that is no
    longer listed stay stored, but their webhooks fail (logged, naming the missing key's id)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.secrets_key:
            secrets_keys(self.secrets_key.get_secret_value())
        return self


class AutoscaleSettings(Section):
    """The autoscaling model's constants: app/alerting/autoscale.py AutoscaleParams reads every field of this
    section by its own name (these are its only defaults) and checks them."""

    history_min: int = Field(60, validation_alias="METRICS_AUTOSCALE_HISTORY_MIN")
    """Minutes of history the capacity model looks at (the platform's documented past hour)."""
    min_requests: int = Field(20, validation_alias="METRICS_AUTOSCALE_MIN_REQUESTS")
    """Minutes with fewer requests say nothing reliable about p95 and are left out of the model."""
    up_cooldown_min: int = Field(1, validation_alias="METRICS_AUTOSCALE_UP_COOLDOWN_MIN")
    down_cooldown_min: int = Field(5, validation_alias="METRICS_AUTOSCALE_DOWN_COOLDOWN_MIN")
    """Minutes after any step before scaling down: a new dyno's effect shows only after it booted."""
    down_stable_min: int = Field(5, validation_alias="METRICS_AUTOSCALE_DOWN_STABLE_MIN")
    """Consecutive minutes within target and with headroom before one dyno is removed."""
    down_headroom: float = Field(0.2, validation_alias="METRICS_AUTOSCALE_DOWN_HEADROOM")
    """Scaling down keeps this fraction of the estimated capacity spare."""
    pinned_notify_every_min: int = Field(1440, validation_alias="METRICS_AUTOSCALE_PINNED_NOTIFY_EVERY_MIN")
    """Minutes between two notices that a policy runs pinned at ``max_dynos`` (once a day)."""


class OpsSettings(Section):
    """What the operator sees: the log format and the admin port (``/readyz`` with reasons, ``/metrics``,
    ``/migration``, ``/v1/stats``)."""

    log_format: str = Field("text", validation_alias="METRICS_LOG_FORMAT")
    """``json``: one JSON object per line, secrets redacted (containers: the image sets it). ``text``: for
    people at a terminal."""
    admin_host: str = Field("127.0.0.1", validation_alias="METRICS_ADMIN_HOST")
    """Where the operator's endpoints listen (``/readyz`` with reasons, ``/metrics``, ``/migration``,
    ``/v1/stats``): never a tenant's port, so no path rule at an ingress is needed to keep tenants out. On
    Kubernetes ``0.0.0.0`` (probes and Prometheus reach it), kept out of the Services the ingress targets."""
    admin_port: int = Field(6068, validation_alias="METRICS_ADMIN_PORT")
    """The operator's port (6066 and 6067 are the web and ingest tenant ports; ``make run`` gives its ingest
    6069). 0: any free port, logged at start (tests)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}",
                              action=f"set {PREFIX}LOG_FORMAT=json (or text)")
        return self


class Settings(BaseModel):
    """Every section, frozen. ``Settings()`` is the defaults (the environment is not read);
    :meth:`from_env` reads ``METRICS_*``; :meth:`of` and :meth:`replace` take today's flat names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaSettings = KafkaSettings()
    windows: WindowSettings = WindowSettings()
    storage: StorageSettings = StorageSettings()
    dynamodb: DynamoSettings = DynamoSettings()
    cassandra: CassandraSettings = CassandraSettings()
    migration: MigrationSettings = MigrationSettings()
    ingest: IngestSettings = IngestSettings()
    limits: LimitSettings = LimitSettings()
    web: WebSettings = WebSettings()
    query: QuerySettings = QuerySettings()
    alerting: AlertingSettings = AlertingSettings()
    autoscale: AutoscaleSettings = AutoscaleSettings()
    ops: OpsSettings = OpsSettings()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``METRICS_<NAME>`` variables, then ``overrides`` (flat names, :data:`FLAT`);
        a malformed value is a ConfigError naming its variable."""
        env = os.environ if env is None else env
        by_section = _by_section(overrides)
        return cls.model_validate({name: section_cls.from_env(env, **by_section.get(name, {}))
                                   for name, section_cls in SECTIONS.items()})

    @classmethod
    def of(cls, **overrides: Any) -> Settings:
        """The defaults with ``overrides`` by flat name (``Settings.of(partitions=2, grace_s=10)``), checked
        like the environment's values. The environment is not read."""
        return cls.from_env({}, **overrides)

    def get(self, flat: str) -> Any:
        """The value of a flat name (``settings.get("table_name")``), for code that names a setting in data."""
        if flat not in FLAT:
            raise KeyError(f"no setting named {flat!r} (METRICS_{flat.upper()})")
        section, name = FLAT[flat]
        return getattr(getattr(self, section), name)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with ``overrides`` by flat name (``settings.replace(store="cassandra")``), checked."""
        changed = {name: getattr(self, name).replace(**changes) for name, changes in _by_section(overrides).items()}
        return self.model_copy(update=changed)


SECTIONS: dict[str, type[Section]] = {name: f.annotation for name, f in Settings.model_fields.items()
                                      if isinstance(f.annotation, type) and issubclass(f.annotation, Section)}
"""Section attribute -> its class, in the order of :class:`Settings`."""

FLAT: dict[str, tuple[str, str]] = {
    alias[len(PREFIX):].lower(): (section, name)
    for section, section_cls in SECTIONS.items() for name, alias in section_cls.env_names().items()}
"""Flat name (the variable without ``METRICS_``, lower case: ``kafka_sasl_username``) -> (section, field)."""


def env_names() -> set[str]:
    """Every variable the settings read."""
    return {PREFIX + flat.upper() for flat in FLAT}


def _by_section(overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for flat, value in overrides.items():
        if flat not in FLAT:
            raise TypeError(f"no setting named {flat!r} (METRICS_{flat.upper()})")
        section, name = FLAT[flat]
        grouped.setdefault(section, {})[name] = value
    return grouped


def secrets_keys(value: str) -> list[str]:
    """The Fernet keys of ``secrets_key`` (comma-separated, the first encrypts); ConfigError naming the
    position of a malformed one, never its value."""
    from cryptography.fernet import Fernet  # loaded only when a key is set (every role reads settings)

    keys = [k.strip() for k in value.split(",")]
    for i, k in enumerate(keys, 1):
        try:
            Fernet(k)
        except ValueError:
            where = f"key {i} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ConfigError(
                f"secrets_key: {where} is not a Fernet key (urlsafe base64 of 32 bytes)",
                action=f"set {PREFIX}SECRETS_KEY to keys made with python -c \"from cryptography.fernet import "
                       "Fernet; print(Fernet.generate_key().decode())\" (comma-separated, the first encrypts)",
            ) from None
    return keys
