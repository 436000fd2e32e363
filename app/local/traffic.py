"""Generated traffic with exact ground truth: demo data for ``make run``, input for tests and benchmarks.

Router requests have lognormal service times and a status mix with 4xx/5xx and H12/H13 errors; each dyno
sends a runtime sample every 20 s. Messages are arrays of one app's observations (the batched form).
app/local/loadgen.py builds the Heroku-style load generator (drain/HTTP mode, progress bar) on this.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import orjson


@dataclass
class Truth:
    """Exact aggregates of what was generated, per (app, process type, minute start ms)."""

    service_ms: dict[tuple[str, str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[tuple[str, str, int], dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    rss_max: dict[tuple[str, str, int], float] = field(default_factory=dict)

    def add(self, o: dict[str, Any]) -> None:
        key = (o["app"], "web" if o["dyno"] == "router" else o["dyno"].split(".")[0], o["ts"] - o["ts"] % 60_000)
        if o["kind"] == "router":
            self.service_ms[key].append(o["service_ms"])
            if o["status"] >= 500:
                self.failed[key] += 1
            if o["code"]:
                self.errors[key][o["code"]] += 1
        elif o["kind"] == "runtime":
            self.rss_max[key] = max(self.rss_max.get(key, 0.0), o["memory_rss_mb"])


class Generator:
    def __init__(self, *, apps: int = 3, dynos: int = 2, seed: int = 1, start_ms: int | None = None,
                 keep_truth: bool = False) -> None:
        self.rng = random.Random(seed)
        self.apps = [f"app-{i}" for i in range(apps)]
        self.dynos = [f"web.{i + 1}" for i in range(dynos)] + ["worker.1"]
        self.now_ms = start_ms if start_ms is not None else int(time.time() * 1000)
        self.truth = Truth() if keep_truth else None
        self._next_sample_ms: dict[tuple[str, str], int] = {}

    def router(self, app: str, ts: int) -> dict[str, Any]:
        r = self.rng.random()
        code: str | None = None
        if r < 0.005:
            status, svc, code, dyno = 503, 30000.0, "H12", self.rng.choice(self.dynos[:-1])
        elif r < 0.008:
            status, svc, code, dyno = 503, round(self.rng.uniform(0, 5), 1), "H13", "router"
        else:
            dyno = self.rng.choice(self.dynos[:-1])
            svc = round(self.rng.lognormvariate(3.0, 0.8), 2)
            status = 500 if r < 0.02 else 404 if r < 0.06 else 302 if r < 0.08 else 200
        return {"kind": "router", "app": app, "dyno": dyno, "ts": ts, "status": status, "service_ms": svc,
                "connect_ms": 1.0, "bytes": 415, "code": code}

    def batch(self, app: str, n: int, span_ms: int) -> list[dict[str, Any]]:
        """n router observations spread over the next span_ms of event time, plus due runtime samples."""
        out = [self.router(app, self.now_ms + (i * span_ms) // max(n, 1)) for i in range(n)]
        end_ms = self.now_ms + span_ms
        for dyno in self.dynos:
            due = self._next_sample_ms.get((app, dyno), self.now_ms)
            while due < end_ms:
                out.append({"kind": "runtime", "app": app, "dyno": dyno, "ts": due,
                            "memory_rss_mb": round(self.rng.uniform(100, 400), 2),
                            "memory_swap_mb": 0.0, "memory_total_mb": 420.0, "memory_quota_mb": 512.0,
                            "load_avg_1m": round(self.rng.uniform(0, 2), 2)})
                due += 20_000
            self._next_sample_ms[(app, dyno)] = due
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
