"""HTTP API (aiohttp): the tenant routes of every process that answers queries.

Errors are ``{"error": {"code", "message"}}``: a 4xx for the client's mistakes, a 503 with Retry-After when a
dependency is down, never a 500 for bad input. Another app answers exactly as a nonexistent one; rates and
query slots are per app; the operator's endpoints are on the admin port only.
Reference: docs/api.md#tenant-isolation
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from app import models
from app.api.openapi import OPENAPI_PATH, document
from app.api.query import RESOLUTION_NAMES, QueryEngine, auto_resolution
from app.clock import Clock, SystemClock
from app.errors import RetriableError, StoreError
from app.limits import Buckets, FairSlots, Limits
from app.ops.stats import CATALOGUE, Counters
from app.settings import WINDOW_S, Settings
from app.storage.tokens import bearer, client_middleware
from tables.aggregate import RESOLUTIONS

log = logging.getLogger(__name__)

Authorize = Callable[[str], Awaitable["str | None"]]
"""A read token -> the app it may read, or None when it is not a live read token."""

QUERY_KEY: web.AppKey[QueryEngine] = web.AppKey("query")
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)
COUNTERS_KEY: web.AppKey[Counters] = web.AppKey("counters", Counters)
AUTH_KEY: web.AppKey[Authorize] = web.AppKey("authorize")
OPENAPI_KEY: web.AppKey[bytes] = web.AppKey("openapi", bytes)
RATE_KEY: web.AppKey[QueryRate] = web.AppKey("query_rate")
GATE_KEY: web.AppKey[FairSlots] = web.AppKey("query_gate")
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("clock")

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
DASHBOARD_FILES = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css",
                   "favicon.svg": "image/svg+xml"}
OPERATOR_FILES = {"migration.html": "text/html", "migration.js": "text/javascript", "dashboard.css": "text/css",
                  "favicon.svg": "image/svg+xml"}
"""The migration page charts ``/migration`` (other tenants' names and values): served on the admin port only."""
VENDOR_FILES = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
DEFAULT_ASSETS_DIR = Path(__file__).resolve().parents[2] / ".deps" / "uplot" / "dist"
FINAL_CACHE_CONTROL = "private, no-cache"
"""Even a final answer can change: a late minute (a new app's old data, a re-sent minute) is stored after its
bucket was final. Query processes drop their cached answers for it (agents/progress.py), but a browser or
proxy holding a max-age could not be told; it revalidates instead, and the ETag makes that a cheap 304."""
LIVE_CACHE_CONTROL = "private, no-cache"
DASHBOARD_CSP = "default-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
"""The pages load only their own origin's scripts, styles and ``fetch`` targets (uPlot sets styles through the
CSSOM, which ``style-src`` allows); no framing (clickjacking), no plugins, no ``<base>`` rewriting."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


Reply = Callable[[int, str, str, "dict[str, str] | None"], web.Response]
"""How a route answers an error: (status, code, message, headers). :func:`error` for the native API; the
OTLP receiver and the Prometheus API answer in their own protocol's shape."""


class QueryTimeout(RetriableError):
    """The work did not end within ``METRICS_QUERY_TIMEOUT_S`` (code ``timeout``: retry after the delay)."""


MAX_EPOCH_S = 10**11
"""Year 5138: any since/until past it is a mistake (and past 2**63 it cannot even be written as JSON)."""


def _int_param(request: web.Request, name: str, default: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"query parameter {name!r} is required (epoch seconds)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer (epoch seconds), got {raw[:40]!r}") from None
    if not 0 <= value <= MAX_EPOCH_S:  # found by schemathesis: 2**70 passed the range checks, then broke JSON
        raise ValueError(f"query parameter {name!r} must be epoch seconds between 0 and {MAX_EPOCH_S}")
    return value


def parse_resolution(raw: str | None, span_s: int) -> int:
    """``auto`` (or absent), seconds (60, 600, 3600, 7200) or a name (1m, 10m, 1h, 2h)."""
    if raw is None or raw == "auto":
        return auto_resolution(span_s)
    if raw in RESOLUTION_NAMES:
        return RESOLUTION_NAMES[raw]
    if raw.isdigit() and int(raw) in RESOLUTIONS:
        return int(raw)
    raise ValueError(f"resolution must be auto, one of {', '.join(RESOLUTION_NAMES)} or seconds "
                     f"{', '.join(str(r) for r in RESOLUTIONS)}; got {raw!r}")


def _unavailable(exc: RetriableError | StoreError, reply: Reply = error) -> web.Response:
    if isinstance(exc, QueryTimeout):
        log.warning("request timed out: %s", exc)
        return reply(503, "timeout", f"{exc}; retry shortly", {"Retry-After": str(max(1, int(exc.retry_after_s)))})
    if isinstance(exc, RetriableError):
        log.warning("request failed, dependency unavailable: %s", exc)
        return reply(503, "unavailable", "metrics store unavailable, retry shortly",
                     {"Retry-After": str(max(1, int(exc.retry_after_s)))})
    log.error("request failed: %s", exc)
    return reply(503, "store_error", "metrics store misconfigured; the operator has been logged the cause", None)


T = TypeVar("T")


async def _bounded(request: web.Request, work: Awaitable[T]) -> T:
    """``work`` within ``METRICS_QUERY_TIMEOUT_S``, else a retriable error (503 with Retry-After). While the
    store is down, its client's own retries (with backoff) would hold a request for ~15 s; a dashboard or
    an alerting script should hear "unavailable" sooner. The work itself goes on (shielded) and fills the
    caches, and requests sharing it are not cancelled."""
    timeout_s = request.app[SETTINGS_KEY].query.timeout_s
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)  # a late failure is the store's, already logged: not "never retrieved"
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        raise QueryTimeout(f"the metrics store did not answer within {timeout_s:g} s",
                             action="check the store (METRICS_DYNAMODB_ENDPOINT / Cassandra) and its latency",
                             retry_after_s=2) from None


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class QueryRate:
    """Per-app token buckets of read API requests: ``query_burst`` deep, refilled at ``query_rate_per_s``
    (the app's limits, re-read on every request, so an override applies without a restart)."""

    def __init__(self, limits: Limits, clock: Clock | None = None) -> None:
        self.limits = limits
        self.clock = clock or SystemClock()
        self._buckets = Buckets()

    def take(self, app: str) -> int | None:
        """Charge one request to ``app``: None when it may go on, else the seconds until it may retry."""
        lim = self.limits.of(app)
        now_ms = self.clock.now_ms()
        rate, burst = lim.query_rate_per_s, float(lim.query_burst)
        level = self._buckets.level(app, rate_per_s=rate, burst=burst, now_ms=now_ms)
        if level >= 1:
            self._buckets.charge(app, 1, rate_per_s=rate, burst=burst, now_ms=now_ms)
            return None
        return Buckets.retry_after_s(level, 1, rate)


