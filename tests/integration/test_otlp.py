"""OpenTelemetry SDKs, none of them ours, against the real stack: their OTLP/HTTP exporters -> the ingest process
-> Apache Kafka -> the worker -> DynamoDB. The stored minutes must equal the truth each client recorded."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from app.local.embedded import DynamoServer, KafkaBroker
from tables.aggregate import Aggregate, BucketKey
from tests.ingest.test_otlp import SEMCONV_BOUNDS_S, _reads, bucket_width_ms, true_quantile
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def merged(stored: dict[tuple[str, str, int], Any], proc: str) -> Aggregate:
    out = Aggregate(BucketKey("x", proc, 0))
    for (_, p, _), rec in stored.items():
        if p == proc:
            out.merge(Aggregate.from_record(rec))
    return out


def wait_minutes(p: Pipeline, app: str, procs: list[str], since_ms: int, pred: Any, what: str,
                 timeout_s: float = 120) -> dict[tuple[str, str, int], Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored = p.stored([app], procs, since_ms // 1000 - 60, since_ms // 1000 + 3600)
        if pred(stored):
            return stored
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {len(stored)} minutes stored; log {p.log_path}")
        time.sleep(0.5)


@contextmanager
def stack_for(broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path, app: str
              ) -> Iterator[tuple[Pipeline, str, str, int]]:
    """A worker and an ingest process on the real parts: (pipeline, ingest URL, a write token of ``app``,
    the wall time the test started sending)."""
    p = Pipeline(broker, dynamo, tmp_path)
    p.start(data_dir=tmp_path / "state")
    try:
        url = p.start_ingest()
        yield p, url, p.read_token(app, "write"), int(time.time() * 1000)
    finally:
        p.stop()


def sdk(url: str, token: str, dyno: str, temporality: AggregationTemporality, *, exponential: bool
        ) -> tuple[MeterProvider, PeriodicExportingMetricReader]:
    exporter = OTLPMetricExporter(endpoint=f"{url}/v1/metrics", headers={"Authorization": f"Bearer {token}"},
                                  preferred_temporality={Counter: temporality, Histogram: temporality})
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)  # exported by the test
    views = ([View(instrument_name="http.server.request.duration",
                   aggregation=ExponentialBucketHistogramAggregation())] if exponential else [])
    mp = MeterProvider(metric_readers=[reader], views=views,
                       resource=Resource.create({"service.name": "ignored", "service.instance.id": dyno}))
    return mp, reader


def test_python_sdk_delta_and_cumulative_are_stored_exactly(broker: KafkaBroker, dynamo: DynamoServer,
                                                           tmp_path: Path) -> None:
    app = "otel-py"
    with stack_for(broker, dynamo, tmp_path, app) as (p, url, token, start_ms):
        rng = random.Random(11)
        truth: dict[str, dict[int, list[float]]] = {"web": {}, "worker": {}}
        jobs = {"web": 0, "worker": 0}
        clients = [("web", *sdk(url, token, "web.1", AggregationTemporality.DELTA, exponential=False)),
                   ("worker", *sdk(url, token, "worker.1", AggregationTemporality.CUMULATIVE, exponential=True))]
        depth = {"web": [0.0], "worker": [0.0]}
        for proc, mp, _ in clients:
            mp.get_meter("test").create_observable_gauge("queue.depth", [_reads(depth[proc])])
        instruments = {proc: (mp.get_meter("test").create_histogram(
            "http.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=SEMCONV_BOUNDS_S),
            mp.get_meter("test").create_counter("jobs.processed")) for proc, mp, _ in clients}
        for round_ in range(4):
            for proc, _, reader in clients:
                hist, counter = instruments[proc]
                for _ in range(250):
                    v = rng.lognormvariate(math.log(0.08), 0.9)
                    status = rng.choice((200, 200, 200, 201, 302, 404, 500, 503))
                    truth[proc].setdefault(status, []).append(v * 1000)
                    hist.record(v, {"http.response.status_code": status, "http.request.method": "GET"})
                counter.add(round_ + 1)
                jobs[proc] += round_ + 1
                depth[proc][0] = float(round_ * 3)
                assert reader.force_flush(timeout_millis=10_000)
            time.sleep(0.5)
        for _, mp, _ in clients:
            mp.shutdown()
        total = {proc: sum(len(v) for v in truth[proc].values()) for proc in truth}

        def complete(stored: dict[tuple[str, str, int], Any]) -> bool:
            return all(merged(stored, proc).requests == total[proc] for proc in truth)

        stored = wait_minutes(p, app, ["web", "worker"], start_ms, complete, "every request stored")
        for proc in truth:
            agg = merged(stored, proc)
            values = [v for vs in truth[proc].values() for v in vs]
            for cls in range(1, 6):
                assert agg.status[cls] == sum(len(v) for s, v in truth[proc].items() if s // 100 == cls), proc
            assert agg.failed == sum(len(v) for s, v in truth[proc].items() if s >= 500)
            assert agg.response.n == len(values) and agg.response.max == max(values)
            assert agg.response.sum == pytest.approx(math.fsum(values), rel=1e-9)
            assert agg.counters["jobs.processed"] == jobs[proc]
            g = agg.gauges["queue.depth"]
            assert (g.stat.n, g.stat.max, g.last) == (5, 9.0, 9.0)  # 4 flushes, and the shutdown's export
            bounds_ms = [b * 1000 for b in SEMCONV_BOUNDS_S]
            for q in (0.5, 0.95, 0.99):
                est, real = agg.response.digest.quantile(q), true_quantile(values, q)
                assert est is not None
                # explicit buckets: within the truth's bucket; exponential (scale >= 3): within 9 %
                bound = bucket_width_ms(bounds_ms, real) if proc == "web" else 0.09 * real
                assert abs(est - real) <= bound, (proc, q, est, real)
        # The request series drive the same API as router-logged ones.
        point = p.get(f"/v1/apps/{app}/metrics?process_type=web&resolution=60&since={start_ms // 1000 - 60}",
                      token=p.read_token(app))["points"]
        assert sum(pt.get("requests", 0) for pt in point) == total["web"]
        stats = p.stats()
        assert stats["observations_rejected"] == 0 and stats["observations_late"] == 0


JS_CLIENT = ROOT / "tests" / "clients" / "otel-js"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_javascript_sdk_json_exporter_is_stored_exactly(broker: KafkaBroker, dynamo: DynamoServer,
                                                        tmp_path: Path) -> None:
    assert (JS_CLIENT / "node_modules").is_dir(), "run `make install-test` (npm ci of tests/clients/otel-js)"
    app = "otel-js"
    with stack_for(broker, dynamo, tmp_path, app) as (p, url, token, start_ms):
        truths = []
        for temporality in ("delta", "cumulative"):
            env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": url,
                   "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer {token}", "OTEL_SERVICE_NAME": app,
                   "DYNO": "web.1" if temporality == "delta" else "web.2", "TEMPORALITY": temporality}
            run = subprocess.run(["node", str(JS_CLIENT / "send.mjs")], env=env, capture_output=True, timeout=60,
                                 check=False)
            assert run.returncode == 0, run.stderr.decode()
            truths.append(json.loads(run.stdout.decode().strip().splitlines()[-1]))
        expected = sum(t["http.server.request.duration"]["count"] for t in truths)
        stored = wait_minutes(p, app, ["web"], start_ms, lambda s: merged(s, "web").requests >= expected,
                              "the JS client's requests stored")
        agg = merged(stored, "web")
        values = [v * 1000 for t in truths for v in t["http.server.request.duration"]["values"]]
        assert agg.requests == expected == len(values)
        by_status: dict[int, int] = {}
        for t in truths:
            for code, n in t["http.server.request.duration"]["by_status"].items():
                by_status[int(code)] = by_status.get(int(code), 0) + n
        for cls in range(1, 6):
            assert agg.status[cls] == sum(n for s, n in by_status.items() if s // 100 == cls)
        assert agg.response.max == pytest.approx(max(values), rel=1e-12)
        assert agg.response.sum == pytest.approx(math.fsum(values), rel=1e-9)
        assert agg.counters["jobs.processed"] == sum(t["jobs.processed"]["sum"] for t in truths)
