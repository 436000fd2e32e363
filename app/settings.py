"""All settings, read once from environment variables (prefix ``METRICS_``).

The defaults run on the embedded stack (`make run`: Apache Kafka on 127.0.0.1:9092, dynalite on :8000), so
local commands need no variables; production points the same names at a real Kafka and at AWS DynamoDB
(`METRICS_DYNAMODB_ENDPOINT` empty). AWS credentials come from the standard boto chain (env, profile,
IRSA web identity), never from these settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from app.errors import ConfigError

PREFIX = "METRICS_"
WINDOW_S = 60  # the pipeline's unit of aggregation; rollups are built from these minutes
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
STORES = ("dynamodb", "cassandra")


@dataclass(frozen=True)
class Settings:
    # --- Kafka ---------------------------------------------------------------------------------------
    broker_url: str = "kafka://127.0.0.1:9092"
    """Faust broker URL(s), ``kafka://host:port;kafka://host2:port``."""
    kafka_security_protocol: str = "PLAINTEXT"
    """``PLAINTEXT``, ``SSL`` (TLS to every broker, e.g. Amazon MSK's TLS listener on port 9094),
    ``SASL_SSL`` (TLS plus SASL: MSK's SCRAM listener on 9096, Confluent Cloud's PLAIN) or
    ``SASL_PLAINTEXT``. Used by every Kafka client of every role: workers, ingest, topic creation, the load
    generator."""
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    """With SASL_*: ``SCRAM-SHA-512`` (MSK), ``SCRAM-SHA-256`` or ``PLAIN`` (Confluent Cloud API keys)."""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    """With SASL_*: the credentials; put the password in a Secret (Helm ``credentials.secretEnv``)."""
    kafka_ssl_cafile: str = ""
    """PEM bundle of the CA(s) that signed the brokers' certificates; empty: the system trust store."""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    """Client certificate chain and key (PEM) for brokers that require mutual TLS: both or neither."""
    app_id: str = "minutely"
    """Consumer group and changelog prefix. Two deployments on one Kafka need different ids."""
    partitions: int = 8
    """Partitions of ``observations`` (and of the window table's changelog, which must match).
    Workers scale out up to this number; it cannot be lowered later without a new app_id."""
    replication_factor: int = 1
    observations_topic: str = "observations"
    metrics_topic: str = "metrics-1m"
    dlq_topic: str = "observations-dlq"
    sink_dlq_topic: str = "metrics-1m-dlq"
    session_timeout_s: float = 10.0
    """Group session timeout. The group join waits about half of it, and a crashed worker's partitions
    are reassigned only after it: low values recover faster but tolerate shorter GC/IO stalls."""
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 6.0
    fetch_max_partition_bytes: int = 16 * 1024 * 1024
    """Per-partition fetch size. Faust's 1 MB default returns ~16 batched messages per fetch and leaves
    the worker waiting on the network; measured throughput rises with larger fetches."""

    # --- windows -------------------------------------------------------------------------------------
    grace_s: float = 30.0
    """Event-time lateness accepted after a minute ends; later events are dead-lettered as late."""
    idle_timeout_s: float = 30.0
    """A partition with no input for this long closes its due minutes on the wall clock."""
    closed_keep_s: float = 0.0
    """Keep a closed minute in the window table this long after it was emitted; a worker restarted within
    it sends the minute again, identical (``minutes_resent``). Off by default: it was a workaround for
    restarted sinks skipping minutes emitted but not stored, whose cause was Faust's consumer
    (app/faust_patches.py fixes it; README "Windows"). Set e.g. 30 for a second line of defence."""
    max_future_s: float = 300.0
    """Events stamped further than this ahead of the wall clock are rejected (they would close windows
    of everyone else on the partition)."""
    digest_max_centroids: int = 1000
    """t-digest size. Measured on lognormal latencies with 3,000 values a minute, worst p99 error over 20
    minutes: 300 -> 2.1 %, 500 -> 1.2 %, 1000 -> 0.0 % (30,000 values: 1.1 / 0.7 / 0.5 %). 1000 keeps
    every percentile within 1 %; a full digest is ~24-31 KB of JSON, ~4-5 KB compressed as stored."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Larger input messages are dead-lettered whole (size only; nothing inside is trusted)."""
    max_metric_names: int = 100
    """Distinct custom metric names per app, process type and minute; more are dead-lettered. A name that
    carries an id (user, request) would otherwise grow a minute without bound: its aggregate past the
    store's item size (400 KB on DynamoDB), every chart and the worker's memory."""
    minute_max_bytes: int = 900 * 1024
    """Largest serialized minute sent to ``metrics-1m``, below the topic's ``max.message.bytes`` (leaving
    room for the key and the record's framing). A larger minute is degraded to fit (timers' exact values
    become t-digests, then fewer centroids; then its largest custom metric names are dead-lettered):
    a minute the broker refuses would stop the partition for every tenant (``minutes_degraded``)."""
    topic_max_message_bytes: int = 1024 * 1024
    """``max.message.bytes`` set on ``metrics-1m``, ``observations`` and the DLQ topics when they are
    created (app/ops/topics.py); 1 MB, the broker default. Changelogs get ``changelog_max_message_bytes``."""
    changelog_max_message_bytes: int = 8 * 1024 * 1024
    """``max.message.bytes`` of the table changelogs (an open window holds up to 100 timers' exact values,
    zlib-compressed), and the producer's ``max_request_size``."""
    batch_max: int = 2000
    """Input messages aggregated per table write; bigger batches amortize changelog writes."""
    batch_within_s: float = 0.2
    """Longest a folded-in message waits to be persisted and acknowledged when input goes quiet."""
    batch_max_bytes: int = 8 * 1024 * 1024
    """Input bytes folded in per table write (about 60k batched observations): bounds the work a crash
    repeats and the changelog traffic, which grows with the number of writes."""
    close_interval_s: float = 1.0
    """How often the wall-clock closer looks for idle partitions."""
    data_dir: str = "./data"
    store_url: str = "rocksdb://"

    # --- the store -----------------------------------------------------------------------------------
    store: str = "dynamodb"
    """Where minutes, rollups, summary blocks, events, tokens and frame ids live: ``dynamodb`` or
    ``cassandra``. A move between stores without downtime: ``python -m app migration`` (README)."""

    # --- moving between stores (app/migration/) ---------------------------------------------------------
    migration_topic: str = "minutely-migration"
    """Compacted, one partition: the migration state every process follows (``python -m app migration``)."""
    checkpoints_topic: str = "metrics-1m-checkpoints"
    """Compacted, partitioned like ``metrics-1m``: how far each partition is closed, so a second store's
    writer (app/writer.py) can say what it has stored (agents/progress.py)."""
    shadow_timeout_s: float = 2.0
    """A shadow read slower than this is abandoned and counted (``shadow_timeouts``)."""
    migration_wait_s: float = 30.0
    """At start, how long a process waits for the migration state before serving with the configured store
    (and following the state once Kafka answers)."""

    # --- Cassandra (METRICS_STORE=cassandra) -------------------------------------------------------------
    cassandra_hosts: str = "127.0.0.1"
    """Contact points, comma-separated; the driver discovers the rest of the ring from them."""
    cassandra_port: int = 9042
    cassandra_keyspace: str = "minutely"
    cassandra_replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    """Used only when the keyspace is created (``create_table``). Production: ``{'class':
    'NetworkTopologyStrategy', '<dc>': 3}``."""
    cassandra_consistency: str = "LOCAL_QUORUM"
    """Reads and writes: a write acknowledged by a quorum is read by a quorum (no stale chart after a
    node fails). One node (the embedded stack): quorum is that node."""
    cassandra_username: str = ""
    cassandra_password: str = ""
    cassandra_max_inflight: int = 128
    """Statements in flight from one process. Writes are single-partition INSERTs sent concurrently (an
    unlogged batch across partitions only moves the fan-out to one coordinator); this bounds them."""
    cassandra_request_timeout_s: float = 12.0
    """Per statement, after which it fails as retriable (the server's own write timeout is 2 s)."""

    # --- DynamoDB ------------------------------------------------------------------------------------
    dynamodb_endpoint: str = "http://127.0.0.1:8000"
    """The embedded stack's DynamoDB server (dynalite, ``make run``) by default, so local commands need no
    variables. Empty: AWS (the region's endpoint, credentials from the standard chain); the Helm chart sets
    it empty unless ``dynamodb.endpoint`` says otherwise."""
    aws_region: str = "us-east-1"
    table_name: str = "minutely-metrics"
    create_table: bool = True
    """Create the table (on-demand billing, TTL enabled) at start. Off in production with IaC-managed tables."""
    ttl_days: float = 30.0
    """Retention: items expire this long after the minute they describe (event time, so replays do not
    extend retention)."""
    compress_over_bytes: int = 8 * 1024
    """Payloads larger than this are stored gzip-compressed (flag ``z``)."""
    max_pool_connections: int = 64
    """aiohttp connector limit. BatchWriteItem is latency bound: with 10 ms injected latency 64 connections
    gave ~30 % more throughput than the default 10 (measured on this machine kind, shared/notes/stack.md)."""
    keepalive_timeout_s: float = 60.0
    """Idle keep-alive per pooled connection (aiobotocore default 12 s): avoids TLS handshakes between
    sink batches that arrive once per minute."""
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    """Per socket read; a stuck request is abandoned and retried instead of stalling the sink."""
    max_attempts: int = 5
    """botocore 'standard' retries after the first request (5 -> up to 6 requests) for throttling and 5xx;
    UnprocessedItems and longer outages are retried by the store and the sink with their own backoff."""
    sink_concurrency: int = 16
    """BatchWriteItem requests in flight from one sink."""
    sink_batch_max: int = 500
    sink_within_s: float = 0.5
    store_fatal_retry_s: float = 30.0
    """How often the sink (or the events job), stopped on an error only the operator can fix (credentials,
    permissions, a missing table), tries again; nothing is committed or dead-lettered meanwhile."""
    backoff_base_ms: int = 50
    backoff_max_ms: int = 5000

    # --- ingestion (drains, JSON API) -----------------------------------------------------------------
    kafka_max_batch_bytes: int = 1_000_000
    """Largest record batch the ingest producer builds. It must stay below the brokers' ``message.max.bytes``
    (1 MB by default on Apache Kafka and Amazon MSK), or Kafka refuses the batch (MessageSizeTooLarge) and
    the requests in it get 503. Raise both together for more throughput per partition."""
    ingest_max_body_bytes: int = 4 * 1024 * 1024
    """Larger request bodies get 413. Logplex frames are far smaller; JSON batches should be split."""
    ingest_body_timeout_s: float = 10.0
    """A request body must arrive within this time, or 408 and the connection is closed: slow-body clients
    (slowloris) cannot hold connections. A 4 MB body needs ~3.3 Mbit/s."""
    ingest_max_inflight_bytes: int = 64 * 1024 * 1024
    """Request bytes one ingest process holds at once (bodies being read, parsed or produced). A request that
    would go over it gets 503 with Retry-After before its body is read: under overload memory stays bounded
    and senders come back later (Logplex retries a 5xx), instead of every request queueing in memory."""
    ingest_max_line_bytes: int = 10_240
    """Longest drain line (syslog message) parsed. Logplex lines are far shorter (it splits app output
    long before this); a longer one is dead-lettered with its first 2 KB, never parsed, so no line can cost
    more than a bounded parse."""
    ingest_parse_inline_bytes: int = 64 * 1024
    """Bodies up to this size are parsed on the event loop (a thread hop costs more than the parse); larger
    ones in a worker thread, so health checks and other tenants' requests keep being answered."""
    ingest_max_dead_letters_per_request: int = 100
    """Bad lines (drain) or records (JSON API) dead-lettered per request; the rest are only counted
    (``ingest_dead_letters_dropped``), so one bad frame cannot multiply into thousands of DLQ records."""
    ingest_max_decompressed_ratio: int = 100
    """A compressed JSON body may inflate to this many times its size (and never past the body limit);
    beyond it 413 (a decompression bomb)."""
    ingest_work_slots: int = 4
    """Requests parsed at once per ingest process. When all are busy, waiting requests are served app by
    app in turn (not first come first served), so a flooding app waits behind its own backlog only."""
    ingest_max_active_requests: int = 16
    """Requests one ingest process works on at once (reading, parsing, producing) before apps are held to
    their share of them (this over the apps with requests in progress); past its share an app's request is
    refused before its body is read. A trade-off, measured (README "Reliability"): at 8 a quiet app beside a
    saturating one had a p99 2.3-3.8x its own alone, but two equal apps at twice the capacity got 132-207
    frames/s through; at 16, 5.1-6.8x, and 223-261 frames/s (the capacity held)."""
    ingest_max_waiting_per_app: int = 8
    """Requests one app may have waiting for a parse slot; beyond it the request is refused before its
    body is read (503 on the drain, 429 on the JSON API)."""

    auth_failures_per_s: float = 5.0
    auth_failures_burst: int = 50
    """Unknown (well-formed) tokens one client address may try per second, and at once, before its uncached
    tokens are refused without a store read (every process; a token already cached still works)."""
    forwarded_for_hops: int = 0
    """Proxies in front of the HTTP ports that append the client's address to ``X-Forwarded-For`` (an
    ingress: 1). 0: the TCP peer is the client. Failed-token budgets are kept per client address."""
    # --- per-tenant limits (app/limits.py): defaults; per-app overrides in METRICS_LIMITS_FILE ----------
    limits_file: str = ""
    """YAML/JSON file of per-app overrides (``overrides: {app: {limit: value}}``), re-read when it changes;
    empty: every app has the defaults below."""
    limits_reload_s: float = 10.0
    limit_ingest_rate_bytes_s: float = 4.0 * 1024 * 1024
    """Request body bytes per second one app may send (all its tokens and ingest processes' share:
    each ingest process enforces it on its own, so divide by the replicas for a global figure)."""
    limit_ingest_burst_bytes: int = 16 * 1024 * 1024
    """Bytes an app may send at once above its rate (the bucket's size)."""
    limit_inflight_bytes_per_token: int = 16 * 1024 * 1024
    """Request bytes one token may have in flight (being read, parsed or produced) in one ingest process."""
    limit_process_types: int = 50
    """Distinct process types per app and minute; observations of more are dead-lettered."""
    limit_addon_sources: int = 20
    """Distinct add-on sources per app and minute; more are dead-lettered."""
    limit_query_rate_per_s: float = 20.0
    """Read API requests per second one app may make (all its read tokens together; metrics, events and
    whoami, 304 revalidations included). Each query process enforces it on its own (a web process, a
    worker): divide by the replicas a client can reach for a global figure. Past it: 429 ``rate_limited``."""
    limit_query_burst: int = 60
    """Read API requests an app may make at once above its rate (the bucket's size: a dashboard's first
    load asks for a dozen series)."""
    query_max_concurrent: int = 16
    """Read API queries (metrics, events) computing at once per process; beyond it a request waits up to
    ``query_queue_timeout_s`` for a slot, then 503 ``overloaded`` with Retry-After. On a worker the read API
    shares the event loop with the stream jobs: this bounds what tenants' queries can take from them.
    0: no cap."""
    query_max_concurrent_per_app: int = 8
    """Of those, the slots one app may hold (default half): one app's many concurrent queries wait for its
    own to finish, never for every slot, and freed slots go to the waiting apps in turn."""
    query_queue_timeout_s: float = 1.0
    """How long a query waits for a slot before its 503 ``overloaded``."""
    events_max_range_days: float = 7.0
    """Widest ``since``..``until`` of one ``/events`` request (it is not cached: every call reads its range
    from the store); wider: 400 ``range_too_large``."""
    dedup_window_s: float = 900.0
    """How long a delivered Logplex-Frame-Id is remembered: retries within it are answered 2xx, not re-counted."""
    dedup_lease_s: float = 30.0
    """An in-flight claim on a frame id; a crashed attempt's claim is taken over after it."""
    ingest_chunk_observations: int = 1000
    """Observations per produced Kafka message (the batched array form)."""
    produce_timeout_s: float = 10.0
    """Kafka must acknowledge (acks=all) within this, else the request gets 503 and the sender retries."""

    # --- web -----------------------------------------------------------------------------------------
    log_format: str = "text"
    """``json``: one JSON object per line, secrets redacted (containers: the image sets it). ``text``: for
    people at a terminal."""
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    admin_host: str = "127.0.0.1"
    """Where the operator's endpoints listen (``/readyz`` with reasons, ``/metrics``, ``/migration``,
    ``/v1/stats``): never a tenant's port, so no path rule at an ingress is needed to keep tenants out. On
    Kubernetes ``0.0.0.0`` (probes and Prometheus reach it), kept out of the Services the ingress targets."""
    admin_port: int = 6068
    """The operator's port (6066 and 6067 are the web and ingest tenant ports; ``make run`` gives its ingest
    6069). 0: any free port, logged at start (tests)."""
    advertised_url: str = ""
    """How the other workers reach this worker's web port (Faust's ``canonical_url``): reads of an app
    another worker owns are forwarded there. Empty: ``http://{hostname}:{web_port}``. Must differ per worker;
    on Kubernetes the StatefulSet pod's DNS name, ``http://<pod>.<headless service>.<namespace>.svc:6066``."""
    forward_allowed_suffix: str = ""
    """Where a read may be forwarded (with the client's Authorization header): comma-separated DNS suffixes
    (``<headless service>.<namespace>.svc``) and/or IP networks. The owner's URL comes from Kafka consumer
    group metadata, so any other target is refused (503, logged). Empty: the domain of ``advertised_url``
    (the headless Service's, on Kubernetes); with no domain there (the local stack), loopback and this host
    only (app/api/policies.py ForwardTargets)."""
    query_timeout_s: float = 5.0
    """A query (or its token check) the store has not answered within this gets 503 with Retry-After; the
    reads go on and fill the caches. Without it a down store holds requests for its client's whole retry
    schedule (~15 s)."""
    max_query_points: int = 10080
    """Largest answer (points) a query may ask for."""

    # --- query API and rollups ---
    query_settle_s: float = 300.0
    """A bucket is final when its end is at least this far in the past *and* at or before the stored-through
    watermark of its app's partition (agents/progress.py): only then is its stored point cached. Newer
    buckets are read on every request. Must exceed grace + idle timeout + the sink's delay (30 + 30 + ~1 s
    by default); a lagging sink holds buckets live through the watermark, not through this."""
    progress_interval_s: float = 1.0
    """How often a worker writes its partitions' stored-through watermarks, and how often a query process
    reads them (one small Query either way)."""
    query_cache_max_bytes: int = 64 * 1024 * 1024
    """Memory bound of the in-process caches (final points per series, rendered answers); least recently
    used series are evicted beyond it."""
    query_cache_max_age_s: float = 600.0
    """Cached final ranges are re-read from the store after this long. Late minutes drop an app's cache entries
    at once (agents/progress.py); this bounds what a missed notice could cost, and how long workers keep
    the notices."""
    query_tail_ttl_s: float = 1.0
    """Answers that include non-final buckets (the live edge) are reused for this long: hot dashboards cost
    one DynamoDB read per series per interval instead of one per request."""
    query_tail_read_interval_s: float = 5.0
    """A live answer's refresh re-reads the stored part of its live edge (minutes since the last final bucket,
    partial rollup items) at most this often; in between it re-renders only the open minute. A minute this
    worker closed is read at once (and until it is found), so this only delays a minute written by another
    worker's sink by up to this long; it keeps DynamoDB calls (~3 ms of event loop each) off most refreshes."""
    query_use_rollups: bool = True
    """Read 10 min / 1 h / 2 h points from the rollup items (agents/rollup.py). Off: merge the minutes at
    read time (measured much slower; see README), e.g. while a new deployment backfills rollups."""
    rollup_evict_after_s: float = 7200.0
    """Partial rollup buckets stay in the worker's table until this long after their end, so a late or
    redelivered minute merges without a DynamoDB read; after it, the stored item is read back instead."""
    rollup_batch_max: int = 500
    rollup_within_s: float = 0.5
    dashboard_assets_dir: str = ""
    """Directory holding uPlot's ``uPlot.iife.min.js`` and ``uPlot.min.css`` (installed by ``make install``
    into ``.deps/uplot/dist``). Empty: that directory next to the source tree."""

    # --- alerting and autoscaling ---
    alerts_topic: str = "alerts"
    """Monitor transitions (firing, still_firing, resolved), key = app."""
    autoscale_topic: str = "autoscale"
    """One autoscaling decision per policy and closed minute, key = app."""
    policy_commands_topic: str = "policy-commands"
    """Configuration changes from the web API, key = app, so each lands in the partition of the app's
    minutes and is applied by the worker that evaluates them (agents/alerts.py)."""
    max_monitors_per_app: int = 20
    """Bounds the per-app table value rewritten every minute."""
    policy_apply_timeout_s: float = 5.0
    """How long a write request waits to see its change applied before answering 202 instead of 201/200."""
    notify_queue_max: int = 1000
    """Deliveries waiting to be sent; beyond it they stay in the table outbox for the next sweep."""
    notify_concurrency: int = 8
    """Deliveries sent at once: a slow receiver occupies one worker, not the alert agent."""
    notify_timeout_s: float = 10.0
    """Per attempt (HTTP request or SMTP session)."""
    webhook_allowed_networks: str = ""
    """Comma-separated CIDRs that monitors' webhooks may reach although they are not public addresses, e.g.
    ``10.0.0.0/8`` for an in-cluster receiver. Webhook URLs come from API users, so by default only
    public addresses are reached: a monitor cannot probe the cluster or a cloud metadata endpoint
    (169.254.169.254). The operator's formation API is not restricted."""
    notify_max_attempts: int = 8
    """With the backoff below: about 4 minutes of retries before a delivery is given up (and logged)."""
    notify_backoff_base_ms: int = 1000
    notify_backoff_max_ms: int = 120_000
    outbox_sweep_interval_s: float = 10.0
    """How often deliveries left in the outbox (restart, full queue) are submitted again."""
    smtp_host: str = ""
    """Empty: e-mail targets fail with a logged reason (webhooks still work)."""
    smtp_port: int = 587
    smtp_tls: str = "starttls"
    """none | starttls | tls (implicit TLS, usually port 465)."""
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_from: str = "minutely alerts <alerts@minutely.invalid>"
    smtp_ca_file: str = ""
    """CA bundle for the SMTP server's certificate; empty: the system's."""
    formation_url: str = ""
    """The platform's formation API, e.g. ``https://api.example.com/apps/{app}/formation/{process_type}``;
    each scaling decision is sent there as ``{"quantity": n, ...}``. Empty: decisions only go to the topic."""
    formation_method: str = "PATCH"
    formation_token: str = ""
    """Sent as ``Authorization: Bearer``."""
    formation_secret: str = ""
    """HMAC-SHA256 key for the formation call's X-Minutely-Signature header (empty: unsigned)."""
    secrets_key: str = field(default="", repr=False)
    """Fernet key (urlsafe base64 of 32 bytes) that encrypts webhook HMAC secrets at rest: in the
    policy-commands topic, the monitors/policies changelogs (and RocksDB) and the notification outbox. Make
    one with ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.
    Rotation: several comma-separated keys, the first encrypts new records and all of them decrypt; keep an
    old key listed until every record written under it has been rewritten. Empty: secrets are stored in
    plaintext (as before; a JSON-logging worker warns at start). Records written under a key that is no
    longer listed stay stored, but their webhooks fail (logged, naming the missing key's id)."""
    # The autoscaling model's constants: app/alerting/autoscale.py AutoscaleParams reads every
    # ``autoscale_<name>`` below (these are its only defaults) and checks them.
    autoscale_history_min: int = 60
    """Minutes of history the capacity model looks at (the platform's documented past hour)."""
    autoscale_min_requests: int = 20
    """Minutes with fewer requests say nothing reliable about p95 and are left out of the model."""
    autoscale_up_cooldown_min: int = 1
    autoscale_down_cooldown_min: int = 5
    """Minutes after any step before scaling down: a new dyno's effect shows only after it booted."""
    autoscale_down_stable_min: int = 5
    """Consecutive minutes within target and with headroom before one dyno is removed."""
    autoscale_down_headroom: float = 0.2
    """Scaling down keeps this fraction of the estimated capacity spare."""
    autoscale_pinned_notify_every_min: int = 1440
    """Minutes between two notices that a policy runs pinned at ``max_dynos`` (once a day)."""


    @property
    def ttl_s(self) -> int:
        return int(self.ttl_days * 86400)

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``METRICS_<FIELD>`` variables; a malformed value is a ConfigError."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            default = f.default
            try:
                if isinstance(default, bool):
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise ConfigError(
                    f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}",
                    action="fix the environment variable and restart",
                ) from None
        settings = replace(cls(), **values, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.partitions < 1:
            raise ConfigError("partitions must be >= 1", action=f"set {PREFIX}PARTITIONS")
        if self.grace_s < 0 or self.idle_timeout_s <= 0:
            raise ConfigError("grace_s must be >= 0 and idle_timeout_s > 0",
                              action=f"set {PREFIX}GRACE_S / {PREFIX}IDLE_TIMEOUT_S")
        if self.closed_keep_s < 0:
            raise ConfigError("closed_keep_s must be >= 0", action=f"set {PREFIX}CLOSED_KEEP_S")
        if not 20 <= self.digest_max_centroids <= 2000:
            raise ConfigError("digest_max_centroids must be within 20..2000",
                              action=f"set {PREFIX}DIGEST_MAX_CENTROIDS")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}",
                              action=f"set {PREFIX}LOG_FORMAT=json (or text)")
        if self.store not in STORES:
            raise ConfigError(f"store must be one of {', '.join(STORES)}, got {self.store!r}",
                              action=f"set {PREFIX}STORE=dynamodb or {PREFIX}STORE=cassandra")
        if self.cassandra_max_inflight < 1:
            raise ConfigError("cassandra_max_inflight must be >= 1", action=f"set {PREFIX}CASSANDRA_MAX_INFLIGHT")
        for name in ("ingest_work_slots", "ingest_max_active_requests", "ingest_max_body_bytes",
                     "ingest_max_line_bytes", "ingest_max_inflight_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", action=f"set {PREFIX}{name.upper()}")
        if self.limits_reload_s <= 0 or self.ingest_max_waiting_per_app < 0:
            raise ConfigError("limits_reload_s must be > 0 and ingest_max_waiting_per_app >= 0",
                              action=f"set {PREFIX}LIMITS_RELOAD_S / {PREFIX}INGEST_MAX_WAITING_PER_APP")
        if self.ttl_days <= 0:
            raise ConfigError("ttl_days must be > 0", action=f"set {PREFIX}TTL_DAYS")
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(f"kafka_security_protocol must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, got "
                              f"{self.kafka_security_protocol!r}", action=f"set {PREFIX}KAFKA_SECURITY_PROTOCOL")
        if self.kafka_security_protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ConfigError(f"kafka_sasl_mechanism must be one of {', '.join(KAFKA_SASL_MECHANISMS)}, got "
                                  f"{self.kafka_sasl_mechanism!r}", action=f"set {PREFIX}KAFKA_SASL_MECHANISM")
            if not (self.kafka_sasl_username and self.kafka_sasl_password):
                raise ConfigError(f"{self.kafka_security_protocol} needs a SASL username and password",
                                  action=f"set {PREFIX}KAFKA_SASL_USERNAME and {PREFIX}KAFKA_SASL_PASSWORD")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError("kafka_ssl_certfile and kafka_ssl_keyfile go together",
                              action=f"set both {PREFIX}KAFKA_SSL_CERTFILE and {PREFIX}KAFKA_SSL_KEYFILE, or neither")
        if self.secrets_key:
            secrets_keys(self.secrets_key)


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
