"""The store protocol: what the sinks, rollups, events job and query engine need from any metrics store.

Backends (``app/storage/dynamodb.py`` today) implement it; nothing above storage knows which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class MetricItem:
    app: str
    process_type: str
    resolution_s: int
    """60 for minutes; rollups use 600, 3600, 7200."""
    ts_s: int
    """Bucket start, epoch seconds."""
    payload: bytes
    """Opaque orjson-encoded aggregate; the store never parses it."""


class MetricsStore(Protocol):
    async def put_many(self, items: Sequence[MetricItem]) -> None:
        """Store all items (overwriting same keys); returns only when every item was accepted."""
        ...

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int) -> list[MetricItem]:
        """Items with since_s <= ts_s < until_s, sorted by ts_s, expired ones omitted."""
        ...
