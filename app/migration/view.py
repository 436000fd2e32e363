"""The operator's view of a migration: ``GET /migration`` (JSON) on the admin port of every process that
answers queries, and the page ``/dashboard/migration.html`` there that charts it: both stores' read p50/p99
per minute side by side, and the shadow mismatch rate, the picture of Heroku's move.

Only ever on the admin port (app/ops/health.py :func:`add_admin_port`), like ``/metrics``: the report's
``recent_mismatches`` name every tenant's apps, process types and values."""

from __future__ import annotations

import orjson
from aiohttp import web

from app.migration.reads import MigratingQuery

MIGRATING_KEY: web.AppKey[MigratingQuery] = web.AppKey("migrating")


async def get_migration(request: web.Request) -> web.Response:
    body = orjson.dumps(request.app[MIGRATING_KEY].report(), option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})


def add_migration_routes(webapp: web.Application, query: MigratingQuery) -> None:
    """``webapp`` must be an admin port's app, never a tenant's."""
    webapp[MIGRATING_KEY] = query
    webapp.router.add_get("/migration", get_migration)
