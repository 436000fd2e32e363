"""Operational endpoints for every role, on the operator's own port (``METRICS_ADMIN_HOST``, ``_PORT``).

``/readyz`` (each failing check with what to do), ``/metrics`` (Prometheus, from the one counter catalogue in
app/ops/stats.py) and ``/healthz``; the tenant port keeps only ``/healthz`` and a bare ``/readyz``, because a
NetworkPolicy cannot filter by path.
Reference: docs/operations/deploy.md, docs/api.md#tenant-isolation
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from app.errors import ConfigError, PipelineError, RetriableError
from app.ops.kafka import bootstrap_servers
from app.ops.logs import redact
from app.ops.stats import CATALOGUE, GAUGES, HISTOGRAMS, PER_APP, Counters
from app.settings import PREFIX, OpsSettings

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]
"""A readiness check: returns when the dependency is usable, raises (ideally a PipelineError whose text
says what to do) when it is not."""

METRIC_PREFIX = "minutely_"
CHECK_TIMEOUT_S = 2.0
"""Per check. Below the chart's readiness probe timeout (3 s), so the probe gets an answer naming the
slow dependency instead of timing out itself."""
CHECK_CACHE_S = 1.0
"""Probes and people hitting /readyz at once share one run of the checks (each may call DynamoDB)."""

READINESS_KEY: web.AppKey[Readiness] = web.AppKey("readiness")

_REGISTERED: dict[str, Check] = {}


def register_check(name: str, check: Check) -> None:
    """A readiness check from a part the composition root does not list: a stream job that stopped on an
    error only an operator can fix (agents/sink.py). Jobs register when bound, before the web app is built;
    :func:`add_ops_routes` adds every registered check to the role's own."""
    _REGISTERED[name] = check


ADMIN_KEY: web.AppKey[AdminPort] = web.AppKey("admin_port")


# --- readiness ------------------------------------------------------------------------------------------


class Readiness:
    """Runs named checks concurrently with a timeout each; remembers the last result for ``cache_s``.

    Transitions (ready -> not ready and back) are logged once, with the reasons, rather than on every probe.
    """

    def __init__(self, checks: Mapping[str, Check], *, timeout_s: float = CHECK_TIMEOUT_S,
                 cache_s: float = CHECK_CACHE_S, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.checks = dict(checks)
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._monotonic = monotonic
        self._last: tuple[float, dict[str, str]] | None = None
        self._running: asyncio.Task[dict[str, str]] | None = None
        self._was_ready: bool | None = None

    async def run(self) -> dict[str, str]:
        """``{check name: "ok" or the reason it failed}``."""
        now = self._monotonic()
        if self._last is not None and now - self._last[0] < self.cache_s:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.create_task(self._run_all())
        task = self._running
        try:
            # shield: one caller disconnecting must not cancel the run others are waiting for
            results = await asyncio.shield(task)
        finally:
            if task.done() and self._running is task:
                self._running = None
        self._last = (self._monotonic(), results)
        return results

    async def _run_all(self) -> dict[str, str]:
        names = list(self.checks)
        outcomes = await asyncio.gather(*(self._one(n) for n in names))
        results = dict(zip(names, outcomes, strict=True))
        ready = all(v == "ok" for v in results.values())
        if ready != self._was_ready:
            if ready:
                log.info("ready: %s", ", ".join(names) or "no checks")
            else:
                log.warning("not ready: %s", "; ".join(f"{k}: {v}" for k, v in results.items() if v != "ok"))
            self._was_ready = ready
        return results

    async def _one(self, name: str) -> str:
        try:
            await asyncio.wait_for(self.checks[name](), timeout=self.timeout_s)
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s -- check the dependency and the network path to it"
        except Exception as exc:  # noqa: BLE001  the reason goes to the operator; nothing may escape into a 500
            # PipelineErrors already say what to do; anything else is named by its type
            return redact(str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}")
        return "ok"


async def readyz(request: web.Request) -> web.Response:
    results = await request.app[READINESS_KEY].run()
    ready = all(v == "ok" for v in results.values())
    body = {"status": "ready" if ready else "not_ready", "checks": results}
    return web.Response(body=orjson.dumps(body), status=200 if ready else 503, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def bare_readyz(request: web.Request) -> web.Response:
    """The tenant port's readiness: the same checks, answered with the status alone (the reasons name tables,
    endpoints and errors: the operator's, on the admin port)."""
    results = await request.app[READINESS_KEY].run()
    ready = all(v == "ok" for v in results.values())
    return web.Response(body=orjson.dumps({"status": "ready" if ready else "not_ready"}),
                        status=200 if ready else 503, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def flag_check(is_set: Callable[[], bool], *, message: str, action: str) -> Check:
    """A readiness check from an in-process condition (e.g. Faust's table recovery having finished)."""

    async def check() -> None:
        if not is_set():
            raise RetriableError(message, action=action)

    return check


def broker_check(broker_url: str, *, connect_timeout_s: float = 1.5) -> Check:
    """Ready when at least one bootstrap server accepts a TCP connection (the client finds the rest)."""
    servers = bootstrap_servers(broker_url)

    async def check() -> None:
        if not servers:
            raise RetriableError(f"no Kafka bootstrap server in the broker URL {redact(broker_url)!r}",
                                 action=f"set {PREFIX}BROKER_URL, e.g. kafka://kafka-0.kafka:9092")
        reasons: list[str] = []
        for server in servers:
            host, _, port = server.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)),
                                                   timeout=connect_timeout_s)
            except (TimeoutError, OSError) as exc:
                reasons.append(f"{server}: {type(exc).__name__} {exc}".rstrip())
                continue
            writer.close()
            return
        raise RetriableError(f"no Kafka bootstrap server reachable ({'; '.join(reasons)})",
                             action=f"check {PREFIX}BROKER_URL, that the brokers run, and that egress to them is "
                                    "allowed (NetworkPolicy, security groups)")

    return check


