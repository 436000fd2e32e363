"""The query engine's bounded caches: each entry has a size and an expiry, and its key starts with the app, so
an invalidation (app/api/query/progress.py) can drop one app's entries from all of them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

SeriesKey = tuple[str, str, int]
"""(app, process type, resolution)"""
AnswerKey = tuple[str, str, int, int, int]
"""(app, process type, resolution, since, until)"""

POINT_OVERHEAD_BYTES = 120
"""Approximate cost of one cached point beyond its JSON bytes (dict slot, int key, bytes header)."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries with a size and an expiry; least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[K, tuple[V, int, int]] = OrderedDict()

    def get(self, key: K, now_ms: int) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[2] <= now_ms:
            self.pop(key)
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V, size: int, expires_ms: int) -> None:
        self.pop(key)
        if size > self.max_bytes:
            return
        self._d[key] = (value, size, expires_ms)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s, _) = self._d.popitem(last=False)
            self.bytes -= s

    def pop(self, key: K) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= old[1]

    def pop_where(self, pred: Callable[[K], bool]) -> int:
        """Drop every entry whose key matches; returns how many."""
        doomed = [k for k in self._d if pred(k)]
        for k in doomed:
            self.pop(k)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._d)
