"""The metric model: one stored bucket (the native API's point) as Prometheus samples.

Every sample of a bucket is stamped with the bucket's start; a query reads it from there until the next bucket
(the lookback is one resolution, docs/prometheus.md#steps-and-buckets). Rates are per minute whatever the
resolution, so a panel reads the same unit at any step: a coarser bucket holds its mean per minute.
Reference: docs/prometheus.md#the-metric-model
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"), ("1", "max"))
"""``quantile`` label -> the point's ``response_ms`` field (1 is the max)."""


@dataclass(frozen=True, slots=True)
class MetricInfo:
    type: str
    """Prometheus's metadata type: gauge for every series (a per-minute rate is a gauge of the bucket)."""
    unit: str
    help: str


METRICS: dict[str, MetricInfo] = {
    "minutely_requests": MetricInfo("gauge", "requests per minute",
                                    "Requests per minute, by status class (1xx..5xx); a coarser point holds its "
                                    "bucket's mean per minute."),
    "minutely_failed_requests": MetricInfo("gauge", "requests per minute", "Requests with status >= 500 per "
                                                                            "minute."),
    "minutely_response_time_ms": MetricInfo("gauge", "ms", "Response time percentiles (quantile 0.5, 0.95, 0.99; "
                                                           "1 is the max) of the served requests, from the "
                                                           "bucket's merged t-digest."),
    "minutely_response_time_mean_ms": MetricInfo("gauge", "ms", "Mean response time of the served requests."),
    "minutely_router_errors": MetricInfo("gauge", "errors per minute", "Router errors per minute by H-code."),
    "minutely_memory_mb": MetricInfo("gauge", "MB", "Dyno memory (kind rss, swap or total; stat mean or max)."),
    "minutely_memory_quota_mb": MetricInfo("gauge", "MB", "The dynos' memory quota."),
    "minutely_load": MetricInfo("gauge", "load average", "Dyno load, 1 min average (stat mean or max)."),
    "minutely_platform_events": MetricInfo("gauge", "events per minute", "Platform events per minute (crash, "
                                                                         "restart, R14, release, ...)."),
    "minutely_addon": MetricInfo("gauge", "", "Add-on samples (process type app): source, sample, stat mean, max "
                                              "or last."),
    "minutely_custom": MetricInfo("gauge", "", "Custom metrics (l2met, OTLP, language agents): metric, type and "
                                               "stat (counters per_minute; gauges mean, max, last; timers p50, "
                                               "p95, p99, max, min, count_per_minute, sum_per_minute)."),
}

Sample = tuple[str, dict[str, str], float]
"""(metric name, labels without app and process_type, value)."""
Point = Mapping[str, Any]
Extract = Callable[[Point, float], Iterator[tuple[dict[str, str], float]]]
"""(native point, minutes per bucket) -> the metric's (labels, value) in that point."""


def _requests(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for cls, n in (p.get("status") or {}).items():
        yield {"status_class": cls}, n / minutes


def _failed(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    if "failed" in p:
        yield {}, p["failed"] / minutes


def _response(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    response = p.get("response_ms") or {}
    for quantile, key in QUANTILES:
        if response.get(key) is not None:
            yield {"quantile": quantile}, float(response[key])


def _response_mean(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    response = p.get("response_ms") or {}
    if response.get("mean") is not None:
        yield {}, float(response["mean"])


def _router_errors(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for code, n in (p.get("errors") or {}).items():
        yield {"code": code}, n / minutes


def _memory(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    memory = p.get("memory_mb") or {}
    for kind in ("rss", "swap", "total"):
        for stat in ("mean", "max"):
            v = memory.get(f"{kind}_{stat}")
            if v is not None:
                yield {"kind": kind, "stat": stat}, float(v)


def _memory_quota(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    quota = (p.get("memory_mb") or {}).get("quota")
    if quota is not None:
        yield {}, float(quota)


def _load(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for stat, v in (p.get("load") or {}).items():
        if v is not None:
            yield {"stat": stat}, float(v)


def _platform(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for event, n in (p.get("platform") or {}).items():
        yield {"event": event}, n / minutes


def _addons(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for source, gauges in (p.get("addons") or {}).items():
        for sample, g in gauges.items():
            for stat in ("mean", "max", "last"):
                if g.get(stat) is not None:
                    yield {"source": source, "sample": sample, "stat": stat}, float(g[stat])


def _custom(p: Point, minutes: float) -> Iterator[tuple[dict[str, str], float]]:
    for name, m in (p.get("metrics") or {}).items():
        kind = m.get("type")
        if kind == "counter":
            yield {"metric": name, "type": kind, "stat": "per_minute"}, m["sum"] / minutes
        elif kind == "gauge":
            for stat in ("mean", "max", "last"):
                if m.get(stat) is not None:
                    yield {"metric": name, "type": kind, "stat": stat}, float(m[stat])
        elif kind == "timer":
            for stat in ("p50", "p95", "p99", "max", "min"):
                if m.get(stat) is not None:
                    yield {"metric": name, "type": kind, "stat": stat}, float(m[stat])
            yield {"metric": name, "type": kind, "stat": "count_per_minute"}, m["count"] / minutes
            yield {"metric": name, "type": kind, "stat": "sum_per_minute"}, m["sum"] / minutes


EXTRACT: dict[str, Extract] = {
    "minutely_requests": _requests, "minutely_failed_requests": _failed, "minutely_response_time_ms": _response,
    "minutely_response_time_mean_ms": _response_mean, "minutely_router_errors": _router_errors,
    "minutely_memory_mb": _memory, "minutely_memory_quota_mb": _memory_quota, "minutely_load": _load,
    "minutely_platform_events": _platform, "minutely_addon": _addons, "minutely_custom": _custom,
}
assert EXTRACT.keys() == METRICS.keys()
LABELS: dict[str, tuple[str, ...]] = {
    "minutely_requests": ("status_class",), "minutely_failed_requests": (), "minutely_response_time_ms": ("quantile",),
    "minutely_response_time_mean_ms": (), "minutely_router_errors": ("code",), "minutely_memory_mb": ("kind", "stat"),
    "minutely_memory_quota_mb": (), "minutely_load": ("stat",), "minutely_platform_events": ("event",),
    "minutely_addon": ("source", "sample", "stat"), "minutely_custom": ("metric", "type", "stat"),
}
"""Each metric's own labels (every series also has ``app`` and ``process_type``): what /api/v1/labels lists."""
assert LABELS.keys() == METRICS.keys()


def samples(point: Point, resolution_s: int, names: Iterable[str] = METRICS) -> Iterator[Sample]:
    """The samples of one native point (app/api/query: ``Aggregate.summary()``) of the metrics ``names``."""
    minutes = resolution_s / 60
    for name in names:
        for labels, v in EXTRACT[name](point, minutes):
            yield name, labels, v
