"""The Prometheus HTTP API over the stored minutes: the endpoints Grafana's Prometheus data source calls.

Each request's app is its read token's (Bearer, as Grafana sends it): every series carries ``app``, so a
selector naming another app matches nothing. The points come from the native query engine (its caches, its
migration routing), one answer per process type the app had (app/storage/catalog.py), and become samples
(model.py) that the evaluator (engine.py) reads. Errors use Prometheus's envelope and types, never a 500.
Reference: docs/prometheus.md
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import promql_parser as pq
from aiohttp import web
from multidict import MultiDict, MultiDictProxy, MultiMapping

from app.api.prometheus import model
from app.api.prometheus.engine import (
    NAME,
    Evaluator,
    Labels,
    QueryError,
    Scalar,
    Selector,
    Series,
    String,
    Value,
    bad_data,
    format_value,
    parse,
    selector_of,
    selectors,
)
from app.api.query import Answer, ByteLRU, QueryEngine, auto_resolution
from app.api.web import CLOCK_KEY, COUNTERS_KEY, QUERY_KEY, SETTINGS_KEY, json_response, query_slot, token_app
from app.clock import Clock
from tables.aggregate import RESOLUTIONS

PREFIX = "/api/v1"
MAX_STEPS = 11000
"""Prometheus's own bound on the points of one series in a range query."""
BUILD_INFO = {"version": "2.42.0", "revision": "minutely", "branch": "minutely", "buildUser": "minutely",
              "buildDate": "", "goVersion": "", "application": "minutely"}
"""The Prometheus version whose API this follows: Grafana reads it to pick the features it may use."""
ERROR_TYPES = {400: "bad_data", 401: "unauthorized", 404: "not_found", 405: "bad_data", 422: "execution",
               429: "unavailable", 503: "unavailable"}
STATUS_OF = {"bad_data": 400, "execution": 422, "timeout": 503, "not_found": 404}
OFFLOAD_WORK = 20000
"""Steps times series above which the evaluation runs in a worker thread, so the event loop keeps serving."""
BODIES_KEY: web.AppKey[ByteLRU[tuple[Any, ...], bytes]] = web.AppKey("prometheus_bodies")
COLUMNS_KEY: web.AppKey[ByteLRU[tuple[str, str], Series]] = web.AppKey("prometheus_columns")
BODY_CACHE_TTL_MS = 600_000
"""A rendered answer is keyed by the native answers' ETags it was computed from: it is right as long as
they are; the TTL only bounds what idle entries cost."""


def reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in Prometheus's envelope (``errorType`` from the status; ``timeout`` for a query timeout)."""
    kind = "timeout" if code == "timeout" else ERROR_TYPES.get(status, "bad_data")
    return json_response({"status": "error", "errorType": kind, "error": message}, status, headers)


def query_error(exc: QueryError) -> web.Response:
    return reply(STATUS_OF.get(exc.kind, 422), exc.kind, str(exc))


def success(data: Any, warnings: list[str] | None = None) -> bytes:
    doc: dict[str, Any] = {"status": "success", "data": data}
    if warnings:
        doc["warnings"] = warnings
    return orjson.dumps(doc)


def _ok(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json",
                        headers={"Cache-Control": "private, no-cache", "Vary": "Authorization"})


async def params_of(request: web.Request) -> MultiMapping[str]:
    """The URL's parameters, and for a POST its form body's (Grafana POSTs by default)."""
    if request.method != "POST":
        return request.query
    merged: MultiDict[str] = MultiDict(request.query)
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        merged.extend((k, v) for k, v in form.items() if isinstance(v, str))
    return MultiDictProxy(merged)


def parse_time(raw: str, name: str) -> float:
    """Epoch seconds (a float) or RFC 3339, as Prometheus accepts them."""
    try:
        t = float(raw)
        if math.isfinite(t) and abs(t) < 1e11:
            return t
    except ValueError:
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise bad_data(f'invalid parameter "{name}": cannot parse "{raw[:64]}" to a valid timestamp')


