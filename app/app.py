"""Faust wiring: the app, its topics and its tables, built from the settings by :func:`create_app`.

Agents live in ``agents/``, one module per stream job; the composition roots (app/worker.py, app/writer.py)
bind them to a :class:`Wiring`. Nothing is read or built at import.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import faust

from app import faust_patches
from app.ops import kafka
from app.ops.logs import json_logging_config
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class Wiring:
    """One process's Faust app with the topics and tables its jobs bind to (Faust's are untyped: ``Any``)."""

    app: faust.App
    observations_topic: Any
    metrics_topic: Any
    dlq_topic: Any
    checkpoints_topic: Any
    """How far each metrics-1m partition is closed (agents/progress.py), for a second store's writer during a
    migration (app/writer.py); compacted, partitioned like metrics-1m."""
    sink_dlq_topic: Any
    windows_table: Any
    """Open windows and per-app progress, keyed by input partition (tables/state.py). Not a Faust windowed
    table on purpose: we own the window lifecycle (tables/windows.py). RocksDB-backed with a changelog."""
    alerts_topic: Any
    autoscale_topic: Any
    policy_commands_topic: Any
    monitors_table: Any
    """Monitors with their state (one value per app) and pending deliveries (agents/alerts.py). Written only
    from the agents' streams, so every key lives in the partition of its app's minutes; changelogged, so a
    restart keeps definitions and state. ``autoscale_table`` is the same for autoscaling policies."""
    autoscale_table: Any
    rollups_table: Any
    """Partial 10 min / 1 h / 2 h buckets with the minutes merged into each (agents/rollup.py), written from
    the rollup agent's stream on metrics-1m (key = app), so each app's buckets live in its minutes' partition."""


def create_app(settings: Settings) -> Wiring:
    """A new Faust app for ``settings``, with the pipeline's topics and tables declared on it."""
    faust_patches.apply()  # before any app exists: a restarted worker must not skip records never committed
    app = _faust_app(settings)
    # Should Faust create a changelog itself (ensure_topics normally does first), the same limit as there.
    changelog_configs = {"max.message.bytes": str(settings.kafka.changelog_max_message_bytes)}

    def topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.kafka.partitions)

    def table(name: str) -> Any:
        return app.Table(name, partitions=settings.kafka.partitions, key_type=bytes, value_type=bytes, default=None,
                         extra_topic_configs=changelog_configs)

    return Wiring(
        app=app,
        observations_topic=topic(settings.kafka.observations_topic),
        metrics_topic=topic(settings.kafka.metrics_topic),
        dlq_topic=topic(settings.kafka.dlq_topic),
        checkpoints_topic=topic(settings.kafka.checkpoints_topic),
        sink_dlq_topic=topic(settings.kafka.sink_dlq_topic),
        windows_table=table("windows"),
        alerts_topic=topic(settings.kafka.alerts_topic),
        autoscale_topic=topic(settings.kafka.autoscale_topic),
        policy_commands_topic=topic(settings.kafka.policy_commands_topic),
        monitors_table=table("monitors"),
        autoscale_table=table("autoscale"),
        rollups_table=table("rollups"),
    )


def _faust_app(s: Settings) -> faust.App:
    return faust.App(
        s.kafka.app_id,
        broker=s.kafka.broker_url,
        store=s.windows.store_url,
        datadir=s.windows.data_dir,
        topic_partitions=s.kafka.partitions,
        topic_replication_factor=s.kafka.replication_factor,
        # Kafka has transactions, but Faust's exactly_once has open issues; correctness comes from idempotent
        # effects instead (tables/windows.py), so at-least-once is the right guarantee everywhere.
        processing_guarantee="at_least_once",
        producer_acks=-1,  # a minute is only "emitted" once every in-sync replica has it
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.kafka.session_timeout_s,
        broker_heartbeat_interval=s.kafka.heartbeat_interval_s,
        broker_rebalance_timeout=s.kafka.rebalance_timeout_s,
        web_enabled=True,  # served by our own aiohttp service (app/worker.py Runtime), not faust.web
        # Where the other workers reach this one: the partition assignment carries it, and reads of an app
        # owned elsewhere are forwarded there (app/api/policies.py).
        canonical_url=s.web.advertised_url or f"http://{socket.gethostname()}:{s.web.port}",
        key_serializer="raw",
        value_serializer="raw",
        table_standby_replicas=0,
        # A single aggregation message may carry 500+ observations and a closing minute several KB of
        # digests: allow the producer to batch them. The largest single record is a changelog value
        # (an open window), bounded by the changelogs' max.message.bytes (app/ops/topics.py); a minute is
        # kept below METRICS_MINUTE_MAX_BYTES (agents/aggregate.py).
        producer_max_request_size=s.kafka.changelog_max_message_bytes,
        consumer_max_fetch_size=s.kafka.fetch_max_partition_bytes,
        # JSON lines without secrets for log pipelines (app/ops/health.py); Faust's colored text otherwise.
        logging_config=json_logging_config("INFO") if s.ops.log_format == "json" else None,
        **kafka.faust_kwargs(s.kafka),  # TLS to the brokers, when configured
    )

