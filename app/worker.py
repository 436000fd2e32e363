"""Composition root of a worker process: the store, the stream jobs and the web server on one Faust app.

``python -m app worker`` (app/cli.py) builds it with :func:`create_worker` and runs it in a Faust worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
import orjson
from aiohttp import web
from mode import Service

from agents import aggregate, alerts, autoscale, events, progress, rollup, sink
from app.api.openapi import document, with_policy_routes
from app.api.policies import CommandResults, Forwarder, add_policy_routes
from app.api.policies import token_authorizer as policy_authorizer
from app.api.prometheus.http import add_prometheus_routes
from app.api.web import OPENAPI_KEY, add_admin_routes, make_web_app, token_authorizer
from app.app import create_app
from app.migration.control import MigrationControl
from app.migration.reads import Engines, MigratingQuery, ReadStats
from app.migration.state import home_spec
from app.migration.tables import FollowingTokens
from app.migration.view import add_migration_routes
from app.migration.writes import WriteGate
from app.notify.notifier import Notifier
from app.ops import health as ops
from app.ops.stats import counters
from app.sealing import use_secrets_key
from app.settings import Settings
from app.storage.backends import metrics_store
from app.storage.protocol import MetricsBackend
from app.storage.tokens import TokenStore

log = logging.getLogger(__name__)


def create_worker(settings: Settings) -> faust.App:
    """A new Faust app with every stream job bound and :class:`Runtime` as its web server."""
    wiring = create_app(settings)
    app = wiring.app
    # Webhook secrets in policy commands, the monitors/policies changelogs and the outbox: sealed with this key.
    secrets_box = use_secrets_key(settings.alerting.secrets_key.get_secret_value())
    store = metrics_store(settings, counters=counters)  # METRICS_STORE: what this worker's writers store into
    home = home_spec(settings)
    # Writers run while the migration state writes this store (always, without a migration: app/migration/).
    gate = WriteGate(home)
    control = MigrationControl(settings, counters=counters, on_change=gate.follow)
    # How far each metrics-1m partition is stored: what queries may call final (agents/progress.py).
    watermarks = progress.Watermarks(changed_keep_ms=int(settings.query.cache_max_age_s * 1000), gated=True)
    aggregator = aggregate.bind(wiring, settings, counters, watermarks)
    sink.bind(wiring, settings, store, counters, gate.ready)
    rollups = rollup.bind(wiring, settings, store, counters, gate.ready, watermarks)
    # The watermark moves once the rollup job stored what the committed minutes made final.
    progress.bind(wiring, settings, store, counters, gate.ready, watermarks, flush=rollups.flush)
    events.bind(wiring, settings, store, counters, gate.ready)  # markers for the dashboard
    # While another store is written (a migration), its writer process needs this worker's checkpoints.
    progress.bind_checkpoint_sender(wiring, settings, watermarks,
                                    wanted=lambda: any(spec != home for spec in control.current().writes))
    # Reads: each app from the store the migration serves it from, shadow reads compared (app/migration/reads.py).
    read_stats = ReadStats()
    engines = Engines(settings, read_stats, live=aggregator.live, counters=counters, started={home: store})
    query = MigratingQuery(settings, control.current, engines, stats=read_stats, counters=counters)
    tokens = TokenStore(settings.web, table=FollowingTokens(settings, control.current), counters=counters)
    notifier = Notifier(settings.alerting, counters)
    policy_results = CommandResults()
    alert_engine = alerts.bind(wiring, settings, counters, notifier, policy_results)
    autoscaler = autoscale.bind(wiring, settings, counters, notifier, policy_results)
    # Reads of an app another worker owns are forwarded to it (one long-lived HTTP session, started below).
    forwarder = Forwarder(self_url=str(app.conf.canonical_url))
    policy_backend = alerts.policy_backend(wiring, settings, monitors=alert_engine.doc, policies=autoscaler.doc,
                                           results=policy_results, forwarder=forwarder)

    def recovered() -> bool:
        """First table recovery done and no rebalance recovery running (TableManagerT does not declare it)."""
        tables: Any = app.tables
        return bool(tables.recovery.completed.is_set() and not tables.recovery.in_recovery)

    def admin_routes(admin: web.Application) -> None:
        add_admin_routes(admin, settings, counters)
        add_migration_routes(admin, query)

    def add_routes(webapp: web.Application) -> None:
        """Policies API on the worker's web app; /readyz (Kafka, table recovery, the store), /metrics,
        /migration and /v1/stats on its admin port (the tenant port keeps a bare /readyz)."""
        # Monitors/policies: the app's read token to look, its write token to change (same tokens as the APIs).
        add_policy_routes(webapp, policy_backend, authorize=policy_authorizer(tokens))
        add_prometheus_routes(webapp)
        webapp[OPENAPI_KEY] = orjson.dumps(with_policy_routes(document(settings)))  # only workers serve them
        ops.add_admin_port(
            webapp, settings.ops, counters=counters, routes=admin_routes,
            checks={
                "broker": ops.broker_check(settings.kafka.broker_url),
                "recovery": ops.flag_check(
                    recovered, message="table recovery has not finished",
                    action="wait: window state is being rebuilt from RocksDB or the changelog; if it lasts, read "
                           "the worker log and minutely_consumer_lag_*"),
                "store": store.ping,
            },
            refresh=ops.lag_refresher(app, counters, observations_topic=settings.kafka.observations_topic,
                                      metrics_topic=settings.kafka.metrics_topic),
        )

    def web_app() -> web.Application:
        # The read API shares this event loop with the stream jobs: make_web_app caps the queries computing at
        # once (METRICS_QUERY_MAX_CONCURRENT, per app METRICS_QUERY_MAX_CONCURRENT_PER_APP) and rate-limits each
        # app (METRICS_LIMIT_QUERY_*, following METRICS_LIMITS_FILE while the runner is set up).
        return make_web_app(query, settings, counters, extra=add_routes, authorize=token_authorizer(tokens))

    app.web_server(Runtime(settings, store=store, control=control, tokens=tokens, gate=gate, notifier=notifier,
                           forwarder=forwarder, engines=engines, web_app=web_app,
                           sealed=secrets_box.enabled))
    return app


class Runtime(Service):
    """Owns the long-lived clients and the HTTP server (started by Faust after table recovery)."""

    def __init__(self, settings: Settings, *, store: MetricsBackend, control: MigrationControl, tokens: TokenStore,
                 gate: WriteGate, notifier: Notifier, forwarder: Forwarder, engines: Engines,
                 web_app: Callable[[], web.Application], sealed: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.store = store
        self.control = control
        self.tokens = tokens
        self.gate = gate
        self.notifier = notifier
        self.forwarder = forwarder
        self.engines = engines
        self.web_app = web_app
        self.sealed = sealed
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        s = self.settings
        if not self.sealed and s.ops.log_format == "json":  # production-like: say it once
            log.warning("webhook HMAC secrets are stored in plaintext (policy-commands topic, monitors changelog, "
                        "outbox): set METRICS_SECRETS_KEY to a Fernet key, made with python -c \"from "
                        "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"")
        await self.store.start()
        await self.control.start()  # the migration state: which stores to write and read
        await self.tokens.start()
        self.gate.started()
        await self.notifier.start()
        await self.forwarder.start()
        self._runner = web.AppRunner(self.web_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, s.web.host, s.web.port).start()
        log.info("web API on http://%s:%d", s.web.host, s.web.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.forwarder.stop()
        await self.notifier.stop()
        await self.tokens.stop()
        await self.control.stop()
        await self.engines.stop()
        await self.store.stop()