def parse_step(raw: str) -> float:
    """Seconds (a float) or a PromQL duration (``1m``)."""
    try:
        step = float(raw)
    except ValueError:
        try:
            step = pq.parse_duration(raw).total_seconds()
        except (ValueError, RuntimeError):
            raise bad_data(f'invalid parameter "step": cannot parse "{raw[:64]}" to a valid duration') from None
    if not math.isfinite(step) or step <= 0:
        raise bad_data("zero or negative query resolution step widths are not accepted. Try a positive integer")
    return step


def resolution_of(step_s: float) -> int:
    """The coarsest stored resolution no coarser than the step (1 min for an instant query): each step then
    reads the bucket that holds it, as Prometheus reads the newest sample within its lookback."""
    return max((r for r in RESOLUTIONS if r <= step_s), default=RESOLUTIONS[0])


# --- reading the samples ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Read:
    """What a request reads: the app, the resolution, and the bucket starts ``[since_s, until_s)``."""

    app: str
    resolution_s: int
    since_s: int
    until_s: int


def _names(sel: Selector) -> list[str]:
    if sel.name is not None:
        return [sel.name] if sel.name in model.METRICS else []
    return [n for n in model.METRICS if sel.matches({NAME: n}, only=(NAME,))]


def _columns(answer: Answer, app: str, proc: str, name: str, res: int) -> Series:
    """One metric's series in one native answer: labels -> (bucket starts, values)."""
    points = orjson.loads(answer.body)["points"]
    minutes = res / 60
    extract = model.EXTRACT[name]
    out: Series = {}
    for p in points:
        ts = float(p["ts"])
        for labels, v in extract(p, minutes):
            key = tuple(sorted({NAME: name, "app": app, "process_type": proc, **labels}.items()))
            col = out.get(key)
            if col is None:
                out[key] = col = ([], [])
            col[0].append(ts)
            col[1].append(v)
    return out


class Fetcher:
    """Fetches what selectors read, through the native engine, and caches the decoded series per answer."""

    def __init__(self, engine: QueryEngine, columns: ByteLRU[tuple[str, str], Series], clock: Clock) -> None:
        self.engine = engine
        self.columns = columns
        self.clock = clock

    async def fetch(self, read: Read, sels: Iterable[Selector]) -> tuple[dict[Selector, Series], tuple[str, ...]]:
        """Every selector's series, and the ETags of the answers they came from (the rendered answer's key)."""
        sels = list(dict.fromkeys(sels))
        app = read.app
        procs = await self.engine.process_types(app, read.since_s, read.until_s)
        wanted: dict[str, set[str]] = {}
        for sel in sels:
            names = _names(sel)
            for proc in procs:
                if names and sel.matches({"app": app, "process_type": proc}, only=("app", "process_type")):
                    wanted.setdefault(proc, set()).update(names)
        order = sorted(wanted)
        answers = await asyncio.gather(*(self.engine.answer(app, proc, read.resolution_s, read.since_s,
                                                            read.until_s) for proc in order))
        now_ms = self.clock.now_ms()
        by_name: dict[str, Series] = {}
        for proc, ans in zip(order, answers, strict=True):
            for name in sorted(wanted[proc]):
                key = (ans.etag, f"{app}|{proc}|{read.resolution_s}|{name}")
                cols = self.columns.get(key, now_ms)
                if cols is None:
                    cols = _columns(ans, app, proc, name, read.resolution_s)
                    size = 200 + sum(120 + 16 * len(ts) for ts, _ in cols.values())
                    self.columns.put(key, cols, size, now_ms + BODY_CACHE_TTL_MS)
                by_name.setdefault(name, {}).update(cols)
        fetched: dict[Selector, Series] = {}
        for sel in sels:
            got: Series = {}
            for name in _names(sel):
                for labels, col in by_name.get(name, {}).items():
                    if sel.matches(dict(labels)):
                        got[labels] = col
            fetched[sel] = got
        return fetched, tuple(a.etag for a in answers)


