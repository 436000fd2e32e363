"""Mergeable percentile sketch: exact value counts while small, fastdigest (Rust t-digest) beyond.

Percentiles and merges are exact while a digest holds at most ``exact_limit`` distinct values; both modes
serialize as fastdigest's ``to_dict()``, which the ``tdigest`` package reads.
Reference: docs/design/windows.md#digests
"""

from __future__ import annotations

import math
import operator
import struct
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import accumulate
from typing import Any

from fastdigest import TDigest

from tables import varint

DEFAULT_MAX_CENTROIDS = 1000  # see WindowSettings.digest_max_centroids (app/settings.py) for the accuracy measurements
DEFAULT_EXACT_LIMIT = 4096
"""Distinct values kept exactly (~60 KB serialized at most, before compression)."""

# The binary forms (Digest.to_bytes): the first byte says which.
FORM_EXACT_INT = 1
"""Exact, integer values: n, the first value (zigzag), the gaps to the next ones, the counts (varints)."""
FORM_EXACT_DECIMAL = 2
"""Exact, values with up to 6 decimals: as FORM_EXACT_INT after a byte k, of the values times 10**k."""
FORM_EXACT_FLOAT = 3
"""Exact, any other values: n, the values as float64 (little-endian), the counts (varints)."""
FORM_TDIGEST = 4
"""A t-digest with integral weights: max_centroids, n_values, mass, sum, min, max, n, means as float64,
weights as varints."""
FORM_TDIGEST_FLOAT = 5
"""A t-digest with fractional weights: as FORM_TDIGEST, the weights as float64."""
SIGNED_COUNTS = 0x80
"""Or-ed into an exact form when a count is negative: the counts are zigzag varints then."""
MAX_DECIMALS = 6
_EXACT_INT_LIMIT = 2**53
"""Integers beyond float64's contiguous range are not worth a varint (nor exact): float64 then."""
_SCALARS = struct.Struct("<4d")
_MEAN, _WEIGHT = operator.itemgetter("m"), operator.itemgetter("c")


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

    def add_weighted(self, weights: Mapping[float, int]) -> None:
        """Values with integral weights (a histogram's spread, tables/aggregate.py :func:`spread`)."""
        if not weights:
            return
        self.flush()
        self._sorted = None
        if self._exact is not None:
            self._exact.update(weights)
            if len(self._exact) > self.exact_limit:
                self._to_tdigest()
        else:
            self._td.merge_inplace(TDigest.from_dict(_centroid_dict(Counter(weights), self.max_centroids)))

    @property
    def min(self) -> float | None:
        """The smallest value (exact in both modes: the t-digest keeps its extremes)."""
        self.flush()
        if self._exact is not None:
            return min(self._exact) if self._exact else None
        return float(self._td.min()) if self._td.n_values else None

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

    def to_bytes(self) -> bytes:
        """The compact stored form (tables/record.py): the ``FORM_*`` byte, then the form's fields.
        ``from_bytes`` gives back a digest whose ``to_dict()`` equals this one's, float for float."""
        self.flush()
        if self._exact is None:
            return _tdigest_bytes(self._td.to_dict())
        exact = self._exact
        values = sorted(exact)
        counts = list(map(exact.__getitem__, values))
        out = bytearray(1)
        ints, k = _scaled(values)
        if ints is None:
            out[0] = FORM_EXACT_FLOAT
            varint.put(out, len(values))
            out += struct.pack(f"<{len(values)}d", *values)
        else:
            out[0] = FORM_EXACT_INT if k == 0 else FORM_EXACT_DECIMAL
            if k:
                out.append(k)
            varint.put(out, len(ints))
            if ints:
                varint.put(out, varint.zigzag(ints[0]))
                varint.put_many(out, list(map(operator.sub, ints[1:], ints)))  # sorted: never negative
        if counts and min(counts) < 0:
            out[0] |= SIGNED_COUNTS
            counts = [varint.zigzag(c) for c in counts]
        varint.put_many(out, counts)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, max_centroids: int = DEFAULT_MAX_CENTROIDS) -> Digest:
        """Reads :meth:`to_bytes`; ``max_centroids`` as in :meth:`from_dict`. ValueError when malformed."""
        try:
            return _from_bytes(cls, data, max_centroids)
        except (IndexError, struct.error, OverflowError) as exc:
            raise ValueError(f"malformed digest bytes: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_centroids: int = DEFAULT_MAX_CENTROIDS) -> Digest:
        """Reads both modes, and the ``tdigest`` package's dict (only ``centroids`` is required)."""
        if data.get("exact"):
            cents = data.get("centroids") or []
            values = list(map(float, map(_MEAN, cents)))
            unique = dict(zip(values, map(int, map(_WEIGHT, cents)), strict=True))
            if len(unique) == len(values):  # as to_dict writes them: 2x faster than the loop below
                return cls(max_centroids, _exact=Counter(unique))
            counts: Counter[float] = Counter()
            for v, c in zip(values, map(_WEIGHT, cents), strict=True):
                counts[v] += int(c)
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


def _scaled(values: list[float]) -> tuple[list[int] | None, int]:
    """``(ints, k)`` with ``values[i] == ints[i] / 10**k`` exactly (``ints`` themselves for k = 0), for the
    smallest k up to MAX_DECIMALS; ``(None, 0)`` when there is none (or a -0.0, which would read back 0.0)."""
    if not values:
        return [], 0
    i = bisect_left(values, 0.0)
    if i < len(values) and values[i] == 0 and math.copysign(1.0, values[i]) < 0:
        return None, 0
    if not (values[0] > -_EXACT_INT_LIMIT and values[-1] < _EXACT_INT_LIMIT):
        return None, 0
    try:
        try:
            integral = all(map(float.is_integer, values))  # False for inf and nan
        except TypeError:  # int keys (a digest fed ints)
            integral = list(map(int, values)) == values
        if integral:
            return list(map(int, values)), 0
        sample = values[:8]
        for k in range(1, MAX_DECIMALS + 1):
            scale = 10**k
            if [round(v * scale) / scale for v in sample] != sample:  # most floats fail here, cheaply
                continue
            ints = [round(v * scale) for v in values]
            if ints[0] > -_EXACT_INT_LIMIT and ints[-1] < _EXACT_INT_LIMIT and list(
                    map(scale.__rtruediv__, ints)) == values:
                return ints, k
    except (ValueError, OverflowError):  # inf, nan
        pass
    return None, 0


def _tdigest_bytes(d: dict[str, Any]) -> bytes:
    cents = d["centroids"]
    means = [c["m"] for c in cents]
    weights = [c["c"] for c in cents]
    try:
        ints: list[int] | None = list(map(int, weights))
    except (ValueError, OverflowError):
        ints = None
    if ints is not None and not (ints == weights and (not ints or (min(ints) >= 0 and max(ints) < _EXACT_INT_LIMIT))):
        ints = None
    out = bytearray([FORM_TDIGEST if ints is not None else FORM_TDIGEST_FLOAT])
    varint.put(out, int(d["max_centroids"]))
    varint.put(out, int(d["n_values"]))
    out += _SCALARS.pack(d["mass"], d["sum"], d["min"], d["max"])
    varint.put(out, len(cents))
    out += struct.pack(f"<{len(means)}d", *means)
    if ints is not None:
        varint.put_many(out, ints)
    else:
        out += struct.pack(f"<{len(weights)}d", *weights)
    return bytes(out)


def _floats(data: bytes, pos: int, n: int) -> tuple[list[float], int]:
    end = pos + 8 * n
    if end > len(data):
        raise ValueError(f"truncated: {n} float64 announced, {len(data) - pos} bytes left")
    return list(struct.unpack_from(f"<{n}d", data, pos)), end


def _from_bytes(cls: type[Digest], data: bytes, max_centroids: int) -> Digest:
    if not data:
        raise ValueError("empty digest bytes")
    form, pos = data[0], 1
    values: list[float]
    if form & ~SIGNED_COUNTS in (FORM_EXACT_INT, FORM_EXACT_DECIMAL, FORM_EXACT_FLOAT):
        k = 0
        if form & ~SIGNED_COUNTS == FORM_EXACT_DECIMAL:
            k, pos = data[pos], pos + 1
            if not 1 <= k <= MAX_DECIMALS:
                raise ValueError(f"malformed digest bytes: {k} decimals")
        n, pos = varint.read(data, pos)
        if form & ~SIGNED_COUNTS == FORM_EXACT_FLOAT:
            values, pos = _floats(data, pos, n)
        elif n:
            first, pos = varint.read(data, pos)
            gaps, pos = varint.read_many(data, pos, n - 1)
            gaps.insert(0, varint.unzigzag(first))
            ints = list(accumulate(gaps))
            values = list(map(float, ints)) if k == 0 else list(map((10**k).__rtruediv__, ints))
        else:
            values = []
        counts, pos = varint.read_many(data, pos, n)
        if form & SIGNED_COUNTS:
            counts = list(map(varint.unzigzag, counts))
        _no_tail(data, pos)
        return cls(max_centroids, _exact=Counter(dict(zip(values, counts, strict=True))))
    if form in (FORM_TDIGEST, FORM_TDIGEST_FLOAT):
        mc, pos = varint.read(data, pos)
        n_values, pos = varint.read(data, pos)
        if pos + _SCALARS.size > len(data):
            raise ValueError("truncated digest bytes")
        mass, total, lo, hi = _SCALARS.unpack_from(data, pos)
        n, pos = varint.read(data, pos + _SCALARS.size)
        means, pos = _floats(data, pos, n)
        weights: list[float]
        if form == FORM_TDIGEST:
            ints, pos = varint.read_many(data, pos, n)
            weights = list(map(float, ints))
        else:
            weights, pos = _floats(data, pos, n)
        _no_tail(data, pos)
        d = {"max_centroids": mc, "mass": mass, "sum": total, "min": lo, "max": hi, "n_values": n_values,
             "centroids": [{"m": m, "c": c} for m, c in zip(means, weights, strict=True)]}
        return cls(max_centroids, _td=TDigest.from_dict(d))
    raise ValueError(f"unknown digest form {form}")


def _no_tail(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise ValueError(f"malformed digest bytes: {len(data) - pos} bytes after the digest")


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
