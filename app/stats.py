"""Every counter the pipeline keeps, declared once with what to do when it moves.

Served at ``GET /v1/stats`` and, in Prometheus format, at ``GET /metrics`` (app/ops.py): counters unless
named in GAUGES or HISTOGRAMS below.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

CATALOGUE: Final[dict[str, str]] = {
    "observations_accepted": "Observations folded into a minute. Flat while producers send: check consumer lag "
                             "and the worker log.",
    "observations_late": "Observations for a minute already emitted (dead-lettered). Rising: producers buffer "
                         "too long or clocks lag; raise METRICS_GRACE_S if the delay is legitimate.",
    "observations_rejected": "Invalid observations or messages (dead-lettered with a reason). Rising: read "
                             "the reasons on the DLQ topic and fix the producer.",
    "observations_replayed": "Input skipped because its effects were already applied (after a restart or "
                             "rebalance). Non-zero only around restarts; steady growth means offsets do not commit.",
    "minutes_emitted": "Closed (app, process type, minute) records sent to metrics-1m.",
    "windows_open": "Minutes currently open on this worker. Growing without bound: windows are not closing "
                    "(check METRICS_IDLE_TIMEOUT_S and the event timestamps).",
    "table_records_written": "Window-table (changelog) records written; about one per touched window per batch.",
    "sink_items_written": "Minutes accepted by DynamoDB.",
    "sink_retries": "Sink batches retried after throttling/unavailability. Sustained: DynamoDB capacity or "
                    "network; the sink applies backpressure meanwhile.",
    "drain_frames": "Logplex frames delivered to Kafka. Flat while drains are configured: check drain tokens "
                    "(403s in the ingest log) and the drain URL.",
    "drain_frames_deduplicated": "Retried frames answered 2xx without producing (already delivered). Sustained "
                                 "growth: senders time out before we answer; check Kafka ack latency.",
    "drain_lines_ignored": "Drain lines that are neither router nor runtime-metrics lines (app output, events). "
                           "Informational.",
    "drain_lines_bad": "Router/runtime lines that did not parse (dead-lettered with the line). Rising: a log "
                       "format change upstream; read the DLQ reasons.",
    "ingest_observations_produced": "Observations acknowledged by Kafka from the HTTP endpoints.",
    "ingest_records_rejected": "JSON API records refused (reasons returned to the client). Rising: a producer "
                               "sends bad or foreign-app records.",
    "sink_dead_lettered": "Minutes DynamoDB rejected for good (sent to metrics-1m-dlq). Non-zero: read the "
                          "reason; usually permissions or table schema.",
    "sink_unprocessed_items": "Items DynamoDB returned as UnprocessedItems and re-sent with backoff. Rising: the "
                              "table throttles; raise its capacity/on-demand limits or lower "
                              "METRICS_SINK_CONCURRENCY.",
    "sink_batch_seconds": "Time for one sink batch to be accepted by DynamoDB, retries included. p99 rising: "
                          "DynamoDB is slow or throttling (see sink_retries, sink_unprocessed_items); "
                          "minutes reach the API later meanwhile.",
    "consumer_lag_observations": "Messages on this worker's observations partitions not yet processed. Growing: "
                                 "aggregation cannot keep up; add workers (up to METRICS_PARTITIONS) or check "
                                 "CPU throttling.",
    "consumer_lag_minutes": "Messages on this worker's metrics-1m partitions not yet written to DynamoDB. "
                            "Growing: the sink is backing off; see sink_retries and the DynamoDB table's metrics.",
}

GAUGES: Final[frozenset[str]] = frozenset({"windows_open", "consumer_lag_observations", "consumer_lag_minutes"})
"""Catalogue entries that are levels (set), not running totals (inc)."""

HISTOGRAMS: Final[dict[str, tuple[float, ...]]] = {
    "sink_batch_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
}
"""Catalogue entries recorded with ``observe(name, value)``, with their bucket upper bounds."""


class Histogram:
    """Bucket counts, sum and count of observed values (what Prometheus needs for quantiles)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1  # a bucket holds values <= its bound
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, count of values <= le)]``, ending with ``+Inf``."""
        out, total = [], 0
        for le, n in zip([*(repr(b) for b in self.bounds), "+Inf"], self.buckets):
            total += n
            out.append((le, float(total)))
        return out


class Counters:
    """Plain in-process counters (single event loop: no locking needed)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {name: 0 for name in CATALOGUE}
        """For a histogram, the number of observations (its full state is in ``histograms``)."""
        self.histograms: dict[str, Histogram] = {name: Histogram(b) for name, b in HISTOGRAMS.items()}

    def inc(self, name: str, n: int = 1) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/stats.py CATALOGUE")
        self.values[name] += n

    def set(self, name: str, value: int) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/stats.py CATALOGUE")
        self.values[name] = value

    def observe(self, name: str, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            raise KeyError(f"histogram {name!r} is not declared in app/stats.py HISTOGRAMS")
        h.observe(value)
        self.values[name] = h.count

    def snapshot(self) -> dict[str, int]:
        return dict(self.values)


counters = Counters()
