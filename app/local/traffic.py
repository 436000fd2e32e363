"""Generated traffic with exact ground truth: demo data for ``make run``, input for tests and benchmarks.

``realistic=True`` (the load generator's) adds what a real drain carries, each exactly the observation
app/ingest/logplex.py makes of its line, so both loadgen modes share one truth; without it every request is
served (older tests rely on that).
Reference: docs/ingest.md#load-generator
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.models import APP_SERIES

Key = tuple[str, str, int]
"""(app, process type, minute start ms)"""

QUOTA_MB = 512.0
ADDON_SOURCE = "DATABASE"
_MB = 1 / 1048576  # bytes -> MB, as the drain parser converts (a power of two: exact)
_KB = 1 / 1024  # kB -> MB


def key_of(o: dict[str, Any]) -> Key:
    """The (app, process type, minute) an observation is aggregated under (tables/windows.py)."""
    if o["kind"] == "addon":
        proc = APP_SERIES
    else:
        dyno = o["dyno"]
        proc = "web" if dyno == "router" else dyno.split(".")[0]
    return o["app"], proc, o["ts"] - o["ts"] % 60_000


def gauge_last(points: list[tuple[int, float]]) -> float:
    """A gauge's last sample of [(ts, value)] in sending order: the latest by event time, the later sent on a
    tie (tables/aggregate.py Gauge)."""
    best_ts, best = points[0]
    for ts, v in points[1:]:
        if ts >= best_ts:
            best_ts, best = ts, v
    return best


def _counts() -> defaultdict[str, int]:
    return defaultdict(int)


@dataclass
class Truth:
    """Exact aggregates of what was generated, per (app, process type, minute start ms)."""

    requests: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    """Every router request, served or not."""
    service_ms: dict[Key, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Service times of the requests a dyno served (the router's own answers have none)."""
    failed: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[Key, dict[str, int]] = field(default_factory=lambda: defaultdict(_counts))
    rss_max: dict[Key, float] = field(default_factory=dict)
    platform: dict[Key, dict[str, int]] = field(default_factory=lambda: defaultdict(_counts))
    """Platform event name (R14, release, ...) -> count."""
    addons: dict[Key, dict[str, dict[str, list[tuple[int, float]]]]] = field(default_factory=dict)
    """Add-on source -> sample name -> [(ts, value)] in generation order."""
    counters: dict[Key, dict[str, float]] = field(default_factory=dict)
    timers: dict[Key, dict[str, list[float]]] = field(default_factory=dict)
    gauges: dict[Key, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    def add(self, o: dict[str, Any]) -> None:
        key = key_of(o)
        kind = o["kind"]
        if kind == "router":
            self.requests[key] += 1
            if o.get("service_ms") is not None:
                self.service_ms[key].append(o["service_ms"])
            if o["status"] >= 500:
                self.failed[key] += 1
            if o.get("code"):
                self.errors[key][o["code"]] += 1
        elif kind == "runtime":
            self.rss_max[key] = max(self.rss_max.get(key, 0.0), o["memory_rss_mb"])
        elif kind == "event":
            self.platform[key][o["name"]] += 1
        elif kind == "addon":
            sources = self.addons.setdefault(key, {}).setdefault(o["source"], {})
            for name, v in o["samples"].items():
                sources.setdefault(name, []).append((o["ts"], v))
        elif kind == "metric":
            if o["type"] == "counter":
                c = self.counters.setdefault(key, {})
                c[o["name"]] = c.get(o["name"], 0.0) + o["value"]
            elif o["type"] == "timer":
                self.timers.setdefault(key, {}).setdefault(o["name"], []).append(o["value"])
            else:
                self.gauges.setdefault(key, {}).setdefault(o["name"], []).append((o["ts"], o["value"]))
        else:
            raise ValueError(f"unknown observation kind {kind!r}")

    def keys(self) -> set[Key]:
        """Every (app, process type, minute) something was generated for: the minutes the pipeline stores."""
        out: set[Key] = set(self.rss_max)
        for d in (self.requests, self.platform, self.addons, self.counters, self.timers, self.gauges):
            out.update(k for k, v in d.items() if v)  # not a key a reader's lookup added to a defaultdict
        return out


class Generator:
    def __init__(self, *, apps: int = 3, dynos: int = 2, seed: int = 1, start_ms: int | None = None,
                 keep_truth: bool = False, realistic: bool = False) -> None:
        self.rng = random.Random(seed)
        self.apps = [f"app-{i}" for i in range(apps)]
        self.dynos = [f"web.{i + 1}" for i in range(dynos)] + ["worker.1"]
        self.now_ms = start_ms if start_ms is not None else int(time.time() * 1000)
        self.start_ms = self.now_ms
        self.realistic = realistic
        self.truth = Truth() if keep_truth else None
        self._next_sample_ms: dict[tuple[str, str], int] = {}
        self._db_bytes: dict[str, int] = {}

    def router(self, app: str, ts: int) -> dict[str, Any]:
        r = self.rng.random()
        code: str | None = None
        connect: float | None = 1.0
        nbytes: int | None = 415
        if r < 0.005:
            status, svc, code, dyno = 503, 30000.0, "H12", self.rng.choice(self.dynos[:-1])
        elif r < 0.008:  # the dyno closed the connection without answering: a short service time, no body
            status, svc, code, dyno = 503, round(self.rng.uniform(0, 5), 1), "H13", self.rng.choice(self.dynos[:-1])
            nbytes = 0
        elif self.realistic and r < 0.011:  # the router answered itself: no dyno, no times, no bytes
            code = "H10" if self.rng.random() < 0.5 else "H14"
            return {"kind": "router", "app": app, "dyno": "router", "ts": ts, "status": 503, "service_ms": None,
                    "connect_ms": None, "bytes": None, "code": code}
        else:
            dyno = self.rng.choice(self.dynos[:-1])
            svc = round(self.rng.lognormvariate(3.0, 0.8), 2)
            status = 500 if r < 0.02 else 404 if r < 0.06 else 302 if r < 0.08 else 200
        return {"kind": "router", "app": app, "dyno": dyno, "ts": ts, "status": status, "service_ms": svc,
                "connect_ms": connect, "bytes": nbytes, "code": code}

    def _rss_mb(self, dyno: str, ts: int) -> float:
        """Mostly 100..400 MB; realistic: 2 % of samples above the quota, and web.1 always at 40 s in (so even
        a short run has an R14)."""
        if self.realistic and (self.rng.random() < 0.02 or (dyno == self.dynos[0] and ts - self.start_ms == 40_000)):
            return round(self.rng.uniform(QUOTA_MB + 1, 640), 2)
        return round(self.rng.uniform(100, 400), 2)

    def _due(self, app: str, what: str, first_ms: int, step_ms: int | None, end_ms: int) -> list[int]:
        """Event times of a periodic (or, step None, one-off) line that fall before end_ms, each once."""
        due = self._next_sample_ms.get((app, what), first_ms)
        out: list[int] = []
        while due < end_ms:
            out.append(due)
            due = due + step_ms if step_ms is not None else sys.maxsize
        self._next_sample_ms[(app, what)] = due
        return out

    def _extras(self, app: str, end_ms: int) -> list[dict[str, Any]]:
        """l2met metrics from web.1 every second, a Postgres metrics line every minute, one release."""
        out: list[dict[str, Any]] = []
        web1 = self.dynos[0]
        for ts in self._due(app, "l2met", self.start_ms + 500, 1000, end_ms):
            out += [{"kind": "metric", "app": app, "dyno": web1, "ts": ts, "name": "orders.created", "type": "counter",
                     "value": float(self.rng.randint(0, 4))},
                    {"kind": "metric", "app": app, "dyno": web1, "ts": ts, "name": "checkout", "type": "timer",
                     "value": round(self.rng.lognormvariate(4.5, 0.4), 1)},
                    {"kind": "metric", "app": app, "dyno": web1, "ts": ts, "name": "queue.depth", "type": "gauge",
                     "value": float(self.rng.randint(0, 30))}]
        for ts in self._due(app, "addon", self.start_ms + 15_000, 60_000, end_ms):
            db = self._db_bytes.get(app)
            db = self.rng.randint(200, 2000) * 1048576 if db is None else db + self.rng.randint(0, 5_000_000)
            self._db_bytes[app] = db
            out.append({"kind": "addon", "app": app, "ts": ts, "source": ADDON_SOURCE,
                        "addon": f"postgresql-shaped-{zlib.crc32(app.encode()) % 90000 + 10000}",
                        "samples": {"current_transaction": float(self.rng.randint(1000, 90000)),
                                    "db_size_mb": db * _MB,
                                    "tables": 12.0,
                                    "active_connections": float(self.rng.randint(3, 40)),
                                    "waiting_connections": 0.0,
                                    "index_cache_hit_rate": round(self.rng.uniform(0.95, 1.0), 4),
                                    "load_avg_1m": round(self.rng.uniform(0, 2), 2),
                                    "memory_total_mb": 4045000 * _KB,
                                    "memory_free_mb": self.rng.randint(200_000, 2_000_000) * _KB}})
        for ts in self._due(app, "release", self.start_ms + 30_000, None, end_ms):
            out.append({"kind": "event", "app": app, "dyno": APP_SERIES, "ts": ts, "name": "release"})
        return out

    def batch(self, app: str, n: int, span_ms: int) -> list[dict[str, Any]]:
        """n router observations spread over the next span_ms of event time, plus due runtime samples (and,
        realistic, the R14s, add-on metrics, releases and l2met metrics due)."""
        out = [self.router(app, self.now_ms + (i * span_ms) // max(n, 1)) for i in range(n)]
        end_ms = self.now_ms + span_ms
        for dyno in self.dynos:
            due = self._next_sample_ms.get((app, dyno), self.now_ms)
            while due < end_ms:
                rss = self._rss_mb(dyno, due)
                out.append({"kind": "runtime", "app": app, "dyno": dyno, "ts": due,
                            "memory_rss_mb": rss,
                            "memory_swap_mb": 0.0, "memory_total_mb": 420.0 if rss <= 400 else round(rss + 20, 2),
                            "memory_quota_mb": QUOTA_MB,
                            "load_avg_1m": round(self.rng.uniform(0, 2), 2)})
                if self.realistic and rss > QUOTA_MB:
                    out.append({"kind": "event", "app": app, "dyno": dyno, "ts": due, "name": "R14"})
                due += 20_000
            self._next_sample_ms[(app, dyno)] = due
        if self.realistic:
            out += self._extras(app, end_ms)
        if self.truth is not None:
            for o in out:
                self.truth.add(o)
        return out

    def messages(self, *, per_message: int, span_ms: int) -> Iterator[tuple[bytes, bytes]]:
        """One message per app covering span_ms of event time, then the clock moves on by span_ms."""
        while True:
            for app in self.apps:
                yield app.encode(), orjson.dumps(self.batch(app, per_message, span_ms))
            self.now_ms += span_ms


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Send messages with acks=all and wait for every acknowledgement."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        futs = [await producer.send(topic, value=v, key=k) for k, v in messages]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
