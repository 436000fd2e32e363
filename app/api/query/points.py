"""Stored digest items to points: shared by the final series (final.py) and the live tail (tail.py)."""

from __future__ import annotations

from collections.abc import Iterable

from app.storage.protocol import MetricItem
from tables import record as records
from tables.aggregate import Aggregate, BucketKey, bucket_of

OFFLOAD_ITEMS = 32
"""Decoding more digests than this runs in a worker thread, so other requests keep being served."""


def decode_item(item: MetricItem) -> Aggregate:
    """A stored item's aggregate, in either record format (minutes and rollups share the record; rollups add
    ``mins``, ignored here). ValueError when unreadable."""
    return records.decode(item.payload)[0]


def merge_buckets(minutes: Iterable[Aggregate], resolution_s: int) -> dict[int, Aggregate]:
    """Minutes merged into buckets of ``resolution_s``; the inputs are not modified (beyond flushing)."""
    out: dict[int, Aggregate] = {}
    for m in minutes:
        b = bucket_of(m.key.start_ms // 1000, resolution_s)
        agg = out.get(b)
        if agg is None:
            agg = out[b] = Aggregate(BucketKey(m.key.app, m.key.process_type, b * 1000),
                                     resolution_s=resolution_s, max_centroids=m.max_centroids)
        agg.merge(m)
    return out