# --- Prometheus -----------------------------------------------------------------------------------------


class CatalogueCollector(Collector):
    """Exports every entry of ``app/ops/stats.py`` CATALOGUE, with its help text, from the live Counters.

    ``refresh`` runs before each scrape to update values that are cheaper to read on demand (consumer lag).
    """

    def __init__(self, counters: Counters, *, refresh: Callable[[], None] | None = None) -> None:
        self.counters = counters
        self.refresh = refresh

    def collect(self) -> Iterable[Metric]:
        if self.refresh is not None:
            try:
                self.refresh()
            except Exception:  # a scrape must still answer; stale gauges beat no metrics at all
                log.exception("refreshing metrics before a scrape failed; gauges may be stale")
        values = self.counters.snapshot()
        for name, help_text in CATALOGUE.items():
            full = METRIC_PREFIX + name
            if name in HISTOGRAMS:
                h = self.counters.histograms[name]
                yield HistogramMetricFamily(full, help_text, buckets=h.cumulative(), sum_value=h.sum)
            elif name in GAUGES:
                yield GaugeMetricFamily(full, help_text, value=values[name])
            elif name in PER_APP:  # one series per app: which tenant a limit hit (sum by() for the total)
                family = CounterMetricFamily(full, help_text, labels=["app"])
                for app, n in sorted(self.counters.by_app[name].items()):
                    family.add_metric([app], n)
                yield family
            else:
                yield CounterMetricFamily(full, help_text, value=values[name])


def make_registry(counters: Counters, *, refresh: Callable[[], None] | None = None) -> CollectorRegistry:
    """A registry per web app (not prometheus_client's global one): tests and several roles in one process
    never collide on registration."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogueCollector(counters, refresh=refresh))
    ProcessCollector(namespace="minutely", registry=registry)  # RSS, CPU, open fds of this process
    return registry


def add_ops_routes(webapp: web.Application, *, counters: Counters, checks: Mapping[str, Check],
                   refresh: Callable[[], None] | None = None, check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Add ``GET /readyz`` (the given checks, with reasons), ``GET /metrics`` (the catalogue) and ``/healthz``
    to an operator's app: the admin port's (:func:`add_admin_port`), or that of a process no tenant reaches
    (the migration's writer). Never to a tenant's port."""
    webapp[READINESS_KEY] = Readiness({**_REGISTERED, **checks}, timeout_s=check_timeout_s)
    webapp.router.add_get("/readyz", readyz)
    webapp.router.add_get("/metrics", make_aiohttp_handler(make_registry(counters, refresh=refresh)))
    if not any(r.canonical == "/healthz" for r in webapp.router.resources()):
        webapp.router.add_get("/healthz", healthz)


