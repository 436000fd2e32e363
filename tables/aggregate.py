"""One mergeable bucket of metrics for (app, process type, time bucket).

The same class is the open window in the aggregation agent, the record on ``metrics-1m``, the payload in
DynamoDB and (merged) a coarser point at query time: counts and sums add, max is max, means are weighted,
percentiles come from merged t-digests -- never from averaging percentiles.

Serialized with :meth:`to_record` (JSON-able, ``v`` is bumped when the layout or digest parameters change);
stored in the compact form of tables/record.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tables.digest import DEFAULT_MAX_CENTROIDS, Digest, compressed_dict

RECORD_VERSION = 1
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


RESOLUTIONS = (60, 600, 3600, 7200)
"""Every series resolution in seconds: minutes, then the precomputed rollups."""
ROLLUP_RESOLUTIONS = (600, 3600, 7200)


def bucket_of(ts_s: int, resolution_s: int) -> int:
    """The start of the ``resolution_s`` bucket holding ``ts_s`` (both epoch seconds)."""
    return ts_s - ts_s % resolution_s


class Stat:
    """sum, count, max of a gauge-like series (memory, load). Mean = sum / count."""

    __slots__ = ("max", "n", "sum")

    def __init__(self, total: float = 0.0, n: int = 0, maximum: float | None = None) -> None:
        self.sum = total
        self.n = n
        self.max = maximum

    def add(self, v: float) -> None:
        self.sum += v
        self.n += 1
        if self.max is None or v > self.max:
            self.max = v

    def merge(self, other: Stat) -> None:
        self.sum += other.sum
        self.n += other.n
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def to_list(self) -> list[Any]:
        return [self.sum, self.n, self.max]

    @classmethod
    def from_list(cls, v: list[Any]) -> Stat:
        return cls(float(v[0]), int(v[1]), None if v[2] is None else float(v[2]))

    def mean(self) -> float | None:
        return self.sum / self.n if self.n else None


class Timer:
    """A latency-like series: exact count/sum/max plus a digest for percentiles.

    Values are appended to ``pending`` (the aggregation hot path does only that) and folded into
    count/sum/max/digest by :meth:`flush` with C builtins, once per batch.
    """

    __slots__ = ("_max", "_n", "_sum", "digest", "pending")

    def __init__(self, max_centroids: int) -> None:
        self.digest = Digest(max_centroids)
        self.pending: list[float] = []
        self._n = 0
        self._sum = 0.0
        self._max: float | None = None

    def add(self, v: float) -> None:
        self.pending.append(v)

    def flush(self) -> None:
        p = self.pending
        if p:
            self._n += len(p)
            self._sum += math.fsum(p)
            m = max(p)
            if self._max is None or m > self._max:
                self._max = m
            self.digest.add_many(p)
            self.digest.flush()
            p.clear()  # same list object: the hot path may hold its bound append

    @property
    def n(self) -> int:
        self.flush()
        return self._n

    @property
    def sum(self) -> float:
        self.flush()
        return self._sum

    @property
    def max(self) -> float | None:
        self.flush()
        return self._max

    def merge(self, other: Timer) -> None:
        self.flush()
        other.flush()
        self.digest.merge(other.digest)
        self._n += other._n
        self._sum += other._sum
        if other._max is not None and (self._max is None or other._max > self._max):
            self._max = other._max

    def add_histogram(self, weights: Mapping[float, int], n: int, total: float, maximum: float | None) -> None:
        """``n`` values summing to ``total`` at once; ``weights`` (from :func:`spread`) feed the digest."""
        self._n += n
        self._sum += total
        if maximum is None and weights:
            maximum = max(weights)
        if maximum is not None and (self._max is None or maximum > self._max):
            self._max = maximum
        self.digest.add_weighted(weights)

    def to_dict(self, digest: Callable[[Digest], Any] = Digest.to_dict) -> dict[str, Any]:
        """``digest``: how the digest is written (``Digest.to_bytes`` in stored items, tables/record.py)."""
        self.flush()
        return {"n": self._n, "s": self._sum, "max": self._max, "d": digest(self.digest)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], max_centroids: int,
                  digest: Callable[[Any, int], Digest] = Digest.from_dict) -> Timer:
        t = cls(max_centroids)
        t._n, t._sum, t._max = int(d["n"]), float(d["s"]), d["max"]
        t.digest = digest(d["d"], max_centroids)
        return t

    def summary(self) -> dict[str, Any]:
        self.flush()
        n = self._n
        return {
            "count": n, "sum": self._sum, "max": self._max, "min": self.digest.min,
            "mean": self._sum / n if n else None,
            "p50": self.digest.quantile(0.5), "p95": self.digest.quantile(0.95),
            "p99": self.digest.quantile(0.99),
        }


class Gauge:
    """A custom gauge: mean/max over the bucket and the value of the latest sample (by event time)."""

    __slots__ = ("last", "last_ts_ms", "stat")

    def __init__(self) -> None:
        self.stat = Stat()
        self.last: float | None = None
        self.last_ts_ms = -1

    def add(self, v: float, ts_ms: int) -> None:
        self.stat.add(v)
        if ts_ms >= self.last_ts_ms:
            self.last, self.last_ts_ms = v, ts_ms

    def merge(self, other: Gauge) -> None:
        self.stat.merge(other.stat)
        if other.last_ts_ms >= self.last_ts_ms:
            self.last, self.last_ts_ms = other.last, other.last_ts_ms


SPREAD_POINTS = 16
"""Points a histogram bucket's values are spread over for the digest (docs/otlp.md#histograms)."""


