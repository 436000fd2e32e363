"""The load generator (app/local/traffic.py, app/local/loadgen.py): what kafka mode sends is exactly what the
drain parser makes of the lines drain mode renders, the truth keeps request counts apart from service times,
and the integration tests' check (tests/integration/pipeline.py check_against_truth) holds for both forms
when they go through the real aggregation windows."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from app import models
from app.clock import ManualClock
from app.ingest.logplex import parse_frame
from app.local import loadgen
from app.local.traffic import Generator, Truth
from tables.windows import IngestResult, PartitionWindows
from tests.integration.pipeline import check_against_truth

START = 1_793_614_440_000  # a minute start (2026-11-02T10:14:00Z)
SECONDS = 150


def generated(*, realistic: bool = True, apps: int = 2, seconds: int = SECONDS, per_s: int = 100,
              seed: int = 5) -> tuple[Generator, list[list[dict[str, Any]]]]:
    """What ``loadgen.run`` sends: one batch per app and second, as a log line carries it."""
    gen = Generator(apps=apps, dynos=2, seed=seed, start_ms=START, realistic=realistic)
    batches = []
    for _ in range(seconds):
        for app in gen.apps:
            batches.append([loadgen.as_logged(o) for o in gen.batch(app, per_s, 1000)])
        gen.now_ms += 1000
    return gen, batches


def as_parsed(o: dict[str, Any]) -> list[dict[str, Any]]:
    """The observations the drain makes of ``render(o)``: a runtime sample is two lines (load, memory)."""
    if o["kind"] != "runtime":
        return [o]
    head = {k: o[k] for k in ("kind", "app", "dyno", "ts")}
    return [{**head, "load_avg_1m": o["load_avg_1m"]},
            {**head, **{k: o[k] for k in ("memory_total_mb", "memory_rss_mb", "memory_swap_mb", "memory_quota_mb")}}]


def test_every_kind_is_generated() -> None:
    _, batches = generated()
    kinds = Counter((o["kind"], o.get("code") if o["kind"] == "router" else o.get("name") or o.get("source"))
                    for b in batches for o in b)
    for kind in [("router", None), ("router", "H10"), ("router", "H14"), ("router", "H12"), ("router", "H13"),
                 ("runtime", None), ("event", "R14"), ("event", "release"), ("addon", "DATABASE"),
                 ("metric", "orders.created"), ("metric", "checkout"), ("metric", "queue.depth")]:
        assert kinds[kind] > 0, (kind, kinds)
    routers = sum(n for (k, _), n in kinds.items() if k == "router")
    unserved = kinds[("router", "H10")] + kinds[("router", "H14")]
    assert 0.001 < unserved / routers < 0.006  # ~0.3 %
    assert kinds[("event", "release")] == 2 and kinds[("addon", "DATABASE")] == 2 * 3  # per app: once; a minute
    assert kinds[("metric", "checkout")] == 2 * SECONDS  # per app: a second
    for b in batches:
        for o in b:
            if o["kind"] == "router" and o["code"] in ("H10", "H14"):
                assert (o["dyno"], o["status"], o["service_ms"], o["connect_ms"], o["bytes"]) == (
                    "router", 503, None, None, None)
            elif o["kind"] == "router":
                assert o["dyno"].startswith("web.") and o["service_ms"] is not None
            elif o["kind"] == "runtime" and o["memory_rss_mb"] > o["memory_quota_mb"]:
                assert {"kind": "event", "app": o["app"], "dyno": o["dyno"], "ts": o["ts"], "name": "R14"} in b


def test_kafka_form_equals_what_the_drain_parser_makes_of_the_rendered_lines() -> None:
    _, batches = generated()
    for obs in batches:
        app = obs[0]["app"]
        p = parse_frame(loadgen.frame(loadgen.render_batch(obs)), app)  # l2met metrics share a line
        releases = sum(o["kind"] == "event" and o["name"] == "release" for o in obs)
        # A release renders as Heroku logs a deploy: a "Deploy" line (ignored) beside "Release vN created".
        assert not p.bad and p.ignored == releases, (p.bad[:3], p.ignored)
        assert p.observations == [x for o in obs for x in as_parsed(o)]
        for o in obs[-40:]:  # one observation alone renders to lines of its own (the router's: the fast path)
            one = parse_frame(loadgen.frame(loadgen.render(o)), app)
            release = o["kind"] == "event" and o["name"] == "release"
            assert one.observations == as_parsed(o) and not one.bad and one.ignored == release, (o, one)


def test_router_answer_is_rendered_with_empty_fields() -> None:
    o = {"kind": "router", "app": "shop", "dyno": "router", "ts": START, "status": 503, "service_ms": None,
         "connect_ms": None, "bytes": None, "code": "H10"}
    (line,) = loadgen.render(o)
    assert b'at=error code=H10 desc="App crashed" method=GET' in line
    assert line.endswith(b" dyno= connect= service= status=503 bytes= protocol=https")
    assert parse_frame(loadgen.frame([line]), "shop").observations == [o]


def test_kafka_form_passes_the_contract() -> None:
    _, batches = generated(seconds=70)
    for obs in batches:
        decoded = models.decode(orjson.dumps(obs), 1 << 24)
        assert isinstance(decoded, models.Decoded) and not decoded.rejects and decoded.indexes is None


def test_truth_counts_requests_apart_from_service_times() -> None:
    gen = Generator(apps=1, dynos=2, seed=3, start_ms=START, keep_truth=True, realistic=True)
    obs = []
    for _ in range(60):
        obs += gen.batch("app-0", 200, 1000)
        gen.now_ms += 1000
    assert gen.truth is not None
    key = ("app-0", "web", START)
    routers = [o for o in obs if o["kind"] == "router"]
    assert gen.truth.requests[key] == len(routers) == 60 * 200
    assert gen.truth.service_ms[key] == [o["service_ms"] for o in routers if o["service_ms"] is not None]
    assert len(gen.truth.service_ms[key]) < len(routers)
    assert sum(gen.truth.errors[key][c] for c in ("H10", "H14")) == len(routers) - len(gen.truth.service_ms[key])
    assert gen.truth.platform[("app-0", "app", START)] == {"release": 1}
    assert gen.truth.platform[key]["R14"] >= 1  # web.1 is above its quota 40 s in
    assert set(gen.truth.addons[("app-0", "app", START)]) == {"DATABASE"}
    assert len(gen.truth.timers[key]["checkout"]) == 60


def test_plain_generator_serves_every_request() -> None:
    """Without ``realistic`` (the tests that produce with Generator directly): only router and runtime
    observations, each request with a service time, so a minute's requests equal its service-time list."""
    gen = Generator(apps=2, dynos=2, seed=7, start_ms=START, keep_truth=True)
    msgs = gen.messages(per_message=500, span_ms=10_000)
    obs = [o for _ in range(2 * 12) for o in orjson.loads(next(msgs)[1])]
    assert {o["kind"] for o in obs} == {"router", "runtime"}
    assert all(o["service_ms"] is not None for o in obs if o["kind"] == "router")
    assert gen.truth is not None and not gen.truth.platform and not gen.truth.addons
    assert {k: len(v) for k, v in gen.truth.service_ms.items()} == dict(gen.truth.requests)