async def query_slot(request: web.Request, app: str, make: Callable[[], Awaitable[T]], reply: Reply = error,
                 ) -> T | web.Response:
    """``make()`` in one of the process's query slots and within the query timeout; else the 503 to answer
    (no slot in time, the store down or slow). The slot is given back when the work ends, not when this
    request stops waiting for it."""
    gate = request.app[GATE_KEY]
    if not await gate.acquire(app):
        request.app[COUNTERS_KEY].inc_app("query_refused_busy", app)
        return reply(503, "overloaded", f"no query slot freed within {gate.wait_s:g} s (at most {gate.slots} "
                     f"queries compute at once here, {gate.per_app} of one app); retry after the delay",
                     {"Retry-After": str(max(1, math.ceil(gate.wait_s or 1)))})
    try:
        task = asyncio.ensure_future(make())
    except BaseException:
        gate.release(app)
        raise
    task.add_done_callback(lambda _: gate.release(app))
    try:
        return await _bounded(request, task)
    except (RetriableError, StoreError) as exc:
        return _unavailable(exc, reply)


async def token_app(request: web.Request, reply: Reply = error) -> str | web.Response:
    """The app the request's read token grants, or the 401/503 to answer."""
    token = bearer(request.headers, {})  # not ?token=: query strings end up in access logs
    if not token:
        request.app[COUNTERS_KEY].inc("query_auth_refused")
        return reply(401, "unauthorized", "send Authorization: Bearer <read token>; create one with "
                     "`python -m app tokens create --app APP --kind read`",
                     {"WWW-Authenticate": 'Bearer realm="minutely"'})
    try:
        app = await _bounded(request, request.app[AUTH_KEY](token))
    except (RetriableError, StoreError) as exc:
        return _unavailable(exc, reply)
    if app is None:
        request.app[COUNTERS_KEY].inc("query_auth_refused")
        return reply(401, "invalid_token", "the token is not a valid read token (revoked, mistyped, or a "
                     "drain/write token); create a read token for the app",
                     {"WWW-Authenticate": 'Bearer realm="minutely", error="invalid_token"'})
    retry_after_s = request.app[RATE_KEY].take(app)
    if retry_after_s is not None:
        request.app[COUNTERS_KEY].inc_app("query_refused_rate", app)
        lim = request.app[RATE_KEY].limits.of(app)
        return reply(429, "rate_limited", f"app {app!r} is over its read API rate of {lim.query_rate_per_s:g} "
                     f"requests/s (burst {lim.query_burst}); retry after the delay (the operator can raise the "
                     "app's limit)", {"Retry-After": str(retry_after_s)})
    return app