def span_of(sels: Iterable[Selector], lookback_s: float) -> tuple[float, float]:
    """How far before and after a step the selectors read: (back, ahead) in seconds (a negative offset
    reads ahead)."""
    back, ahead = lookback_s, 0.0
    for sel in sels:
        back = max(back, (sel.range_s or lookback_s) + sel.offset_s)
        ahead = max(ahead, -sel.offset_s)
    return back, ahead


# --- rendering -------------------------------------------------------------------------------------------

def _ts(t: float) -> float | int:
    return int(t) if float(t).is_integer() else round(t, 3)


def _metric(labels: Labels) -> dict[str, str]:
    return dict(labels)


def instant_data(v: Value, t: float) -> dict[str, Any]:
    if isinstance(v, Scalar):
        return {"resultType": "scalar", "result": [_ts(t), format_value(v.value)]}
    if isinstance(v, String):
        return {"resultType": "string", "result": [_ts(t), v.value]}
    return {"resultType": "vector",
            "result": [{"metric": _metric(k), "value": [_ts(t), format_value(x)]} for k, x in sorted(v.items())]}


def matrix_data(rows: Mapping[Labels, list[tuple[float, float]]]) -> dict[str, Any]:
    return {"resultType": "matrix",
            "result": [{"metric": _metric(k), "values": [[_ts(t), format_value(x)] for t, x in rows[k]]}
                       for k in sorted(rows)]}


