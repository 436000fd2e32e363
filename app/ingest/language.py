"""Heroku language-metrics reports (``POST /v1/language-metrics/<dyno>``) -> custom metric observations.

Heroku's language agents (heroku/x hmetrics for Go, barnes for Ruby, heroku-nodejs-plugin, the JVM agent) POST
``{"counters": {name: n}, "gauges": {name: v}}`` to ``HEROKU_METRICS_URL`` every 5 to 20 s, per dyno: counters are
what happened since the agent's previous report (deltas), gauges the value now. Each becomes a custom counter or
gauge at the report's ``Measurements-Time`` (the optional header of Heroku's agentmon contract), else at the time
it arrived; the dashboard charts them per language. Pure: app/ingest/server.py does the HTTP.
Reference: docs/otlp.md#heroku-language-metrics
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from app import models

MAX_MEASUREMENTS_AGE_MS = 4 * 60_000
"""An older ``Measurements-Time`` is refused as stale, as Heroku's own receiver (agentmon) does."""
MAX_NAMES = 200
"""Names one report may carry: the agents send 5 (Go) to ~30 (JVM)."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}\Z")


class ReportError(ValueError):
    """A report that cannot be read at all (400)."""


@dataclass(slots=True)
class Report:
    observations: list[models.Metric] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


def measured_at(header: str | None, now_ms: int, max_future_ms: int = 60_000) -> int | str:
    """The report's time in epoch ms: its ``Measurements-Time`` (RFC 3339) if sent, else ``now_ms``; a str
    says why the header cannot be used."""
    if header is None:
        return now_ms
    try:
        when = datetime.fromisoformat(header.strip().replace("Z", "+00:00"))
    except ValueError:
        return f"Measurements-Time {header[:40]!r} is not an RFC 3339 time"
    if when.tzinfo is None:
        return "Measurements-Time needs a time zone (Z or +00:00)"
    ts_ms = int(when.timestamp() * 1000)
    if ts_ms < now_ms - MAX_MEASUREMENTS_AGE_MS:
        return f"Measurements-Time is more than {MAX_MEASUREMENTS_AGE_MS // 60_000} minutes old: a stale report"
    if ts_ms > now_ms + max_future_ms:
        return "Measurements-Time is ahead of the ingest's clock"
    return ts_ms


def parse(body: bytes, app: str, dyno: str, ts_ms: int) -> Report:
    """The report's counters and gauges as observations of ``dyno``; a bad entry is refused by name with
    its reason, the others kept."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ReportError(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or not ({"counters", "gauges"} & data.keys()):
        raise ReportError('a report is a JSON object {"counters": {name: number}, "gauges": {name: number}}')
    out = Report()
    seen = 0
    for section, kind in (("counters", "counter"), ("gauges", "gauge")):
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ReportError(f"{section} must be an object of name: number")
        for name, v in values.items():
            seen += 1
            if seen > MAX_NAMES:
                out.rejected.append({"name": str(name)[:100], "reason": f"more than {MAX_NAMES} names in a report"})
                continue
            reason = _problem(name, v, kind)
            if reason is not None:
                out.rejected.append({"name": str(name)[:100], "reason": reason})
                continue
            out.observations.append(models.Metric(app, dyno, ts_ms, name, kind, float(v)))  # type: ignore[arg-type]
    return out


def _problem(name: Any, v: Any, kind: str) -> str | None:
    if not isinstance(name, str) or not _NAME.match(name):
        return "a metric name is 1..200 characters of [A-Za-z0-9_.-:/]"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "the value must be a number"
    if (isinstance(v, float) and not math.isfinite(v)) or abs(v) > 1e300:
        return "the value must be finite"
    if kind == "counter" and v < 0:
        return "a counter (what happened since the last report) cannot be negative"
    return None