def _not_found(app: str) -> web.Response:
    return error(404, "not_found", f"no app {app!r} for this token")


async def _series_request(request: web.Request) -> tuple[str, str, int, int] | web.Response:
    """Auth, then process type and range, shared by /metrics and /events: (app, process type, since, until)
    or the error to answer."""
    settings = request.app[SETTINGS_KEY]
    app = request.match_info["app"]
    granted = await token_app(request)
    if isinstance(granted, web.Response):
        return granted
    if granted != app:  # also every nonexistent app: the same answer, before anything else is checked
        return _not_found(app)
    proc = request.query.get("process_type", "web")
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
    if until_s - since_s > settings.storage.ttl_s + 2 * 7200:  # slack: a 30-day range aligned outward to 2 h buckets
        return error(400, "range_too_large", f"at most {settings.storage.ttl_days:g} days (the retention) per request; "
                     "narrow since/until")
    return app, proc, since_s, until_s


async def get_metrics(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    parsed = await _series_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    app, proc, since_s, until_s = parsed
    span_s = until_s - since_s
    try:
        res = parse_resolution(request.query.get("resolution"), span_s)
    except ValueError as exc:
        return error(400, "invalid_resolution", str(exc))
    points = -(-until_s // res) - since_s // res
    if points > settings.query.max_points:
        return error(400, "too_many_points", f"{points} points at {res} s resolution; at most "
                     f"{settings.query.max_points} per request: use a coarser resolution or a shorter range")
    engine = request.app[QUERY_KEY]
    ans = await query_slot(request, app, lambda: engine.answer(app, proc, res, since_s, until_s))
    if isinstance(ans, web.Response):
        return ans
    headers = {"ETag": ans.etag, "Cache-Control": FINAL_CACHE_CONTROL if ans.final else LIVE_CACHE_CONTROL,
               "Vary": "Authorization", "X-Final": "true" if ans.final else "false"}
    inm = request.headers.get("If-None-Match")
    if inm is not None and ans.etag in (t.strip() for t in inm.split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=ans.body, content_type="application/json", headers=headers)


async def get_events(request: web.Request) -> web.Response:
    """Alert transitions and autoscaling steps in ``[since, until)`` (agents/events.py), oldest first.

    Not cached (each call is one store Query over its range, and ranges rarely repeat: ``until`` follows the
    clock), so the range is capped at ``events_max_range_days`` (default 7) rather than the retention:
    400 ``range_too_large`` beyond it."""
    parsed = await _series_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    app, proc, since_s, until_s = parsed
    max_days = request.app[SETTINGS_KEY].query.events_max_range_days
    if until_s - since_s > max_days * 86400:
        return error(400, "range_too_large", f"at most {max_days:g} days of events per request; narrow "
                     "since/until")
    engine = request.app[QUERY_KEY]
    body = await query_slot(request, app, lambda: engine.events(app, proc, since_s, until_s))
    if isinstance(body, web.Response):
        return body
    return web.Response(body=body, content_type="application/json",
                        headers={"Cache-Control": LIVE_CACHE_CONTROL, "Vary": "Authorization"})


async def whoami(request: web.Request) -> web.Response:
    granted = await token_app(request)
    if isinstance(granted, web.Response):
        return granted
    return json_response({"app": granted, "kind": "read"}, headers={"Cache-Control": "private, no-store"})


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json",
                        headers={"Cache-Control": "public, max-age=300"})


async def get_stats(request: web.Request) -> web.Response:
    values = request.app[COUNTERS_KEY].snapshot()
    return json_response({"counters": values, "help": CATALOGUE}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _file(path: Path, content_type: str) -> web.Response:
    try:
        body = await asyncio.to_thread(path.read_bytes)  # small files; a disk read never blocks the loop
    except OSError:
        return error(404, "not_found", f"{path.name} is not installed here; run `make install` (it fetches "
                     "the charting library into .deps/uplot)")
    return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "public, max-age=300"})


async def dashboard_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


async def dashboard_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    ctype = DASHBOARD_FILES.get(name)
    if ctype is None:
        return error(404, "not_found", f"no dashboard file {name!r}")
    return await _file(DASHBOARD_DIR / name, ctype)


