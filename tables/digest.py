"""Mergeable percentile sketch: exact value counts while small, fastdigest (Rust t-digest) beyond.

Percentiles and merges are exact while a digest holds at most ``exact_limit`` distinct values; both modes
serialize as fastdigest's ``to_dict()``, which the ``tdigest`` package reads.
Reference: docs/design/windows.md#digests
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from fastdigest import TDigest

DEFAULT_MAX_CENTROIDS = 1000  # see WindowSettings.digest_max_centroids (app/settings.py) for the accuracy measurements
DEFAULT_EXACT_LIMIT = 4096
"""Distinct values kept exactly (~60 KB serialized at most, before compression)."""


class Digest:
    __slots__ = ("_exact", "_pending", "_sorted", "_td", "exact_limit", "max_centroids")

    def __init__(self, max_centroids: int = DEFAULT_MAX_CENTROIDS, *, exact_limit: int = DEFAULT_EXACT_LIMIT,
                 _td: Any = None, _exact: Counter[float] | None = None) -> None:
        self.max_centroids = max_centroids
        self.exact_limit = exact_limit
        self._td: Any = _td
        self._exact: Counter[float] | None = _exact if _exact is not None else (Counter() if _td is None else None)
        self._pending: list[float] = []
        self._sorted: list[tuple[float, int]] | None = None

    @property
    def exact(self) -> bool:
        return self._exact is not None

    def add(self, value: float) -> None:
        self._pending.append(value)

    def add_many(self, values: Iterable[float]) -> None:
        self._pending.extend(values)

    def flush(self) -> None:
        """Fold buffered values in. Called once per batch, before reading or serializing."""
        if not self._pending:
            return
        self._sorted = None
        if self._exact is not None:
            self._exact.update(self._pending)
            if len(self._exact) > self.exact_limit:
                self._to_tdigest()
        else:
            self._td.batch_update(self._pending)
        self._pending = []

    def _to_tdigest(self) -> None:
        exact = self._exact
        assert exact is not None
        if exact.total() <= 8 * len(exact):
            # Mostly distinct values (e.g. latencies with decimals): feeding them to the Rust digest is
            # ~4x cheaper than building one centroid dict per value.
            self._td = TDigest(max_centroids=self.max_centroids)
            self._td.batch_update(list(exact.elements()))
        else:
            self._td = TDigest.from_dict(_centroid_dict(exact, self.max_centroids))
            self._td.merge_inplace(TDigest(max_centroids=self.max_centroids))  # compress to max_centroids
        self._exact = None

    def merge(self, other: Digest) -> None:
        self.flush()
        other.flush()
        if other.count == 0:
            return
        self._sorted = None
        if self._exact is not None and other._exact is not None:
            self._exact.update(other._exact)
            if len(self._exact) > self.exact_limit:
                self._to_tdigest()
            return
        if self._exact is not None:
            self._to_tdigest()
        theirs = other._td if other._td is not None else TDigest.from_dict(
            _centroid_dict(other._exact or Counter(), self.max_centroids))
        self._td.merge_inplace(theirs)

    @property
    def count(self) -> int:
        self.flush()
        if self._exact is not None:
            return sum(self._exact.values())
        return int(self._td.n_values)

    def quantile(self, q: float) -> float | None:
        self.flush()
        if self._exact is None:
            return float(self._td.quantile(q)) if self._td.n_values else None
        if not self._exact:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._exact.items())
        return _linear_quantile(self._sorted, sum(c for _, c in self._sorted), q)

    def to_dict(self) -> dict[str, Any]:
        self.flush()
        if self._exact is not None:
            d = _centroid_dict(self._exact, self.max_centroids)
            d["exact"] = True
            return d
        out: dict[str, Any] = self._td.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_centroids: int = DEFAULT_MAX_CENTROIDS) -> Digest:
        """Reads both modes, and the ``tdigest`` package's dict (only ``centroids`` is required)."""
        if data.get("exact"):
            counts: Counter[float] = Counter()
            for c in data.get("centroids") or []:
                counts[float(c["m"])] += int(c["c"])
            return cls(max_centroids, _exact=counts)
        return cls(max_centroids, _td=TDigest.from_dict(_normalize(data, max_centroids)))


def compressed_dict(data: dict[str, Any], max_centroids: int) -> dict[str, Any]:
    """A serialized digest (either mode) as a t-digest of at most ``max_centroids`` centroids.

    For a minute over its byte budget (agents/aggregate.py): an exact digest of 4096 random floats is
    ~125 KB of JSON, ~31 KB as 1000 centroids, ~2 KB as 50. Count, sum, min and max stay exact; only the
    percentiles become approximate. ``Digest.from_dict`` reads the result with the centroid count it has."""
    if len(data.get("centroids") or ()) <= max_centroids:
        return data  # already small enough (an exact one stays exact)
    td = TDigest.from_dict({**_normalize(data, max_centroids), "max_centroids": max_centroids})
    td.merge_inplace(TDigest(max_centroids=max_centroids))  # compress to max_centroids
    out: dict[str, Any] = td.to_dict()
    return out


def _linear_quantile(pairs: list[tuple[float, int]], n: int, q: float) -> float:
    """numpy.quantile's default (linear) method over value/count pairs."""
    pos = (n - 1) * q
    lo_rank = math.floor(pos)
    frac = pos - lo_rank
    lo = hi = pairs[-1][0]
    seen = 0
    found_lo = False
    for value, count in pairs:
        seen += count
        if not found_lo and seen > lo_rank:
            lo, found_lo = value, True
        if seen > lo_rank + 1:
            hi = value
            break
    else:
        hi = pairs[-1][0]
    return lo + (hi - lo) * frac


def _centroid_dict(counts: Counter[float], max_centroids: int) -> dict[str, Any]:
    items = sorted(counts.items())
    n = sum(c for _, c in items)
    return {"max_centroids": max_centroids, "mass": float(n), "n_values": n,
            "sum": math.fsum(v * c for v, c in items), "min": items[0][0] if items else 0.0,
            "max": items[-1][0] if items else 0.0, "centroids": [{"m": v, "c": float(c)} for v, c in items]}


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
        "n_values": round(mass),
        "sum": float(sum(c["m"] * c["c"] for c in cents)),
        "min": min(means) if means else 0.0,
        "max": max(means) if means else 0.0,
        "centroids": cents,
    }
