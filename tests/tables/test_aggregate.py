"""Digest and Aggregate: serialization, tdigest interoperability, exact merges."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest
from tdigest import TDigest as PyTDigest

from tables.aggregate import Aggregate, BucketKey, fit_record
from tables.digest import Digest


def test_digest_dict_is_readable_by_the_tdigest_package_and_back() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(3, 1) for _ in range(5000)]
    d = Digest(200)
    d.add_many(values)
    py = PyTDigest()
    py.update_from_dict(d.to_dict())
    assert abs(py.percentile(50) - np.quantile(values, 0.5)) / np.quantile(values, 0.5) < 0.02
    back = Digest.from_dict(py.to_dict(), 200)  # tdigest's own dict form
    assert back.count == 5000
    p95 = back.quantile(0.95)
    assert p95 is not None and abs(p95 - np.quantile(values, 0.95)) / np.quantile(values, 0.95) < 0.02


def test_merged_minutes_give_the_percentiles_of_all_observations() -> None:
    rng = random.Random(5)
    key = BucketKey("shop", "web", 0)
    hour = Aggregate(key, resolution_s=3600)
    everything: list[float] = []
    for minute in range(60):
        agg = Aggregate(BucketKey("shop", "web", minute * 60_000))
        for _ in range(500):
            v = rng.lognormvariate(3, 0.8)
            everything.append(v)
            agg.add_request(503 if v > 200 else 200, v, "H12" if v > 400 else None)
        # through the wire format, as the rollup and query paths see it
        hour.merge(Aggregate.from_record(orjson.loads(orjson.dumps(agg.to_record()))))
    arr = np.asarray(everything)
    s = hour.summary()
    assert s["requests"] == 30_000 and s["response_ms"]["max"] == arr.max()
    assert s["failed"] == int((arr > 200).sum()) and s["errors"].get("H12", 0) == int((arr > 400).sum())
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        exact = float(np.quantile(arr, q))
        assert abs(s["response_ms"][name] - exact) <= 0.01 * exact, name


def test_record_round_trip_keeps_every_section() -> None:
    agg = Aggregate(BucketKey("shop", "web", 60_000), max_centroids=50)
    agg.add_request(200, 12.0, None)
    agg.add_request(404, 3.0, None)
    agg.add_runtime(100.0, 1.0, 120.0, 512.0, 0.7)
    agg.add_metric("db.query_ms", "timer", 4.0, 60_001)
    agg.add_metric("jobs", "counter", 3.0, 60_002)
    agg.add_metric("queue", "gauge", 9.0, 60_003)
    agg.offset = 41
    again = Aggregate.from_record(orjson.loads(orjson.dumps(agg.to_record())))
    assert again.summary() == agg.summary()
    assert again.offset == 41 and again.max_centroids == 50


def test_integer_latencies_give_numpy_exact_percentiles_in_exact_mode() -> None:
    """Router times are integer ms: few distinct values, so percentiles are exact, even after merges."""
    rng = np.random.default_rng(11)
    values = np.floor(rng.lognormal(3, 0.8, 50_000))
    parts = [Digest() for _ in range(5)]
    for part, chunk in zip(parts, np.array_split(values, 5), strict=True):
        part.add_many(chunk.tolist())
    merged = Digest.from_dict(orjson.loads(orjson.dumps(parts[0].to_dict())))
    for part in parts[1:]:
        merged.merge(Digest.from_dict(orjson.loads(orjson.dumps(part.to_dict()))))
    assert merged.exact and merged.count == 50_000
    for q in (0.5, 0.95, 0.99, 0.999):
        assert merged.quantile(q) == float(np.quantile(values, q))
    py = PyTDigest()
    py.update_from_dict(merged.to_dict())  # the exact form is still tdigest's centroid list
    assert abs(py.percentile(95) - np.quantile(values, 0.95)) <= 0.02 * np.quantile(values, 0.95)


def test_many_distinct_values_switch_to_a_bounded_tdigest() -> None:
    d = Digest(max_centroids=200, exact_limit=500)
    rng = random.Random(2)
    d.add_many(rng.lognormvariate(3, 1) for _ in range(20_000))
    assert d.count == 20_000 and not d.exact
    # fastdigest bounds the centroid count approximately (k-scale merging), far below 20,000 distinct values
    assert len(d.to_dict()["centroids"]) <= 1.1 * 200


@pytest.mark.parametrize("repeats", [False, True], ids=["mostly-distinct", "repeated-values"])
def test_switch_to_tdigest_keeps_percentiles_within_one_percent(repeats: bool) -> None:
    """Both conversions (feeding the values, or their value/count centroids) stay accurate."""
    rng = np.random.default_rng(5)
    values = rng.lognormal(6, 0.7, 60_000)
    values = np.floor(values) if repeats else np.round(values, 2)
    d = Digest(max_centroids=1000, exact_limit=500)
    d.add_many(values.tolist())
    assert d.count == 60_000 and not d.exact
    for q in (0.5, 0.95, 0.99):
        want = float(np.quantile(values, q))
        assert abs((d.quantile(q) or 0.0) - want) <= 0.01 * want


# --- a minute within a byte budget (security review C2) -------------------------------------------------

def _big_minute(timers: int, values: int, *, counters: int = 0) -> Aggregate:
    rng = random.Random(5)
    agg = Aggregate(BucketKey("big", "web", 1_764_000_000_000))
    agg.add_request(200, 12.0, None)
    for t in range(timers):
        for _ in range(values):
            agg.add_metric(f"timer.{t}", "timer", rng.uniform(0, 10_000), 1_764_000_000_001)
    for c in range(counters):
        agg.add_metric(f"count.{c}", "counter", 1.0, 1_764_000_000_001)
    return agg


def test_a_minute_within_budget_is_sent_as_it_is() -> None:
    agg = _big_minute(2, 100)
    fit = fit_record(agg.to_record(), 900 * 1024)
    assert not fit.degraded and fit.value == orjson.dumps(agg.to_record()) and fit.size == len(fit.value)


def test_over_budget_exact_values_become_digests_first_counts_stay_exact() -> None:
    agg = _big_minute(12, 4_000)
    rec = agg.to_record()
    fit = fit_record(rec, 900 * 1024)
    assert fit.size > 1024 * 1024 and len(fit.value) <= 900 * 1024
    assert fit.degraded and not fit.dropped and fit.digests_compressed >= 1
    assert rec == agg.to_record()  # the window's own record is untouched
    back = Aggregate.from_record(orjson.loads(fit.value))
    assert set(back.timers) == set(agg.timers)
    for name, t in agg.timers.items():
        got = back.timers[name]
        assert (got.n, got.sum, got.max) == (t.n, t.sum, t.max)
        exact = t.digest.quantile(0.99)
        assert exact is not None and abs((got.digest.quantile(0.99) or 0) - exact) <= 0.02 * exact


def test_still_over_budget_drops_the_largest_names_and_says_which() -> None:
    agg = _big_minute(40, 300, counters=5)
    fit = fit_record(agg.to_record(), 40 * 1024)
    assert len(fit.value) <= 40 * 1024
    out = orjson.loads(fit.value)
    dropped = {name for kind, name, _ in fit.dropped if kind == "metric"}
    assert dropped and dropped <= set(agg.timers)  # timers are the largest: counters stay
    assert set(out["tim"]) == set(agg.timers) - dropped and len(out["cnt"]) == 5
    assert out["resp"]["n"] == 1 and out["st"] == [0, 1, 0, 0, 0]


def test_a_tiny_budget_keeps_the_key_and_request_counts() -> None:
    agg = _big_minute(3, 2_000)
    agg.errors = {f"H{i}": 1 for i in range(400)}
    fit = fit_record(agg.to_record(), 3_000)
    out = orjson.loads(fit.value)
    assert len(fit.value) <= 3_000 and (out["app"], out["proc"], out["st"]) == ("big", "web", [0, 1, 0, 0, 0])
    assert {k for k, _, _ in fit.dropped} >= {"metric", "errors"}