def evaluate_range(expr: Any, fetched: dict[Selector, Series], lookback_s: float, start: float, end: float,
                   step: float) -> dict[str, Any]:
    ev = Evaluator(fetched, lookback_s=lookback_s)
    rows: dict[Labels, list[tuple[float, float]]] = {}
    n = int((end - start) // step) + 1
    for i in range(n):
        t = start + i * step
        v = ev.eval(expr, t)
        if isinstance(v, String):
            raise bad_data('invalid expression type "string" for range query, must be Scalar or instant Vector')
        if isinstance(v, Scalar):
            rows.setdefault((), []).append((t, v.value))
            continue
        for k, x in v.items():
            rows.setdefault(k, []).append((t, x))
    return matrix_data(rows)


def evaluate_instant(expr: Any, fetched: dict[Selector, Series], lookback_s: float, t: float) -> dict[str, Any]:
    if type(expr) is pq.MatrixSelector:  # a bare range selector: its raw samples
        sel = selector_of(expr.vector_selector, expr.range.total_seconds())
        at = t - sel.offset_s
        rows = {}
        for labels, (ts, vs) in fetched.get(sel, {}).items():
            picked = [(a, b) for a, b in zip(ts, vs, strict=True) if at - sel.range_s < a <= at]
            if picked:
                rows[labels] = picked
        return matrix_data(rows)
    return instant_data(Evaluator(fetched, lookback_s=lookback_s).eval(expr, t), t)


# --- the handlers ----------------------------------------------------------------------------------------

Handler = Callable[[web.Request, str, MultiMapping[str]], Awaitable[web.Response]]


def endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Token, parameters, and errors in Prometheus's shape around ``handler(request, app, params)``."""
    async def wrapped(request: web.Request) -> web.Response:
        granted = await token_app(request, reply)
        if isinstance(granted, web.Response):
            return granted
        request.app[COUNTERS_KEY].inc_app("prometheus_queries", granted)
        try:
            params = await params_of(request)
            return await handler(request, granted, params)
        except QueryError as exc:
            request.app[COUNTERS_KEY].inc_app("prometheus_queries_refused", granted)
            return query_error(exc)
    return wrapped


def _fetcher(request: web.Request) -> Fetcher:
    return Fetcher(request.app[QUERY_KEY], request.app[COLUMNS_KEY], request.app[CLOCK_KEY])


def _check_points(request: web.Request, read: Read) -> None:
    points = (read.until_s - read.since_s) // read.resolution_s
    limit = request.app[SETTINGS_KEY].query.max_points
    if points > limit:
        raise bad_data(f"the query reads {points} points per series at {read.resolution_s} s resolution; at most "
                       f"{limit} (METRICS_MAX_QUERY_POINTS): use a larger step or a shorter range")


def _read(app: str, res: int, lo_s: float, hi_s: float) -> Read:
    """The buckets holding samples stamped in ``(lo_s, hi_s]``."""
    since = math.floor(lo_s) // res * res
    return Read(app, res, since, math.floor(hi_s) // res * res + res)


async def _evaluate(request: web.Request, app: str, key: tuple[Any, ...], read: Read, sels: list[Selector],
                    work: Callable[[dict[Selector, Series]], dict[str, Any]], size: int) -> web.Response:
    """Fetch, evaluate and render within the app's query slot and the query timeout; a rendered answer is
    reused while the native answers it came from are unchanged."""
    bodies = request.app[BODIES_KEY]

    async def run() -> bytes:
        fetched, etags = await _fetcher(request).fetch(read, sels)
        now_ms = request.app[CLOCK_KEY].now_ms()
        full = (*key, etags)
        hit = bodies.get(full, now_ms)
        if hit is not None:
            request.app[COUNTERS_KEY].inc("prometheus_cache_hits")
            return hit
        series = sum(len(s) for s in fetched.values())
        if size * max(series, 1) > OFFLOAD_WORK:
            body = await asyncio.to_thread(lambda: success(work(fetched)))
        else:
            body = success(work(fetched))
        bodies.put(full, body, len(body) + 200, now_ms + BODY_CACHE_TTL_MS)
        return body

    result = await query_slot(request, app, run, reply)
    if isinstance(result, web.Response):
        return result
    return _ok(result)


def _required(params: MultiMapping[str], name: str) -> str:
    raw = params.get(name)
    if raw is None or raw == "":
        raise bad_data(f'invalid parameter "{name}": parameter is missing')
    return raw


async def query(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    expr = parse(_required(params, "query"))
    t = parse_time(params["time"], "time") if params.get("time") else request.app[CLOCK_KEY].now_ms() / 1000
    sels = selectors(expr)
    res = resolution_of(0)
    back, ahead = span_of(sels, res)
    read = _read(app, res, t - back, t + ahead)
    _check_points(request, read)
    return await _evaluate(request, app, ("query", app, str(expr), t), read, sels,
                           lambda fetched: evaluate_instant(expr, fetched, res, t), 1)


async def query_range(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    expr = parse(_required(params, "query"))
    start = parse_time(_required(params, "start"), "start")
    end = parse_time(_required(params, "end"), "end")
    step = parse_step(_required(params, "step"))
    if end < start:
        raise bad_data("end timestamp must not be before start time")
    steps = int((end - start) // step) + 1
    if steps > MAX_STEPS:
        raise bad_data("exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query "
                       "resolution (?step=XX)")
    if type(expr) is pq.MatrixSelector:
        raise bad_data('invalid expression type "range vector" for range query, must be Scalar or instant Vector')
    sels = selectors(expr)
    res = resolution_of(step)
    back, ahead = span_of(sels, res)
    read = _read(app, res, start - back, end + ahead)
    _check_points(request, read)
    return await _evaluate(request, app, ("range", app, str(expr), start, end, step), read, sels,
                           lambda fetched: evaluate_range(expr, fetched, res, start, end, step), steps)


def _matchers(params: MultiMapping[str], *, required: bool) -> list[Selector]:
    raw = params.getall("match[]", [])
    if not raw:
        if required:
            raise bad_data("no match[] parameter provided")
        return [Selector(None, (), 0.0, 0.0)]
    out = []
    for text in raw:
        node = parse(text)
        if type(node) is not pq.VectorSelector:
            raise bad_data(f'invalid parameter "match[]": {text[:80]!r} is not a series selector')
        out.append(selector_of(node))
    return out


async def _series_in(request: web.Request, app: str, params: MultiMapping[str], *,
                     required: bool) -> list[Labels] | web.Response:
    """The series the ``match[]`` selectors name with a sample in ``[start, end]`` (default: the
    retention), read at the resolution the native API picks for that span."""
    sels = _matchers(params, required=required)
    now = request.app[CLOCK_KEY].now_ms() / 1000
    retention_s = request.app[SETTINGS_KEY].storage.ttl_s
    end = parse_time(params["end"], "end") if params.get("end") else now
    start = parse_time(params["start"], "start") if params.get("start") else max(end - retention_s, 0)
    if end < start:
        raise bad_data("end timestamp must not be before start time")
    start = max(start, end - retention_s)
    res = auto_resolution(int(end - start) + 1)
    read = _read(app, res, start - res, end)

    async def run() -> list[Labels]:
        fetched, _ = await _fetcher(request).fetch(read, sels)
        found: set[Labels] = set()
        for series in fetched.values():
            for labels, (ts, _vs) in series.items():
                if any(start - res < x <= end for x in ts):
                    found.add(labels)
        return sorted(found)

    return await query_slot(request, app, run, reply)


async def series(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    found = await _series_in(request, app, params, required=True)
    return found if isinstance(found, web.Response) else _ok(success([dict(labels) for labels in found]))


async def labels(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    found = await _series_in(request, app, params, required=False)
    return found if isinstance(found, web.Response) else _ok(success(sorted({k for ls in found for k, _ in ls})))


async def label_values(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    name = request.match_info["name"]
    found = await _series_in(request, app, params, required=False)
    if isinstance(found, web.Response):
        return found
    return _ok(success(sorted({v for ls in found for k, v in ls if k == name})))


async def metadata(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    metric = params.get("metric")
    limit = int(params["limit"]) if params.get("limit", "").lstrip("-").isdigit() else -1
    out: dict[str, list[dict[str, str]]] = {}
    for name, info in model.METRICS.items():
        if metric and name != metric:
            continue
        if 0 <= limit <= len(out):
            break
        out[name] = [{"type": info.type, "help": info.help, "unit": info.unit}]
    return _ok(success(out))


async def buildinfo(request: web.Request) -> web.Response:
    return web.Response(body=success(BUILD_INFO), content_type="application/json",
                        headers={"Cache-Control": "public, max-age=300"})


async def exemplars(request: web.Request, app: str, params: MultiMapping[str]) -> web.Response:
    """Minutes keep no exemplars: a valid query has none."""
    parse(_required(params, "query"))
    return _ok(success([]))


ROUTES: dict[str, Handler] = {
    "/query": query, "/query_range": query_range, "/series": series, "/labels": labels,
    "/label/{name}/values": label_values, "/metadata": metadata, "/query_exemplars": exemplars,
}


async def unknown(request: web.Request) -> web.Response:
    return reply(404, "not_found", f"{request.method} {request.path} is not part of minutely's Prometheus API "
                 "(docs/prometheus.md lists the endpoints)")


def add_prometheus_routes(webapp: web.Application) -> None:
    """The Prometheus API on a read API app (app/api/web.py :func:`make_web_app`)."""
    eighth = webapp[SETTINGS_KEY].query.cache_max_bytes // 8
    webapp[BODIES_KEY] = ByteLRU(eighth)
    webapp[COLUMNS_KEY] = ByteLRU(eighth)
    for path, handler in ROUTES.items():
        wrapped = endpoint(handler)
        webapp.router.add_get(PREFIX + path, wrapped, allow_head=False)
        webapp.router.add_post(PREFIX + path, wrapped)
    webapp.router.add_get(PREFIX + "/status/buildinfo", buildinfo)
    webapp.router.add_route("*", PREFIX + "/{tail:.*}", unknown)