def spread(bounds: Sequence[float], counts: Sequence[int], lo: float | None, hi: float | None
           ) -> dict[float, int]:
    """A histogram's buckets as weighted values for the digest: each bucket's count spread evenly over at
    most SPREAD_POINTS points across it, the open ends closed by ``lo``/``hi`` (the min and max, when the
    histogram has them), and one value placed exactly at each of those, so the digest's extremes are exact.
    """
    out: dict[float, int] = {}
    last = len(bounds)
    nonempty = [i for i, c in enumerate(counts) if c]
    if not nonempty:
        return out
    first_i, last_i = nonempty[0], nonempty[-1]
    for i in nonempty:
        c = counts[i]
        a = bounds[i - 1] if i > 0 else (lo if lo is not None else (min(0.0, bounds[0]) if bounds else 0.0))
        b = bounds[i] if i < last else (hi if hi is not None else (bounds[-1] if bounds else a))
        if lo is not None and a < lo:
            a = lo
        if hi is not None and b > hi:
            b = hi
        if b < a:
            a = b
        pinned: list[float] = []
        if i == first_i and lo is not None:
            pinned.append(lo)
        if i == last_i and hi is not None and c - len(pinned) > 0:
            pinned.append(hi)
        for v in pinned:
            out[v] = out.get(v, 0) + 1
        c -= len(pinned)
        if c <= 0:
            continue
        k = min(c, SPREAD_POINTS)
        each, extra = divmod(c, k)
        step = (b - a) / k
        for j in range(k):
            v = a + (j + 0.5) * step
            out[v] = out.get(v, 0) + each + (1 if j < extra else 0)
    return out


@dataclass(frozen=True, slots=True)
class BucketKey:
    app: str
    process_type: str
    start_ms: int


