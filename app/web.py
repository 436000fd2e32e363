"""HTTP API (aiohttp). Errors are ``{"error": {"code", "message"}}`` with a 4xx for the client's mistakes
and a 503 with Retry-After when a dependency is down -- never a 500 for bad input.

Auth (per-app read tokens), rollup resolutions and the dashboard attach here in later issues.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import orjson
from aiohttp import web

from app import models
from app.errors import RetriableError, StoreError
from app.query import MetricsQuery
from app.settings import WINDOW_S, Settings
from app.stats import CATALOGUE, Counters

log = logging.getLogger(__name__)

QUERY_KEY: web.AppKey[MetricsQuery] = web.AppKey("query", MetricsQuery)
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)
COUNTERS_KEY: web.AppKey[Counters] = web.AppKey("counters", Counters)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def _int_param(request: web.Request, name: str, default: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"query parameter {name!r} is required (epoch seconds)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer (epoch seconds), got {raw!r}") from None


async def get_metrics(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    app = request.match_info["app"]
    proc = request.query.get("process_type", "web")
    if not models.valid_app(app):
        return error(400, "invalid_app", "app must be 1..100 characters of [A-Za-z0-9._-]")
    if not models.valid_app(proc):
        return error(400, "invalid_process_type", "process_type must be 1..100 characters of [A-Za-z0-9._-]")
    now_s = int(time.time())
    try:
        until_s = _int_param(request, "until", now_s + WINDOW_S)
        since_s = _int_param(request, "since", until_s - 3600)
    except ValueError as exc:
        return error(400, "invalid_range", str(exc))
    if since_s >= until_s:
        return error(400, "invalid_range", "since must be before until")
    if (until_s - since_s) // WINDOW_S > settings.max_query_points:
        return error(400, "range_too_large",
                     f"at most {settings.max_query_points} one-minute points per request; narrow since/until")
    try:
        body = await request.app[QUERY_KEY].minutes(app, proc, since_s, until_s)
    except RetriableError as exc:
        log.warning("query failed, dependency unavailable: %s", exc)
        return error(503, "unavailable", "metrics store unavailable, retry shortly",
                     {"Retry-After": str(max(1, int(exc.retry_after_s)))})
    except StoreError as exc:
        log.error("query failed: %s", exc)
        return error(503, "store_error", "metrics store misconfigured; the operator has been logged the cause")
    return json_response(body)


async def get_stats(request: web.Request) -> web.Response:
    values = request.app[COUNTERS_KEY].snapshot()
    return json_response({"counters": values, "help": CATALOGUE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def make_web_app(query: MetricsQuery, settings: Settings, counters: Counters,
                 extra: Callable[[web.Application], None] | None = None) -> web.Application:
    webapp = web.Application()
    webapp[QUERY_KEY] = query
    webapp[SETTINGS_KEY] = settings
    webapp[COUNTERS_KEY] = counters
    webapp.router.add_get("/v1/apps/{app}/metrics", get_metrics)
    webapp.router.add_get("/v1/stats", get_stats)
    webapp.router.add_get("/healthz", healthz)
    if extra is not None:
        extra(webapp)
    return webapp
