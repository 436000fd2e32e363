"""Summary blocks: the chart points of a series, stored apart from the digests they were computed from.

One line per point, each the exact JSON the API returns, so final points go into answers unparsed; a block
of another version, or marked ``partial``, is not trusted: readers use the digests of its span.
Reference: docs/design/storage.md#store-layout-summaries-apart-from-digests
"""

from __future__ import annotations

from typing import Any

import orjson

from tables.aggregate import RESOLUTIONS, Aggregate, bucket_of

SUMMARY_VERSION = 1
BLOCK_SPAN_S = {60: 3600, 600: 6 * 3600, 3600: 86400, 7200: 7 * 86400}
"""Points per block: 60, 36, 24, 84. A block is rewritten whenever one of its points changes (every minute
for the open one), so spans are a trade of read items against rewrite bytes (docs/design/storage.md, "Why
these spans"). The minute block spans exactly one 1 h rollup bucket, whose minute list tells whether the block
misses one."""
assert set(BLOCK_SPAN_S) == set(RESOLUTIONS) and all(s % r == 0 for r, s in BLOCK_SPAN_S.items())


def block_of(ts_s: int, resolution_s: int) -> int:
    """The start of the block holding the ``resolution_s`` bucket that starts at ``ts_s``."""
    return bucket_of(ts_s, BLOCK_SPAN_S[resolution_s])


def point_json(agg: Aggregate) -> bytes:
    """The API's point for an aggregate, as stored in blocks and returned by queries."""
    return orjson.dumps(agg.summary())


class SummaryBlock:
    """The points of one series at one resolution within ``[start_s, start_s + span)``."""

    __slots__ = ("partial", "points", "resolution_s", "since_s", "start_s", "through")

    def __init__(self, resolution_s: int, start_s: int, points: dict[int, bytes] | None = None, *,
                 partial: bool = False, since_s: int | None = None) -> None:
        if start_s != block_of(start_s, resolution_s):
            raise ValueError(f"block start {start_s} is not on a {BLOCK_SPAN_S[resolution_s]} s boundary")
        self.resolution_s = resolution_s
        self.start_s = start_s
        self.points: dict[int, bytes] = points if points is not None else {}
        self.partial = partial
        self.since_s = since_s
        self.through: dict[int, int] = {}
        """Rollup points: the newest minute each holds, so a reader of a live bucket knows which stored
        minutes are not in it yet. A minute point holds just its minute."""

    @property
    def span_s(self) -> int:
        return BLOCK_SPAN_S[self.resolution_s]

    def put(self, ts_s: int, point: bytes, *, through_s: int | None = None) -> bool:
        """Set the point of the bucket starting at ``ts_s`` (holding minutes up to ``through_s``); True when
        that changed the block."""
        if not self.start_s <= ts_s < self.start_s + self.span_s or ts_s % self.resolution_s:
            raise ValueError(f"bucket {ts_s} is not a {self.resolution_s} s bucket of block {self.start_s}")
        through_s = ts_s if through_s is None else through_s
        if self.points.get(ts_s) == point and self.holds_through(ts_s) == through_s:
            return False
        self.points[ts_s] = point
        if through_s == ts_s:
            self.through.pop(ts_s, None)
        else:
            self.through[ts_s] = through_s
        return True

    def holds_through(self, ts_s: int) -> int:
        """The newest minute the point of bucket ``ts_s`` holds."""
        return self.through.get(ts_s, ts_s)

    def vouches_empty(self, span_start_s: int) -> bool:
        """True when this block's writer says the block span starting at ``span_start_s`` had no data."""
        return (self.since_s is not None and block_of(self.since_s, self.resolution_s) <= span_start_s
                < self.start_s)

    def between(self, since_s: int, until_s: int) -> list[tuple[int, bytes]]:
        """Points with ``since_s <= ts < until_s``, oldest first."""
        return [(ts, self.points[ts]) for ts in sorted(self.points) if since_s <= ts < until_s]

    def encode(self) -> bytes:
        order = sorted(self.points)
        head: dict[str, Any] = {"v": SUMMARY_VERSION, "res_s": self.resolution_s, "start_s": self.start_s,
                                "ts": order, "partial": self.partial, "since_s": self.since_s}
        if self.through:
            head["thru"] = {str(ts): m for ts, m in self.through.items()}
        return b"\n".join((orjson.dumps(head), *(self.points[ts] for ts in order)))

    @classmethod
    def decode(cls, payload: bytes) -> SummaryBlock:
        """ValueError when the payload is not a block this version reads."""
        lines = payload.split(b"\n")
        try:
            head = orjson.loads(lines[0])
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"summary block header is not JSON: {exc}") from None
        if not isinstance(head, dict) or head.get("v") != SUMMARY_VERSION:
            raise ValueError(f"unsupported summary block version {head.get('v') if isinstance(head, dict) else head!r}")
        try:
            order = [int(ts) for ts in head["ts"]]
            res_s, start_s = int(head["res_s"]), int(head["start_s"])
            partial, since_s = head["partial"], head["since_s"]
            through = {int(ts): int(m) for ts, m in head.get("thru", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"summary block header is malformed: {exc!r}") from None
        if len(order) != len(lines) - 1 or res_s not in BLOCK_SPAN_S:
            raise ValueError(f"summary block has {len(lines) - 1} points for {len(order)} timestamps")
        block = cls(res_s, start_s, dict(zip(order, lines[1:], strict=True)), partial=bool(partial),
                    since_s=None if since_s is None else int(since_s))
        block.through = through
        return block
