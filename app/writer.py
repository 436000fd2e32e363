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
from typing import Any

from aiohttp import web
from mode import Service

from agents import events, progress, rollup, sink
from app.app import app, settings
from app.migration.control import MigrationControl
from app.migration.state import home_spec
from app.migration.writes import WriteGate
from app.ops import health as ops
from app.ops.stats import counters
from app.storage.backends import metrics_store

log = logging.getLogger(__name__)

spec = home_spec(settings)  # the CLI points METRICS_STORE (and the table or keyspace) at the written store
store = metrics_store(settings, counters=counters)
gate = WriteGate(spec)
control = MigrationControl(settings, counters=counters, on_change=gate.follow)
watermarks = progress.Watermarks(changed_keep_ms=int(settings.query_cache_max_age_s * 1000))
sink_job = sink.bind(app, settings, store, counters, gate.ready)
rollup_job = rollup.bind(app, settings, store, counters, gate.ready, watermarks)
progress_job = progress.bind(app, settings, store, counters, gate.ready, watermarks)
progress.bind_checkpoint_reader(app, watermarks)
events_job = events.bind(app, settings, store, counters, gate.ready)


def _routes() -> web.Application:
    """The app whose lifetime carries the admin port (``add_admin_port`` starts it with the app's startup and
    stops it with its cleanup). No site ever listens for this app itself: the writer has no tenants."""
    webapp = web.Application()
    ops.add_admin_port(
        webapp, settings, counters=counters,
        checks={"broker": ops.broker_check(settings.broker_url), "store": store.ping},
        refresh=ops.lag_refresher(app, counters, observations_topic=settings.observations_topic,
                                  metrics_topic=settings.metrics_topic))
    return webapp


class Runtime(Service):
    """The store client, the migration state and the ops endpoints."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        await store.start()
        await control.start()
        gate.started()
        webapp = _routes()
        self._runner = web.AppRunner(webapp, access_log=None)
        await self._runner.setup()  # runs the app's startup: the admin port listens from here on
        log.info("writer for %s (group %s); ops on %s", spec, settings.app_id, webapp[ops.ADMIN_KEY].url)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await control.stop()
        await store.stop()


app.web_server(Runtime())