class AdminPort:
    """The operator's app of one process, listening on its own host and port while the tenant app runs (it
    is started and stopped by the tenant app's ``cleanup_ctx``, so every way of running that app runs both)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self.url = ""
        """``http://host:port`` once listening (the port the OS chose when ``port`` is 0)."""

    async def serve(self, _tenant: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {self.host}:{self.port} for the operator's endpoints: {exc}",
                              action=f"free that port (another process of this machine?), or set {PREFIX}ADMIN_PORT "
                                     f"(0: any free port) and {PREFIX}ADMIN_HOST") from exc
        host, port = runner.addresses[0][:2]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        log.info("operator endpoints (/readyz, /metrics, ...) on %s", self.url)
        try:
            yield
        finally:
            await runner.cleanup()


def add_admin_port(tenant: web.Application, ops: OpsSettings, *, counters: Counters, checks: Mapping[str, Check],
                   refresh: Callable[[], None] | None = None, check_timeout_s: float = CHECK_TIMEOUT_S,
                   routes: Callable[[web.Application], None] | None = None) -> AdminPort:
    """The role's operator endpoints (:func:`add_ops_routes`, plus ``routes``) on ``ops.admin_host`` /
    ``admin_port``, served for as long as ``tenant`` is; ``tenant`` gets the bare ``/readyz`` (same checks,
    no details). ``tenant[ADMIN_KEY].url`` says where it listens."""
    admin = web.Application()
    add_ops_routes(admin, counters=counters, checks=checks, refresh=refresh, check_timeout_s=check_timeout_s)
    if routes is not None:
        routes(admin)
    tenant[READINESS_KEY] = admin[READINESS_KEY]  # one run of the checks answers both ports
    tenant.router.add_get("/readyz", bare_readyz)
    port = AdminPort(admin, ops.admin_host, ops.admin_port)
    tenant[ADMIN_KEY] = port
    tenant.cleanup_ctx.append(port.serve)
    return port


def consumer_lag(monitor: Any, assigned: Iterable[Any], topic: str) -> int:
    """Messages of ``topic`` in this worker's assigned partitions not yet committed as processed.

    From Faust's monitor (``app.monitor``): end offsets are the high-water marks seen on the last fetch,
    committed offsets are the next offsets to process. Before the first commit of a partition the last
    read offset stands in. Partitions never fetched from count 0.
    """
    ends: Mapping[Any, int] = monitor.tp_end_offsets
    committed: Mapping[Any, int] = monitor.tp_committed_offsets
    read: Mapping[Any, int] = monitor.tp_read_offsets
    lag = 0
    for tp in assigned:
        if tp.topic != topic or tp not in ends:
            continue
        position = committed.get(tp)
        if position is None:
            last_read = read.get(tp)
            if last_read is None:
                continue
            position = last_read + 1
        lag += max(0, ends[tp] - position)
    return lag


def lag_refresher(faust_app: Any, counters: Counters, *, observations_topic: str,
                  metrics_topic: str) -> Callable[[], None]:
    """Sets the consumer-lag gauges from a Faust app at scrape time (see ``consumer_lag``)."""

    def refresh() -> None:
        assigned = list(faust_app.assignor.assigned_actives())
        counters.set("consumer_lag_observations", consumer_lag(faust_app.monitor, assigned, observations_topic))
        counters.set("consumer_lag_minutes", consumer_lag(faust_app.monitor, assigned, metrics_topic))

    return refresh
