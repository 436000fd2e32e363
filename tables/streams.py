"""Cumulative streams (OTLP cumulative temporality) turned into per-minute deltas, one stream at a time.

A cumulative point says "this much since ``start``". The worker keeps each stream's last point (per input
partition, in the window table) and folds the difference. The rules are Prometheus's:
- a stream's first point counts in full if the stream is new (``start`` at most FIRST_POINT_MAX_AGE_MS before
  it), so a new process's first minute is not lost; an older stream's first point is only a baseline;
- a reset (another ``start``, or a total that went down) starts the stream over: its new total counts in full;
- a point older than the last one adds nothing; an exporter's retry of the last one differs by nothing.
Reference: docs/otlp.md#cumulative-streams
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import msgspec

from app import models

FIRST_POINT_MAX_AGE_MS = 5 * 60_000
"""A stream first seen within this long of its start counts from its start; an older one is a baseline."""
STREAM_IDLE_MS = 60 * 60_000
"""A stream with no point for this long (event time) is forgotten; its next point is a first point."""
MAX_STREAMS_PER_APP = 20_000
"""Cumulative streams one app may have per input partition (~200 bytes each): past it, new streams are
refused with a reason, so one app's churning attributes cannot grow a worker's memory for the others."""


@dataclass(slots=True)
class StreamPoint:
    """The last point of one stream: a counter's total, or a histogram's count, sum and bucket counts."""

    start_ms: int
    ts_ms: int
    total: float
    sum: float = 0.0
    bounds: list[float] | None = None
    counts: list[int] | None = None
    min: float | None = None
    max: float | None = None

    def to_record(self) -> list[Any]:
        return [self.start_ms, self.ts_ms, self.total, self.sum, self.bounds, self.counts, self.min, self.max]

    @classmethod
    def from_record(cls, rec: list[Any]) -> StreamPoint:
        return cls(int(rec[0]), int(rec[1]), float(rec[2]), float(rec[3]), rec[4], rec[5], rec[6], rec[7])


def counter_delta(last: StreamPoint | None, m: models.Metric) -> tuple[float | None, StreamPoint | None]:
    """(what to add, the stream's new last point); (None, None) when the point adds nothing and changes
    nothing (older than the last one)."""
    assert m.start is not None
    if last is not None and m.ts < last.ts_ms:
        return None, None
    point = StreamPoint(m.start, m.ts, m.value)
    if last is None:
        return (m.value if m.ts - m.start <= FIRST_POINT_MAX_AGE_MS else None), point
    if m.start != last.start_ms or m.value < last.total:
        return m.value, point  # reset: everything since the new start
    return m.value - last.total, point


def histogram_delta(last: StreamPoint | None, h: models.Histogram
                    ) -> tuple[models.Histogram | None, StreamPoint | None]:
    """As :func:`counter_delta` for a cumulative histogram: the delta histogram of this interval.

    Count, sum and bucket counts are differenced. Bounds may change between points only by merging
    buckets (an exponential histogram's downscale): the last counts are regrouped into the new bounds
    first; any other change is a reset. Min and max are over the stream's life in OTLP: this interval's
    extreme is known exactly when it moved past the last one, otherwise the bucket bounds it."""
    assert h.start is not None
    if last is not None and h.ts < last.ts_ms:
        return None, None
    point = StreamPoint(h.start, h.ts, float(h.count), h.sum, list(h.bounds), list(h.counts), h.min, h.max)
    whole = msgspec.structs.replace(h, stream=None, start=None)
    if last is None:
        return (whole if h.ts - h.start <= FIRST_POINT_MAX_AGE_MS else None), point
    prev = _regrouped(last, h.bounds) if h.start == last.start_ms and h.count >= last.total else None
    if prev is None:
        return whole, point  # reset
    counts = [a - b for a, b in zip(h.counts, prev, strict=True)]
    if min(counts) < 0:
        return whole, point
    lo = h.min if h.min is not None and (last.min is None or h.min < last.min) else None
    hi = h.max if h.max is not None and (last.max is None or h.max > last.max) else None
    if hi is None and h.max is not None:
        hi = _upper_of(h.bounds, counts, h.max)
    if lo is None and h.min is not None:
        lo = _lower_of(h.bounds, counts, h.min)
    delta = msgspec.structs.replace(whole, count=h.count - int(last.total), sum=h.sum - last.sum, counts=counts,
                                    min=lo, max=hi)
    return delta, point


def _regrouped(last: StreamPoint, bounds: list[float]) -> list[int] | None:
    """The last point's counts in ``bounds``, or None when its buckets do not nest in them."""
    assert last.bounds is not None and last.counts is not None
    if last.bounds == bounds:
        return last.counts
    inf = float("inf")
    old = last.bounds
    out = [0] * (len(bounds) + 1)
    for j, c in enumerate(last.counts):
        if not c:
            continue
        lower = old[j - 1] if j > 0 else -inf
        i = bisect_left(bounds, old[j]) if j < len(old) else len(bounds)
        if i > 0 and bounds[i - 1] > lower:
            return None  # the old bucket straddles a new bound
        out[i] += c
    return out


def _upper_of(bounds: list[float], counts: list[int], life_max: float) -> float | None:
    """This interval's highest value is at most its highest non-empty bucket's upper bound (and the max)."""
    for i in range(len(counts) - 1, -1, -1):
        if counts[i]:
            return min(bounds[i], life_max) if i < len(bounds) else life_max
    return None


def _lower_of(bounds: list[float], counts: list[int], life_min: float) -> float | None:
    for i, c in enumerate(counts):
        if c:
            return max(bounds[i - 1], life_min) if i > 0 else life_min
    return None
