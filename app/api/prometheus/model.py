"""The metric model: one stored bucket (the native API's point) as Prometheus samples.

Every sample of a bucket is stamped with the bucket's start; a query reads it from there until the next bucket
(the lookback is one resolution, docs/prometheus.md#steps-and-buckets). Rates are per minute whatever the
resolution, so a panel reads the same unit at any step: a coarser bucket holds its mean per minute.
Reference: docs/prometheus.md#the-metric-model
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


def samples(point: Mapping[str, Any], resolution_s: int) -> Iterator[Sample]:
    """Every sample of one native point (app/api/query: ``Aggregate.summary()``)."""
    minutes = resolution_s / 60
    status = point.get("status")
    if status:
        for cls, n in status.items():
            yield "minutely_requests", {"status_class": cls}, n / minutes
    if "failed" in point:
        yield "minutely_failed_requests", {}, point["failed"] / minutes
    response = point.get("response_ms")
    if response:
        for quantile, key in QUANTILES:
            if response.get(key) is not None:
                yield "minutely_response_time_ms", {"quantile": quantile}, float(response[key])
        if response.get("mean") is not None:
            yield "minutely_response_time_mean_ms", {}, float(response["mean"])
    for code, n in (point.get("errors") or {}).items():
        yield "minutely_router_errors", {"code": code}, n / minutes
    memory = point.get("memory_mb") or {}
    for kind in ("rss", "swap", "total"):
        for stat in ("mean", "max"):
            v = memory.get(f"{kind}_{stat}")
            if v is not None:
                yield "minutely_memory_mb", {"kind": kind, "stat": stat}, float(v)
    if memory.get("quota") is not None:
        yield "minutely_memory_quota_mb", {}, float(memory["quota"])
    for stat, v in (point.get("load") or {}).items():
        if v is not None:
            yield "minutely_load", {"stat": stat}, float(v)
    for event, n in (point.get("platform") or {}).items():
        yield "minutely_platform_events", {"event": event}, n / minutes
    for source, gauges in (point.get("addons") or {}).items():
        for sample, g in gauges.items():
            for stat in ("mean", "max", "last"):
                if g.get(stat) is not None:
                    yield "minutely_addon", {"source": source, "sample": sample, "stat": stat}, float(g[stat])
    for name, m in (point.get("metrics") or {}).items():
        kind = m.get("type")
        labels = {"metric": name, "type": kind}
        if kind == "counter":
            yield "minutely_custom", {**labels, "stat": "per_minute"}, m["sum"] / minutes
        elif kind == "gauge":
            for stat in ("mean", "max", "last"):
                if m.get(stat) is not None:
                    yield "minutely_custom", {**labels, "stat": stat}, float(m[stat])
        elif kind == "timer":
            for stat in ("p50", "p95", "p99", "max", "min"):
                if m.get(stat) is not None:
                    yield "minutely_custom", {**labels, "stat": stat}, float(m[stat])
            yield "minutely_custom", {**labels, "stat": "count_per_minute"}, m["count"] / minutes
            yield "minutely_custom", {**labels, "stat": "sum_per_minute"}, m["sum"] / minutes