class Aggregate:
    """Everything known about one (app, process type, bucket). Bounded size whatever the traffic."""

    __slots__ = (
        "addons",
        "counters",
        "errors",
        "failed",
        "gauges",
        "key",
        "load",
        "max_centroids",
        "offset",
        "platform",
        "quota_mb",
        "resolution_s",
        "response",
        "rss",
        "status",
        "swap",
        "timers",
        "total",
    )

    def __init__(self, key: BucketKey, *, resolution_s: int = 60,
                 max_centroids: int = DEFAULT_MAX_CENTROIDS) -> None:
        self.key = key
        self.resolution_s = resolution_s
        self.max_centroids = max_centroids
        self.offset = -1  # highest input offset folded in: replays at or below it are skipped
        self.response = Timer(max_centroids)  # one value per request a dyno served (with a service time)
        self.status = [0, 0, 0, 0, 0, 0]  # index = status // 100 (1..5); their sum is the request count
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.rss = Stat()
        self.swap = Stat()
        self.total = Stat()
        self.quota_mb: float | None = None
        self.load = Stat()
        self.timers: dict[str, Timer] = {}
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, Gauge] = {}
        self.addons: dict[str, dict[str, Gauge]] = {}  # add-on source (DATABASE) -> sample name -> gauge
        self.platform: dict[str, int] = {}  # platform event name (models.EVENT_NAMES) -> count

    @property
    def requests(self) -> int:
        """Every request, served or not: a router error without a service time counts here only."""
        s = self.status
        return s[1] + s[2] + s[3] + s[4] + s[5]

    # --- adding observations (tables/windows.py inlines add_request on its hot path) ----------------
    def add_request(self, status: int, service_ms: float | None, code: str | None) -> None:
        if service_ms is not None:
            self.response.add(service_ms)
        self.status[status // 100] += 1
        if status >= 500:
            self.failed += 1
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1

    def add_runtime(self, rss_mb: float | None, swap_mb: float | None, total_mb: float | None,
                    quota_mb: float | None, load_1m: float | None) -> None:
        if rss_mb is not None:
            self.rss.add(rss_mb)
        if swap_mb is not None:
            self.swap.add(swap_mb)
        if total_mb is not None:
            self.total.add(total_mb)
        if quota_mb is not None and (self.quota_mb is None or quota_mb > self.quota_mb):
            self.quota_mb = quota_mb
        if load_1m is not None:
            self.load.add(load_1m)

    def add_metric(self, name: str, kind: str, value: float, ts_ms: int) -> None:
        if kind == "timer":
            t = self.timers.get(name)
            if t is None:
                t = self.timers[name] = Timer(self.max_centroids)
            t.add(value)
        elif kind == "counter":
            self.counters[name] = self.counters.get(name, 0.0) + value
        else:
            g = self.gauges.get(name)
            if g is None:
                g = self.gauges[name] = Gauge()
            g.add(value, ts_ms)

    def add_histogram(self, name: str | None, status: int | None, n: int, total: float,
                      bounds: Sequence[float], counts: Sequence[int], lo: float | None, hi: float | None) -> None:
        """``n`` values at once (an OTLP histogram point): the request series when ``name`` is None (all of
        one ``status``), else the custom timer ``name``. Count, sum, min and max exact (min and max when
        given); percentiles from the spread buckets."""
        if name is None:
            assert status is not None
            self.status[status // 100] += n
            if status >= 500:
                self.failed += n
            timer = self.response
        elif name in self.timers:
            timer = self.timers[name]
        else:
            timer = self.timers[name] = Timer(self.max_centroids)
        timer.add_histogram(spread(bounds, counts, lo, hi), n, total, hi)

    def add_addon(self, source: str, samples: dict[str, float], ts_ms: int) -> None:
        gauges = self.addons.setdefault(source, {})
        for name, v in samples.items():
            g = gauges.get(name)
            if g is None:
                g = gauges[name] = Gauge()
            g.add(v, ts_ms)

    def add_event(self, name: str, n: int = 1) -> None:
        self.platform[name] = self.platform.get(name, 0) + n

    # --- combining ---------------------------------------------------------------------------------
    def merge(self, other: Aggregate) -> None:
        """Fold another bucket in (rollups, query-time merging). Exact for counts/sums/max."""
        self.response.merge(other.response)
        self.status = [a + b for a, b in zip(self.status, other.status, strict=False)]
        self.failed += other.failed
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.rss.merge(other.rss)
        self.swap.merge(other.swap)
        self.total.merge(other.total)
        if other.quota_mb is not None and (self.quota_mb is None or other.quota_mb > self.quota_mb):
            self.quota_mb = other.quota_mb
        self.load.merge(other.load)
        for name, t in other.timers.items():
            mine = self.timers.get(name)
            if mine is None:
                mine = self.timers[name] = Timer(self.max_centroids)
            mine.merge(t)
        for name, v in other.counters.items():
            self.counters[name] = self.counters.get(name, 0.0) + v
        _merge_gauges(self.gauges, other.gauges)
        for source, gauges in other.addons.items():
            _merge_gauges(self.addons.setdefault(source, {}), gauges)
        for name, n in other.platform.items():
            self.platform[name] = self.platform.get(name, 0) + n
        self.offset = max(self.offset, other.offset)

    # --- serialization -----------------------------------------------------------------------------
    def to_record(self, *, digest: Callable[[Digest], Any] = Digest.to_dict) -> dict[str, Any]:
        """``digest``: as in :meth:`Timer.to_dict`."""
        rec: dict[str, Any] = {
            "v": RECORD_VERSION, "app": self.key.app, "proc": self.key.process_type,
            "start_ms": self.key.start_ms, "res_s": self.resolution_s, "off": self.offset,
            "mc": self.max_centroids,
        }
        if self.requests:  # "resp" always comes with "st", even empty: readers of the first layout need it
            rec["resp"] = self.response.to_dict(digest)
            rec["st"] = self.status[1:]
            rec["fail"] = self.failed
        if self.errors:
            rec["err"] = self.errors
        if self.rss.n or self.swap.n or self.total.n or self.quota_mb is not None:
            rec["mem"] = {"rss": self.rss.to_list(), "swap": self.swap.to_list(),
                          "total": self.total.to_list(), "quota": self.quota_mb}
        if self.load.n:
            rec["load"] = self.load.to_list()
        if self.timers:
            rec["tim"] = {k: t.to_dict(digest) for k, t in self.timers.items()}
        if self.counters:
            rec["cnt"] = self.counters
        if self.gauges:
            rec["gau"] = {k: _gauge_list(g) for k, g in self.gauges.items()}
        if self.addons:
            rec["add"] = {src: {k: _gauge_list(g) for k, g in gs.items()} for src, gs in self.addons.items()}
        if self.platform:
            rec["plat"] = self.platform
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any], *,
                    digest: Callable[[Any, int], Digest] = Digest.from_dict) -> Aggregate:
        """``digest``: as in :meth:`Timer.from_dict`."""
        if rec.get("v") != RECORD_VERSION:
            raise ValueError(f"unsupported aggregate record version {rec.get('v')!r}")
        mc = int(rec.get("mc", DEFAULT_MAX_CENTROIDS))
        agg = cls(BucketKey(rec["app"], rec["proc"], int(rec["start_ms"])),
                  resolution_s=int(rec["res_s"]), max_centroids=mc)
        agg.offset = int(rec.get("off", -1))
        if "resp" in rec:
            agg.response = Timer.from_dict(rec["resp"], mc, digest)
            agg.status = [0, *(int(x) for x in rec["st"])]
            agg.failed = int(rec["fail"])
        agg.errors = {k: int(v) for k, v in rec.get("err", {}).items()}
        mem = rec.get("mem")
        if mem:
            agg.rss, agg.swap, agg.total = (Stat.from_list(mem[k]) for k in ("rss", "swap", "total"))
            agg.quota_mb = mem.get("quota")
        if "load" in rec:
            agg.load = Stat.from_list(rec["load"])
        agg.timers = {k: Timer.from_dict(v, mc, digest) for k, v in rec.get("tim", {}).items()}
        agg.counters = {k: float(v) for k, v in rec.get("cnt", {}).items()}
        agg.gauges = {k: _gauge_of(v) for k, v in rec.get("gau", {}).items()}
        agg.addons = {src: {k: _gauge_of(v) for k, v in gs.items()} for src, gs in rec.get("add", {}).items()}
        agg.platform = {k: int(v) for k, v in rec.get("plat", {}).items()}
        return agg

    def summary(self) -> dict[str, Any]:
        """The query API's point for this bucket; a section is absent when it had no data."""
        point: dict[str, Any] = {"ts": self.key.start_ms // 1000}
        if self.requests:
            point["requests"] = self.requests
            if self.response.n:  # absent when no request of the bucket had a service time
                r = self.response.summary()
                point["response_ms"] = {k: r[k] for k in ("p50", "p95", "p99", "max", "min", "mean")}
            point["status"] = {c: n for c, n in zip(STATUS_CLASSES, self.status[1:], strict=False) if n}
            point["failed"] = self.failed
        if self.errors:
            point["errors"] = dict(self.errors)
        mem: dict[str, Any] = {}
        for name, stat in (("rss", self.rss), ("swap", self.swap), ("total", self.total)):
            if stat.n:
                mem[f"{name}_mean"] = stat.mean()
                mem[f"{name}_max"] = stat.max
        if self.quota_mb is not None:
            mem["quota"] = self.quota_mb
        if mem:
            point["memory_mb"] = mem
        if self.load.n:
            point["load"] = {"mean": self.load.mean(), "max": self.load.max}
        custom: dict[str, Any] = {}
        for name, t in self.timers.items():
            s = t.summary()
            custom[name] = {"type": "timer",
                            **{k: s[k] for k in ("p50", "p95", "p99", "max", "min", "count", "sum")}}
        for name, v in self.counters.items():
            custom[name] = {"type": "counter", "sum": v}
        for name, g in self.gauges.items():
            custom[name] = {"type": "gauge", **_gauge_point(g)}
        if custom:
            point["metrics"] = custom
        if self.addons:
            point["addons"] = {src: {k: _gauge_point(g) for k, g in sorted(gs.items())}
                               for src, gs in sorted(self.addons.items())}
        if self.platform:
            point["platform"] = dict(sorted(self.platform.items()))
        return point


FIT_CENTROIDS = (200, 50)
"""Centroid counts a minute over budget steps down to (after its own ``mc``), before names are dropped."""
_KEEP_ALWAYS = ("v", "app", "proc", "start_ms", "res_s", "off", "mc", "resp", "st", "fail", "mem", "load")
"""What the last resort keeps: the key, request counts and response digest, memory and load."""


@dataclass(slots=True)
class Fitted:
    """A minute serialized within a byte budget: what :func:`fit_record` had to give up for it."""

    value: bytes
    size: int
    """Bytes of the record as it was, before anything was given up."""
    digests_compressed: int = 0
    dropped: list[tuple[str, str, int]] = field(default_factory=list)
    """``(section, name, bytes)`` left out: ``metric`` names (largest first), ``addon`` sources, then
    ``errors`` / ``platform`` as a last resort."""

    @property
    def degraded(self) -> bool:
        return bool(self.digests_compressed or self.dropped)


def _size(v: Any) -> int:
    return len(orjson.dumps(v))


def fit_record(rec: dict[str, Any], max_bytes: int) -> Fitted:
    """``orjson.dumps(rec)``, made to fit ``max_bytes`` when it does not.

    A minute must never be larger than the broker accepts: a refused send would crash the worker, and its
    restart rebuilds the same minute (a crash loop for every tenant of the partition). In order, each step
    only if still over: timers' digests (custom and response) become t-digests of ``mc`` centroids, then of
    FIT_CENTROIDS, largest first (exact counts, sums and max kept; percentiles approximate); then custom
    metric names are left out, largest first; then add-on sources; then errors and platform events. ``rec``
    itself is not changed. Byte accounting is exact: orjson writes a dict as the sum of its parts.
    """
    raw = orjson.dumps(rec)
    size = total = len(raw)
    fitted = Fitted(raw, size)
    if total <= max_bytes:
        return fitted
    rec = dict(rec)
    timers = dict(rec.get("tim") or {})
    if timers:
        rec["tim"] = timers
    slots: list[str | None] = [None, *timers] if "resp" in rec else list(timers)  # None: the response timer

    def timer_of(slot: str | None) -> dict[str, Any]:
        return rec["resp"] if slot is None else timers[slot]  # type: ignore[no-any-return]

    for mc in (int(rec.get("mc", DEFAULT_MAX_CENTROIDS)), *FIT_CENTROIDS):
        for slot in sorted(slots, key=lambda k: -len(timer_of(k)["d"].get("centroids") or ())):
            t = timer_of(slot)
            d = compressed_dict(t["d"], mc)
            if d is t["d"]:
                continue
            new = {**t, "d": d}
            total += _size(new) - _size(t)
            if slot is None:
                rec["resp"] = new
            else:
                timers[slot] = new
            fitted.digests_compressed += 1
            if total <= max_bytes:
                break
        if total <= max_bytes:
            break
    # Names, largest first: a name's cost is its key, its value and the separators around them.
    sections = [("metric", s) for s in ("tim", "cnt", "gau")] + [("addon", "add")]
    for kind in ("metric", "addon"):
        if total <= max_bytes:
            break
        parts = [(_size(k) + _size(v) + 2, sec, k) for what, sec in sections if what == kind
                 for k, v in (rec.get(sec) or {}).items()]
        for cost, sec, name in sorted(parts, key=lambda p: (-p[0], p[1], p[2])):
            if total <= max_bytes:
                break
            section = rec[sec] = dict(rec[sec])
            del section[name]
            total -= cost
            if not section:
                del rec[sec]
                total -= len(sec) + 6  # "sec":{} and a comma
            fitted.dropped.append((kind, name, cost))
    for sec, kind in (("err", "errors"), ("plat", "platform")):
        if total > max_bytes and sec in rec:
            cost = _size(rec.pop(sec)) + len(sec) + 4
            total -= cost
            fitted.dropped.append((kind, sec, cost))
    value = orjson.dumps(rec)
    if len(value) > max_bytes:  # the estimates are exact, but never trust that for a send
        fitted.dropped += [("section", k, _size(v)) for k, v in rec.items() if k not in _KEEP_ALWAYS]
        value = orjson.dumps({k: v for k, v in rec.items() if k in _KEEP_ALWAYS})
    fitted.value = value
    return fitted


def _merge_gauges(mine: dict[str, Gauge], other: dict[str, Gauge]) -> None:
    for name, g in other.items():
        mg = mine.get(name)
        if mg is None:
            mg = mine[name] = Gauge()
        mg.merge(g)


def _gauge_list(g: Gauge) -> list[Any]:
    return [*g.stat.to_list(), g.last, g.last_ts_ms]


def _gauge_of(v: list[Any]) -> Gauge:
    g = Gauge()
    g.stat = Stat.from_list(v[:3])
    g.last, g.last_ts_ms = v[3], int(v[4])
    return g


def _gauge_point(g: Gauge) -> dict[str, Any]:
    return {"mean": g.stat.mean(), "max": g.stat.max, "last": g.last}
