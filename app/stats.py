"""Every counter the pipeline keeps, declared once with what to do when it moves.

Served at ``GET /v1/stats``; the Prometheus endpoint (a later issue) exports the same catalogue.
"""

from __future__ import annotations

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
    "sink_dead_lettered": "Minutes DynamoDB rejected for good (sent to metrics-1m-dlq). Non-zero: read the "
                          "reason; usually permissions or table schema.",
}


class Counters:
    """Plain in-process counters (single event loop: no locking needed)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {name: 0 for name in CATALOGUE}

    def inc(self, name: str, n: int = 1) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/stats.py CATALOGUE")
        self.values[name] += n

    def set(self, name: str, value: int) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/stats.py CATALOGUE")
        self.values[name] = value

    def snapshot(self) -> dict[str, int]:
        return dict(self.values)


counters = Counters()
