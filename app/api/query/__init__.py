"""The read API's query engine, by job: ``engine`` answers and caches whole answers, ``progress`` says which
cached answers may still be served, ``final`` caches the final buckets per series, ``tail`` builds the live
edge; ``cache`` and ``points`` are what they share."""

from app.api.query.cache import ByteLRU
from app.api.query.engine import (
    RESOLUTION_NAMES,
    STALE_GRACE_S,
    Answer,
    MetricsQuery,
    QueryEngine,
    auto_resolution,
)
from app.api.query.final import FALLBACK_CONCURRENCY, FinalSeries
from app.api.query.points import OFFLOAD_ITEMS, decode_item, merge_buckets
from app.api.query.progress import PartitionOf, ProgressWatch
from app.api.query.tail import LiveSource, LiveTail

__all__ = [
    "FALLBACK_CONCURRENCY", "OFFLOAD_ITEMS", "RESOLUTION_NAMES", "STALE_GRACE_S", "Answer", "ByteLRU",
    "FinalSeries", "LiveSource", "LiveTail", "MetricsQuery", "PartitionOf", "ProgressWatch", "QueryEngine",
    "auto_resolution", "decode_item", "merge_buckets",
]
