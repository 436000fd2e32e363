"""The operator's view of a migration: ``GET /migration`` (JSON) on every process that answers queries, and
the page ``/dashboard/migration.html`` that charts it: both stores' read p50/p99 per minute side by side,
and the shadow mismatch rate, the picture of Heroku's move. Exposed like ``/metrics`` (operators, not app
users: restrict it at the ingress as you do ``/metrics``)."""

from __future__ import annotations

import orjson
from aiohttp import web

from app.migration.reads import MigratingQuery

MIGRATING_KEY: web.AppKey[MigratingQuery] = web.AppKey("migrating")


async def get_migration(request: web.Request) -> web.Response:
    body = orjson.dumps(request.app[MIGRATING_KEY].report(), option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})


def add_migration_routes(webapp: web.Application, query: MigratingQuery) -> None:
    webapp[MIGRATING_KEY] = query
    webapp.router.add_get("/migration", get_migration)