async def operator_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    ctype = OPERATOR_FILES.get(name)
    if ctype is None:
        return error(404, "not_found", f"no operator page {name!r}")
    return await _file(DASHBOARD_DIR / name, ctype)


async def vendor_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    ctype = VENDOR_FILES.get(name)
    if ctype is None:
        return error(404, "not_found", f"no vendored file {name!r}")
    configured = request.app[SETTINGS_KEY].web.dashboard_assets_dir
    return await _file((Path(configured) if configured else DEFAULT_ASSETS_DIR) / name, ctype)


@web.middleware
async def json_not_found(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Unknown paths and methods answer with the same error body as everything else."""
    exc = getattr(request.match_info, "http_exception", None)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}",
                     {"Allow": ",".join(sorted(exc.allowed_methods))})
    if isinstance(exc, web.HTTPNotFound):
        return error(404, "not_found", f"no endpoint {request.path}; see {OPENAPI_PATH}")
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response (errors, redirects and 304s too): no content sniffing; the dashboard's files get the
    CSP and no Referer (security review M9)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path == "/dashboard" or request.path.startswith("/dashboard/"):
        response.headers.setdefault("Content-Security-Policy", DASHBOARD_CSP)
        response.headers.setdefault("Referrer-Policy", "no-referrer")


async def _refuse_all(token: str) -> str | None:
    return None


def make_web_app(query: QueryEngine, settings: Settings, counters: Counters,
                 extra: Callable[[web.Application], None] | None = None, *,
                 authorize: Authorize | None = None, limits: Limits | None = None,
                 clock: Clock | None = None) -> web.Application:
    """``authorize`` maps a read token to its app (app/storage/tokens.py). Without one every token is refused.
    ``limits``: the per-app limits (the query rate); without them the app follows ``METRICS_LIMITS_FILE`` itself
    (loaded at startup, reloaded while it runs). ``clock`` drives the rate buckets (tests)."""
    webapp = web.Application(middlewares=[json_not_found, client_middleware(settings.web.forwarded_for_hops)])
    if limits is None:
        limits = own = Limits(settings.limits)

        async def follow_limits(_: web.Application) -> AsyncIterator[None]:
            await own.start()
            yield
            await own.stop()

        webapp.cleanup_ctx.append(follow_limits)
    webapp[CLOCK_KEY] = clock = clock or SystemClock()
    webapp[RATE_KEY] = QueryRate(limits, clock)
    webapp[GATE_KEY] = FairSlots(settings.query.max_concurrent, settings.query.max_concurrent_per_app,
                                 settings.query.queue_timeout_s)
    webapp.on_response_prepare.append(security_headers)
    webapp[QUERY_KEY] = query
    webapp[SETTINGS_KEY] = settings
    webapp[COUNTERS_KEY] = counters
    if authorize is None:
        log.warning("no token verifier configured: metric queries will answer 401")
    webapp[AUTH_KEY] = authorize or _refuse_all
    webapp[OPENAPI_KEY] = orjson.dumps(document(settings))
    webapp.router.add_get("/v1/apps/{app}/metrics", get_metrics)
    webapp.router.add_get("/v1/apps/{app}/events", get_events)
    webapp.router.add_get("/v1/whoami", whoami)
    webapp.router.add_get(OPENAPI_PATH, get_openapi)
    webapp.router.add_get("/healthz", healthz)
    webapp.router.add_get("/dashboard", dashboard_redirect)
    webapp.router.add_get("/dashboard/", dashboard_file)
    webapp.router.add_get("/dashboard/vendor/{name}", vendor_file)
    webapp.router.add_get("/dashboard/{name}", dashboard_file)
    if extra is not None:
        extra(webapp)
    return webapp


def add_admin_routes(admin: web.Application, settings: Settings, counters: Counters) -> None:
    """The query roles' operator routes, for the admin port's app (app/ops/health.py :func:`add_admin_port`):
    ``/v1/stats`` and the migration page's files (``/migration`` itself: app/migration/view.py)."""
    admin.middlewares.append(json_not_found)
    admin.on_response_prepare.append(security_headers)
    admin[SETTINGS_KEY] = settings
    admin[COUNTERS_KEY] = counters
    admin.router.add_get("/v1/stats", get_stats)
    admin.router.add_get("/dashboard/vendor/{name}", vendor_file)
    admin.router.add_get("/dashboard/{name}", operator_file)


def token_authorizer(tokens: Any) -> Authorize:
    """An :data:`Authorize` backed by :class:`app.tokens.TokenStore` (cached verification)."""
    async def authorize(token: str) -> str | None:
        info = await tokens.verify(token, "read")
        return None if info is None else str(info.app)
    return authorize
