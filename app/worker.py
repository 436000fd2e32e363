"""Composition root of a worker process: the store, both stream jobs and the web server on one Faust app.

``python -m app worker`` imports this module and hands control to Faust.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from mode import Service

from agents import aggregate, sink
from app.app import app, settings
from app.query import MetricsQuery
from app.stats import counters
from app.store import DynamoStore
from app.web import make_web_app

log = logging.getLogger(__name__)

store = DynamoStore(settings)
store_ready = asyncio.Event()
aggregator = aggregate.bind(app, settings, counters)
sink_job = sink.bind(app, settings, store, counters, store_ready)
query = MetricsQuery(store, live=aggregator.live)


class Runtime(Service):
    """Owns the long-lived DynamoDB client and the HTTP server (started by Faust after table recovery)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        await store.start()
        store_ready.set()
        self._runner = web.AppRunner(make_web_app(query, settings, counters), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, settings.web_host, settings.web_port).start()
        log.info("web API on http://%s:%d", settings.web_host, settings.web_port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await store.stop()


app.web_server(Runtime())
