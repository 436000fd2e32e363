"""One tenant at the limits, on the real broker, next to others on the same partition (security review C2, H1).

A minute over the broker's message size used to crash the worker on send, and its restart rebuilt the same
minute (a crash loop for every app of the partition); any ``dyno=`` value was a new series. Here the worker
must stay up, emit the big minute degraded within METRICS_MINUTE_MAX_BYTES (or with names dead-lettered),
refuse what is past the per-app limits with dead-letter reasons, and keep every other app's minutes exact.
The figures printed (peak RSS, minute sizes, minutes emitted) go to docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.traffic import Generator
from tables.aggregate import Aggregate
from tests.integration.pipeline import (
    Pipeline,
    check_against_truth,
    peak_rss_mb,
    produce_to_partition,
    read_topic,
    wait_truth_stored,
)

pytestmark = pytest.mark.integration

PARTITION = 0


def _others(start_ms: int) -> tuple[Generator, list[tuple[bytes, bytes]]]:
    """Normal traffic of three other apps over four minutes from ``start_ms``, with its truth."""
    gen = Generator(apps=3, dynos=2, seed=11, start_ms=start_ms, keep_truth=True, realistic=True)
    msgs = gen.messages(per_message=300, span_ms=10_000)
    return gen, [next(msgs) for _ in range(3 * 6 * 4)]


def _chunks(app: str, obs: list[dict[str, Any]], per_message: int) -> list[tuple[bytes, bytes]]:
    return [(app.encode(), orjson.dumps(obs[i:i + per_message])) for i in range(0, len(obs), per_message)]


def test_a_minute_of_12_timers_x_4000_distinct_values_is_emitted_degraded(broker: KafkaBroker, dynamo: DynamoServer,
                                                                         tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - now_ms % 60_000 - 6 * 60_000
    rng = random.Random(3)
    big: list[dict[str, Any]] = [
        {"kind": "metric", "app": "big", "dyno": "web.1", "ts": start_ms + 1_000 + i, "name": f"timer.{t}",
         "type": "timer", "value": rng.uniform(0, 10_000)} for t in range(12) for i in range(4_000)]
    gen, others = _others(start_ms)
    p.start(data_dir=tmp_path / "state")
    assert p.proc is not None
    worker = p.proc
    try:
        asyncio.run(produce_to_partition(broker.address, p.settings.kafka.observations_topic, PARTITION,
                                         _chunks("big", big, 1_000) + others))
        assert gen.truth is not None
        stored = wait_truth_stored(p, gen.truth, start_ms, 180)
        generated = gen.truth.keys()  # Truth is no mapping: keys() computes the set
        check_against_truth({k: v for k, v in stored.items() if k in generated}, gen.truth)
        stats = p.wait_stats(lambda s: s["minutes_degraded"] >= 1, 60, "the big minute degraded")
        minute = p.stored(["big"], ["web"], start_ms // 1000, start_ms // 1000 + 3600)
        assert list(minute) == [("big", "web", start_ms)], minute.keys()
        rec = minute[("big", "web", start_ms)]
        size = len(orjson.dumps(rec))
        assert size <= p.settings.windows.minute_max_bytes
        agg = Aggregate.from_record(rec)
        # Whatever was kept is exact in count, sum and max; what was left out is in the DLQ with a reason.
        kept = set(agg.timers)
        for name in kept:
            values = [o["value"] for o in big if o["name"] == name]
            t = agg.timers[name]
            assert (t.n, t.max) == (4_000, max(values)), name
            assert abs(t.sum - sum(values)) <= 1e-9 * sum(values)
        dead = [d for d in read_topic(broker.address, p.settings.kafka.dlq_topic, min_records=12 - len(kept))
                if d["app"] == "big"]
        assert {d["record"]["metric"] for d in dead} == {f"timer.{t}" for t in range(12)} - kept
        assert all("minute over" in d["reason"] for d in dead)
        undegraded = len(orjson.dumps(_exact_minute(big, start_ms).to_record()))
        print(f"\nbig minute: {undegraded} bytes exact -> {size} bytes emitted ({len(kept)} of 12 timers kept, "
              f"{stats['minutes_degraded']} degraded); worker peak RSS {peak_rss_mb(worker.pid):.0f} MB; "
              f"{stats['minutes_emitted']} minutes emitted")
        assert undegraded > 1024 * 1024  # the case the broker would have refused
        assert worker.poll() is None  # never crashed
    finally:
        p.stop()


def _exact_minute(obs: list[dict[str, Any]], start_ms: int) -> Aggregate:
    from tables.aggregate import BucketKey

    agg = Aggregate(BucketKey("big", "web", start_ms))
    for o in obs:
        agg.add_metric(o["name"], "timer", o["value"], o["ts"])
    return agg


def test_50k_process_types_and_50k_metric_names_are_refused_past_the_limits(broker: KafkaBroker,
                                                                           dynamo: DynamoServer,
                                                                           tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - now_ms % 60_000 - 6 * 60_000
    n = 50_000
    routers: list[dict[str, Any]] = [
        {"kind": "router", "app": "flood", "dyno": f"p{i}.1", "ts": start_ms + 1_000 + i % 50_000, "status": 200,
         "service_ms": 5.0, "connect_ms": 1.0, "bytes": 10, "code": None} for i in range(n)]
    metrics: list[dict[str, Any]] = [
        {"kind": "metric", "app": "flood", "dyno": "p0.1", "ts": start_ms + 2_000 + i % 50_000, "name": f"user.{i}",
         "type": "counter", "value": 1.0} for i in range(n)]
    gen, others = _others(start_ms)
    p.start(data_dir=tmp_path / "state")
    assert p.proc is not None
    worker = p.proc
    try:
        rss_before = peak_rss_mb(worker.pid)
        t0 = time.monotonic()
        asyncio.run(produce_to_partition(broker.address, p.settings.kafka.observations_topic, PARTITION,
                                         _chunks("flood", metrics[:1_000], 500) + _chunks("flood", routers, 500)
                                         + _chunks("flood", metrics[1_000:], 500) + others))
        assert gen.truth is not None
        stored = wait_truth_stored(p, gen.truth, start_ms, 180)
        generated = gen.truth.keys()  # Truth is no mapping: keys() computes the set
        check_against_truth({k: v for k, v in stored.items() if k in generated}, gen.truth)
        s = p.wait_stats(lambda s: s["limit_refused_process_types"] >= n - 50
                         and s["limit_refused_metric_names"] >= n - 100, 60, "the refusals counted")
        elapsed_s = time.monotonic() - t0
        limits = p.settings
        assert s["limit_refused_process_types"] == n - limits.limits.process_types
        assert s["limit_refused_metric_names"] == n - limits.limits.max_metric_names
        procs = [f"p{i}" for i in range(limits.limits.process_types + 1)]
        flood = p.stored(["flood"], procs, start_ms // 1000, start_ms // 1000 + 3600)
        assert {proc for _, proc, _ in flood} == set(procs[:-1])  # exactly the first 50 process types
        assert len(flood[("flood", "p0", start_ms)].get("cnt", {})) == limits.limits.max_metric_names
        dead = [d for d in read_topic(broker.address, p.settings.kafka.dlq_topic, min_records=200)
                if d["app"] == "flood"]
        reasons = [d["reason"] for d in dead]
        # The first 100 refusals per limit and minute are dead-lettered with their reason, the rest counted.
        assert sum("process types in minute" in r for r in reasons) == 100
        assert sum("custom metric names in minute" in r for r in reasons) == 100
        assert sum("only counted" in r for r in reasons) == 2
        print(f"\nflood: {n} process types + {n} metric names in one minute: {s['limit_refused_process_types']} + "
              f"{s['limit_refused_metric_names']} refused, {len(dead)} dead letters; worker peak RSS "
              f"{peak_rss_mb(worker.pid):.0f} MB (at start {rss_before:.0f} MB); {s['minutes_emitted']} minutes "
              f"emitted; all stored in {elapsed_s:.1f} s")
        assert worker.poll() is None
    finally:
        p.stop()
