"""Mergeable percentile sketch: fastdigest (Rust t-digest) behind a small interface.

Serialized form (stored in the window table, in ``metrics-1m`` and in DynamoDB) is fastdigest's
``to_dict()``: ``{"max_centroids", "sum", "min", "max", "n_values", "centroids": [{"m": mean, "c": count}]}``.
The ``centroids`` list is the pure-Python ``tdigest`` package's form, so ``tdigest.TDigest().update_from_dict``
reads it too. Values arriving between flushes are buffered and added with one ``batch_update`` call
(~16 M values/s instead of a Python call per value).
"""

from __future__ import annotations

from typing import Any, Iterable

from fastdigest import TDigest

DEFAULT_MAX_CENTROIDS = 1000  # see Settings.digest_max_centroids for the accuracy measurements


class Digest:
    __slots__ = ("_td", "_pending", "max_centroids")

    def __init__(self, max_centroids: int = DEFAULT_MAX_CENTROIDS, *, _td: Any = None) -> None:
        self.max_centroids = max_centroids
        self._td: Any = _td if _td is not None else TDigest(max_centroids=max_centroids)
        self._pending: list[float] = []

    def add(self, value: float) -> None:
        self._pending.append(value)

    def add_many(self, values: Iterable[float]) -> None:
        self._pending.extend(values)

    def flush(self) -> None:
        """Fold buffered values into the sketch. Called once per batch, before reading or serializing."""
        if self._pending:
            self._td.batch_update(self._pending)
            self._pending = []

    def merge(self, other: "Digest") -> None:
        self.flush()
        other.flush()
        if other._td.n_values:
            self._td.merge_inplace(other._td)

    @property
    def count(self) -> int:
        self.flush()
        return int(self._td.n_values)

    def quantile(self, q: float) -> float | None:
        self.flush()
        if not self._td.n_values:
            return None
        return float(self._td.quantile(q))

    def to_dict(self) -> dict[str, Any]:
        self.flush()
        d: dict[str, Any] = self._td.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_centroids: int = DEFAULT_MAX_CENTROIDS) -> "Digest":
        """Accepts fastdigest's and tdigest's dict forms (only ``centroids`` is required)."""
        td = TDigest.from_dict(_normalize(data, max_centroids))
        return cls(max_centroids, _td=td)


def _normalize(data: dict[str, Any], max_centroids: int) -> dict[str, Any]:
    cents = data.get("centroids") or []
    if "n_values" in data and "max_centroids" in data:
        return data
    # tdigest's dict: {"n", "delta", "K", "centroids"}; derive what fastdigest needs.
    mass = float(sum(c["c"] for c in cents))
    means = [float(c["m"]) for c in cents]
    return {
        "max_centroids": max_centroids,
        "mass": mass,
        "n_values": int(round(mass)),
        "sum": float(sum(c["m"] * c["c"] for c in cents)),
        "min": min(means) if means else 0.0,
        "max": max(means) if means else 0.0,
        "centroids": cents,
    }
