"""The store protocol: what the sinks, rollups, events job and query engine need from any metrics store.

Backends (``app/storage/dynamodb.py`` today) implement it; nothing above storage knows which one runs.

A series holds two kinds of item (README, "Store layout"): ``DIGEST`` items carry a bucket's full
aggregate with its t-digests, for merging (rollups, ranges no summary covers); ``SUMMARY`` items are
blocks of rendered chart points (tables/summary.py), the only thing the query path reads for final points.
A backend keeps the kinds apart so a read of one never pays for the other (DynamoDB bills whole items).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

Kind = Literal["digest", "summary"]
DIGEST: Kind = "digest"
SUMMARY: Kind = "summary"


@dataclass(frozen=True, slots=True)
class MetricItem:
    app: str
    process_type: str
    resolution_s: int
    """60 for minutes; rollups use 600, 3600, 7200."""
    ts_s: int
    """Bucket start, epoch seconds."""
    payload: bytes
    """Opaque bytes (an orjson aggregate, or a summary block); the store never parses them."""
    kind: Kind = DIGEST
    span_s: int = 0
    """How far past ``ts_s`` the item holds data (a summary block's span); retention counts from the end, so
    a block's newest point lives as long as the digest item it summarizes."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the pipeline has stored one ``metrics-1m`` partition (agents/progress.py writes it)."""

    partition: int
    stored_through_ms: int
    """Event time: every minute of the partition's apps ending at or before it is stored (minute items,
    rollups, summary blocks), except late minutes, which are listed in ``changed``."""
    updated_ms: int
    """Wall clock of the write; its age is the lag operators watch."""
    changed: dict[str, int]
    """app -> wall clock (ms) of the latest minute stored after ``stored_through_ms`` had passed it (a late
    or re-sent minute): query caches drop that app's answers. Kept for the query cache's max age."""


class MetricsStore(Protocol):
    async def put_many(self, items: Sequence[MetricItem]) -> None:
        """Store all items (overwriting same keys); returns only when every item was accepted."""
        ...

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int, kind: Kind = DIGEST) -> list[MetricItem]:
        """Items of ``kind`` with since_s <= ts_s < until_s, sorted by ts_s, expired ones omitted."""
        ...

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        """Store these partitions' progress (overwriting)."""
        ...

    async def progress(self) -> list[Progress]:
        """Every partition's latest progress, in partition order."""
        ...
