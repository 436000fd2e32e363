"""Point-by-point comparison of two answers to the same query (shadow reads, ``migration verify``).

Counts, sums and maxima must be equal; percentiles (``p50``/``p95``/``p99`` and a timer's ``pNN``) are
t-digest estimates whose centroids depend on merge order, so they may differ within the digest's tolerance;
means are sums over counts and compare within float rounding. Points are compared only where both stores
should hold them: buckets ending at or before ``cutoff_s`` (older than the settle time and within both
stores' stored-through watermarks), so the open minute and a writer's normal lag are not differences.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

PERCENTILE_REL_TOL = 0.01
"""The digests keep every percentile within 1 % of the exact value (docs/api.md, "Coarser points"); two
digests of the same data are each within it, so their difference stays within about twice that; 1 % of
the larger is what a chart reader could notice."""
MEAN_REL_TOL = 1e-9
KINDS = ("missing", "extra", "value", "percentile")
"""``missing``: a point the serving store has and the other lacks; ``extra``: the reverse; ``value``: an
exact field differs (or is absent on one side); ``percentile``: a percentile beyond the tolerance."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    kind: str
    ts_s: int
    field: str
    serving: Any
    other: Any


def _is_percentile(name: str) -> bool:
    return len(name) > 1 and name[0] == "p" and name[1:].replace("_", "").isdigit()


def _walk(prefix: str, a: Any, b: Any) -> Iterator[tuple[str, str, Any, Any]]:
    """(kind, field, a, b) for every leaf that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            yield from _walk(f"{prefix}.{k}" if prefix else k, a.get(k), b.get(k))
        return
    if a == b:
        return
    leaf = prefix.rsplit(".", 1)[-1]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if _is_percentile(leaf):
            if not math.isclose(a, b, rel_tol=PERCENTILE_REL_TOL, abs_tol=1e-9):
                yield "percentile", prefix, a, b
            return
        if leaf.endswith("mean") and math.isclose(a, b, rel_tol=MEAN_REL_TOL, abs_tol=1e-12):
            return
    yield "value", prefix, a, b


@dataclass(frozen=True, slots=True)
class Comparison:
    mismatches: list[Mismatch]
    points: int
    """Buckets within the compared window (in either answer): 0 means nothing could be compared yet."""


def compare_points(serving: list[dict[str, Any]], other: list[dict[str, Any]], *, resolution_s: int,
                   cutoff_s: int, since_s: int = 0) -> Comparison:
    """Differences between two answers' points, for buckets starting at or after ``since_s`` (both stores
    hold every minute since then) and ending at or before ``cutoff_s``."""
    a = {p["ts"]: p for p in serving if since_s <= p["ts"] and p["ts"] + resolution_s <= cutoff_s}
    b = {p["ts"]: p for p in other if since_s <= p["ts"] and p["ts"] + resolution_s <= cutoff_s}
    out: list[Mismatch] = []
    for ts in sorted(a.keys() | b.keys()):
        if ts not in b:
            out.append(Mismatch("missing", ts, "", a[ts], None))
        elif ts not in a:
            out.append(Mismatch("extra", ts, "", None, b[ts]))
        else:
            out.extend(Mismatch(kind, ts, field, x, y) for kind, field, x, y in _walk("", a[ts], b[ts]))
    return Comparison(out, len(a.keys() | b.keys()))


def compare_bodies(serving: bytes, other: bytes, *, resolution_s: int, cutoff_s: int,
                   since_s: int = 0) -> Comparison:
    """:func:`compare_points` on two query answers as the API returns them."""
    return compare_points(orjson.loads(serving)["points"], orjson.loads(other)["points"],
                          resolution_s=resolution_s, cutoff_s=cutoff_s, since_s=since_s)
