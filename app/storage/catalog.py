"""Which process types an app had, per day, in the metrics store: what a query without a process type reads.

No store lists an app's series without a scan, so the rollup job (agents/rollup.py) writes one small item per
(app, day) naming every process type that had a minute that day, under a process type and resolution no series
uses. It goes through the store protocol, so every backend and a migration's dual writes carry it.
Reference: docs/prometheus.md#process-types
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from app.storage.protocol import SUMMARY, MetricItem, MetricsStore

CATALOG_PROCESS_TYPE = "~catalog"
"""Never a process type: ``~`` is outside the characters a process type may hold (app/models.py)."""
DAY_S = 86400
CATALOG_RESOLUTION_S = DAY_S


def day_of(ts_s: int) -> int:
    return ts_s - ts_s % DAY_S


def catalog_item(app: str, day_s: int, process_types: Iterable[str]) -> MetricItem:
    """The item for ``app``'s day: it expires with the day's newest minute (``span_s``)."""
    payload = orjson.dumps({"process_types": sorted(set(process_types))})
    return MetricItem(app, CATALOG_PROCESS_TYPE, CATALOG_RESOLUTION_S, day_s, payload, SUMMARY, DAY_S)


def process_types_of(items: Iterable[MetricItem]) -> set[str]:
    """The process types the catalog items name (an unreadable item names none)."""
    out: set[str] = set()
    for it in items:
        try:
            doc = orjson.loads(it.payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("process_types"), list):
            out.update(p for p in doc["process_types"] if isinstance(p, str))
    return out


async def process_types(store: MetricsStore, app: str, since_s: int, until_s: int) -> set[str]:
    """The process types ``app`` had in any day overlapping ``[since_s, until_s)``: one store query."""
    items = await store.query(app, CATALOG_PROCESS_TYPE, CATALOG_RESOLUTION_S, day_of(since_s), until_s, SUMMARY)
    return process_types_of(items)
