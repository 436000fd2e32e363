"""Answering metric queries: closed minutes from the store plus still-open minutes from the worker.

Rollups (10 min / 1 h / 2 h) will merge these same :class:`Aggregate` buckets (digests merged, counts
added), so a coarser point is never an average of percentiles.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from app.settings import WINDOW_S
from app.store import MetricsStore
from tables.aggregate import Aggregate

LiveSource = Callable[[str, str, int, int], list[Aggregate]]
"""(app, process_type, since_ms, until_ms) -> open windows held by this worker."""


class MetricsQuery:
    def __init__(self, store: MetricsStore, live: LiveSource | None = None) -> None:
        self.store = store
        self.live = live

    async def minutes(self, app: str, process_type: str, since_s: int, until_s: int) -> dict[str, Any]:
        """Points for minutes starting in ``[since_s, until_s)``, oldest first."""
        since_s -= since_s % WINDOW_S
        points: dict[int, dict[str, Any]] = {}
        for item in await self.store.query(app, process_type, WINDOW_S, since_s, until_s):
            points[item.ts_s] = Aggregate.from_record(orjson.loads(item.payload)).summary()
        if self.live is not None:
            # An open minute is newer than anything stored for it (a stored copy exists only in the
            # instant between emission and forgetting the window; both hold the same data).
            for agg in self.live(app, process_type, since_s * 1000, until_s * 1000):
                points[agg.key.start_ms // 1000] = agg.summary()
        return {"app": app, "process_type": process_type, "resolution_s": WINDOW_S,
                "points": [points[ts] for ts in sorted(points)]}
