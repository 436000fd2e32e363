"""Composition root of a store writer: ``python -m app writer --store <spec>`` (app/cli.py).

During a migration (app/migration/) each store has its own writer, in its own consumer group, so a slow or
failing store never stalls the other: the aggregating workers write their configured store, and a writer
process writes the other one. It runs the jobs that store minutes: the sink, the rollups with their summary
blocks, the alert/autoscaling event markers, and the stored-through watermarks. Those follow the
aggregating workers' checkpoints (``checkpoints_topic``, agents/progress.py), as this process closes no
windows itself. Its writers pause while the migration does not write its store.

Its consumer group is ``<app_id>-writer-<store>``; ``migration start`` set its offsets (the current end, or
the earliest retained records with ``--backfill``). ``/healthz``, ``/readyz`` (with reasons) and ``/metrics``
(lag included) are served on its admin port (``METRICS_ADMIN_HOST`` / ``METRICS_ADMIN_PORT``,
app/ops/health.py ``add_admin_port``), as on every role. It serves no tenant, so it listens on no tenant port
(``METRICS_WEB_PORT`` is unused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from aiohttp import web
from mode import Service

from agents import events, progress, rollup, sink
from app.app import create_app
from app.migration.control import MigrationControl
from app.migration.state import home_spec, store_settings, writer_group
from app.migration.writes import WriteGate
from app.ops import health as ops
from app.ops.stats import counters
from app.settings import Settings
from app.storage.backends import metrics_store
from app.storage.protocol import MetricsBackend

log = logging.getLogger(__name__)


def writer_settings(settings: Settings, spec: str) -> Settings:
    """The writer's own settings: the store ``spec`` names, its consumer group as the Faust app id, and its
    own state directory (RocksDB allows one process per directory)."""
    group = writer_group(settings, spec)
    return store_settings(settings, spec).replace(app_id=group, data_dir=str(Path(settings.windows.data_dir) / group))


def create_writer(settings: Settings, spec: str) -> faust.App:
    """A new Faust app with the jobs that store minutes into ``spec`` bound, and :class:`Runtime` as its web
    server (``settings`` are the deployment's: the writer's own come from :func:`writer_settings`)."""
    settings = writer_settings(settings, spec)
    Path(settings.windows.data_dir).mkdir(parents=True, exist_ok=True)
    wiring = create_app(settings)
    home = home_spec(settings)
    store = metrics_store(settings, counters=counters)
    gate = WriteGate(home)
    control = MigrationControl(settings, counters=counters, on_change=gate.follow)
    watermarks = progress.Watermarks(changed_keep_ms=int(settings.query.cache_max_age_s * 1000), gated=True)
    sink.bind(wiring, settings, store, counters, gate.ready)
    rollups = rollup.bind(wiring, settings, store, counters, gate.ready, watermarks)
    # The watermark moves once the rollup job stored what the committed minutes made final.
    progress.bind(wiring, settings, store, counters, gate.ready, watermarks, flush=rollups.flush)
    progress.bind_checkpoint_reader(wiring, watermarks)
    events.bind(wiring, settings, store, counters, gate.ready)

    def routes() -> web.Application:
        """The app whose lifetime carries the admin port (``add_admin_port`` starts it with the app's startup
        and stops it with its cleanup). No site ever listens for this app itself: the writer has no tenants."""
        webapp = web.Application()
        ops.add_admin_port(
            webapp, settings.ops, counters=counters,
            checks={"broker": ops.broker_check(settings.kafka.broker_url), "store": store.ping},
            refresh=ops.lag_refresher(wiring.app, counters, observations_topic=settings.kafka.observations_topic,
                                      metrics_topic=settings.kafka.metrics_topic))
        return webapp

    wiring.app.web_server(Runtime(f"{home} (group {settings.kafka.app_id})", store=store, control=control, gate=gate,
                                  routes=routes))
    return wiring.app


class Runtime(Service):
    """The store client, the migration state and the ops endpoints."""

    def __init__(self, what: str, *, store: MetricsBackend, control: MigrationControl, gate: WriteGate,
                 routes: Callable[[], web.Application], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what
        self.store = store
        self.control = control
        self.gate = gate
        self.routes = routes
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        await self.store.start()
        await self.control.start()
        self.gate.started()
        webapp = self.routes()
        self._runner = web.AppRunner(webapp, access_log=None)
        await self._runner.setup()  # runs the app's startup: the admin port listens from here on
        log.info("writer for %s; ops on %s", self.what, webapp[ops.ADMIN_KEY].url)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.control.stop()
        await self.store.stop()
