"""How alert and autoscaling events are stored: per minute, in the metrics store, under a resolution no
metric series uses. Written by ``agents/events.py``, read by the query API's ``/events``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from app.storage.protocol import MetricItem

EVENTS_RESOLUTION_S = 0
"""The ``resolution_s`` of event items: no metric series uses 0, so the partition keys never meet."""


def events_of(items: Iterable[MetricItem]) -> list[dict[str, Any]]:
    """The events held by stored per-minute items, in item order (time, then id)."""
    out: list[dict[str, Any]] = []
    for it in items:
        doc = orjson.loads(it.payload)
        out.extend(doc.get("events", ()))
    return out


def merge_items(app: str, proc: str, existing: Iterable[MetricItem],
                new: Iterable[dict[str, Any]]) -> list[MetricItem]:
    """Items for the minutes of ``new``: the stored events of each minute with the new ones merged in by id
    (a redelivered event replaces itself). Only minutes that changed are returned."""
    by_minute: dict[int, dict[str, dict[str, Any]]] = {}
    for e in new:
        by_minute.setdefault(e["ts"], {})[e["id"]] = e
    stored = {it.ts_s: {e["id"]: e for e in events_of([it])} for it in existing}
    out = []
    for ts, events in sorted(by_minute.items()):
        old = stored.get(ts, {})
        merged = {**old, **events}
        if merged == old:
            continue  # everything already stored as is (a replay): no write
        payload = orjson.dumps({"events": [merged[k] for k in sorted(merged)]})
        out.append(MetricItem(app, proc, EVENTS_RESOLUTION_S, ts, payload))
    return out