def windows_of(batches: list[list[dict[str, Any]]], end_ms: int) -> dict[tuple[str, str, int], Any]:
    """The observation messages through one partition's aggregation windows -> stored records by key."""
    pw = PartitionWindows(0, clock=ManualClock(end_ms), grace_ms=10_000, idle_timeout_ms=30_000,
                          max_future_ms=300_000, max_message_bytes=8_000_000, max_centroids=100)
    result = IngestResult()
    for offset, value in enumerate(batches):
        pw.ingest(offset, orjson.dumps(value), result)
    assert not result.dead, result.dead[:3]
    return {key: orjson.loads(orjson.dumps(agg.to_record())) for key, agg in pw.windows.items()}


@pytest.mark.parametrize("mode", ["kafka", "drain"])
def test_both_forms_aggregate_to_the_truth(mode: str) -> None:
    gen, batches = generated(seconds=130)
    truth = Truth()
    for obs in batches:
        for o in obs:
            truth.add(o)
    if mode == "drain":
        batches = [parse_frame(loadgen.frame(loadgen.render_batch(obs)), obs[0]["app"]).observations
                   for obs in batches]
    stored = windows_of(batches, gen.now_ms)
    assert set(stored) == truth.keys()
    assert {k[1] for k in stored} == {"web", "worker", "app"}
    check_against_truth(stored, truth)
    broken = dict(stored)
    key = next(k for k in truth.platform if k[1] == "web")
    rec = dict(broken[key])
    rec["plat"] = {**rec["plat"], "R14": rec["plat"]["R14"] + 1}
    broken[key] = rec
    with pytest.raises(AssertionError):
        check_against_truth(broken, truth)


def test_a_minute_without_a_served_request() -> None:
    truth = Truth()
    for i in range(3):
        truth.add({"kind": "router", "app": "a", "dyno": "router", "ts": START + i, "status": 503,
                   "service_ms": None, "connect_ms": None, "bytes": None, "code": "H14"})
    key = ("a", "web", START)
    assert truth.requests[key] == 3 and not truth.service_ms.get(key)
    assert loadgen.truth_table(truth) == {f"a|web|{START // 1000}": {"requests": 3, "failed": 3,
                                                                      "errors": {"H14": 3}}}
    stored = windows_of([[{"kind": "router", "app": "a", "dyno": "router", "ts": START + i, "status": 503,
                           "service_ms": None, "code": "H14"} for i in range(3)]], START + 1000)
    check_against_truth(stored, truth)


def test_truth_table_is_json_with_every_section() -> None:
    gen = Generator(apps=1, dynos=2, seed=5, start_ms=START, keep_truth=True, realistic=True)
    for _ in range(75):
        gen.batch("app-0", 50, 1000)
        gen.now_ms += 1000
    assert gen.truth is not None
    table = orjson.loads(orjson.dumps(loadgen.truth_table(gen.truth)))
    web = table[f"app-0|web|{START // 1000}"]
    assert {"requests", "failed", "errors", "max", "p50", "p95", "p99", "rss_max", "metrics"} <= set(web)
    assert web["metrics"]["orders.created"]["type"] == "counter" and web["metrics"]["checkout"]["count"] == 60
    app_wide = table[f"app-0|app|{START // 1000}"]
    assert app_wide["platform"] == {"release": 1} and "db_size_mb" in app_wide["addons"]["DATABASE"]
    assert "requests" not in app_wide
