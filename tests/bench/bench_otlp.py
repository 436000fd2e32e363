"""OTLP data points per second for one ingest process, HTTP in -> Kafka acknowledged, against decoding alone.

    make bench    # or: python -m tests.bench.bench_otlp [--points N]

The load comes from a separate process (tests/bench/otlp_client.py, aiohttp, 16 connections) posting OTLP/HTTP
protobuf exports of 500 points each: request-duration histograms (the semantic conventions' 14 bounds), and
monotonic sums, cumulative and delta. The baseline, in this process and the same run, decodes the same bodies
with opentelemetry-proto (``ExportMetricsServiceRequest.FromString``) and does nothing else; "map only" adds
what the ingest does per point in Python (app/ingest/otlp.py) and the JSON for Kafka. Then how close the
percentiles of histograms get (the digest fed from buckets, docs/otlp.md#histograms) against numpy's exact ones.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

from app import models
from app.cli import start_role, wait_http, worker_env
from app.ingest import otlp
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.ops.topics import ensure_topics
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey, Timer
from tests.bench.bench_ingest import AT_CAPACITY, create_token

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
POINTS_PER_EXPORT = 500
DISTINCT = 40
"""Distinct bodies built per kind; the load repeats them (building one costs more than sending it)."""
BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
ROUTES = [f"/api/v1/items/{i}" for i in range(25)]


def _kv(key: str, value: Any) -> KeyValue:
    v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=str(value))
    return KeyValue(key=key, value=v)


def export(kind: str, seq: int, rng: np.random.Generator) -> bytes:
    """One export of POINTS_PER_EXPORT points of ``kind`` (hist, sum_cumulative, sum_delta) from one dyno."""
    now_ns = time.time_ns()
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend([_kv("service.name", "app-0"), _kv("service.instance.id", f"web.{seq % 4 + 1}")])
    sm = rm.scope_metrics.add()
    if kind == "hist":
        m = sm.metrics.add(name="http.server.request.duration", unit="s")
        m.histogram.aggregation_temporality = otlp.DELTA
        for i in range(POINTS_PER_EXPORT):
            values = rng.lognormal(math.log(0.08), 0.9, size=int(rng.integers(5, 120)))
            counts = np.bincount(np.searchsorted(BOUNDS_S, values, side="left"), minlength=len(BOUNDS_S) + 1)
            p = m.histogram.data_points.add(time_unix_nano=now_ns, start_time_unix_nano=now_ns - 10**10,
                                            count=len(values), sum=float(values.sum()), min=float(values.min()),
                                            max=float(values.max()), explicit_bounds=BOUNDS_S,
                                            bucket_counts=[int(c) for c in counts])
            p.attributes.extend([_kv("http.response.status_code", int(rng.choice([200, 200, 200, 404, 500]))),
                                 _kv("http.route", ROUTES[i % len(ROUTES)])])
    else:
        m = sm.metrics.add(name="jobs.processed")
        m.sum.is_monotonic = True
        cumulative = kind == "sum_cumulative"
        m.sum.aggregation_temporality = otlp.CUMULATIVE if cumulative else otlp.DELTA
        for i in range(POINTS_PER_EXPORT):
            value = (seq + 1) * (i + 1) if cumulative else int(rng.integers(0, 50))
            p = m.sum.data_points.add(time_unix_nano=now_ns, start_time_unix_nano=now_ns - 10**11, as_int=value)
            p.attributes.extend([_kv("queue", f"q{i}"), _kv("host", f"h{i % 7}")])
    return bytes(req.SerializeToString())


def decode_rate(bodies: list[bytes], seconds: float = 2.0) -> float:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in bodies:
            ExportMetricsServiceRequest.FromString(b)
            n += POINTS_PER_EXPORT
    return n / (time.perf_counter() - t0)


def touch_rate(bodies: list[bytes], seconds: float = 2.0) -> float:
    """The floor of any per-point work in Python: decode, then read each point's fields once, nothing else."""
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in bodies:
            for rm in ExportMetricsServiceRequest.FromString(b).resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        data = m.histogram if m.HasField("histogram") else m.sum
                        for p in data.data_points:
                            _ = (p.time_unix_nano, list(p.attributes))
                            if m.HasField("histogram"):
                                _ = (p.count, p.sum, list(p.bucket_counts), list(p.explicit_bounds))
                            else:
                                _ = (p.start_time_unix_nano, p.as_int)
                            n += 1
    return n / (time.perf_counter() - t0)


def map_rate(bodies: list[bytes], seconds: float = 2.0) -> float:
    n = 0
    now_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in bodies:
            mapped = otlp.map_request(otlp.decode(b, otlp.PROTOBUF), "app-0", now_ms=now_ms,
                                      max_future_ms=300_000, max_metric_names=1000)
            assert not mapped.rejected, mapped.message()
            msgspec.json.encode(mapped.observations)
            n += POINTS_PER_EXPORT
    return n / (time.perf_counter() - t0)


def percentile_errors(n_values: int = 100_000) -> list[tuple[str, float, float, float]]:
    """(how the values arrived, relative error of p50, p95, p99) against numpy's exact percentiles (linear)."""
    rng = np.random.default_rng(5)
    values_ms = rng.lognormal(math.log(80), 0.9, size=n_values)
    exact = np.percentile(values_ms, [50, 95, 99])
    rows = []
    raw = Timer(1000)
    for v in values_ms.tolist():
        raw.add(v)
    rows.append(("each value (router lines; the baseline)", raw))
    for label, view in (("explicit buckets, the semantic conventions' 14 bounds", None),
                        ("exponential buckets, the SDK's default (160 buckets)",
                         View(instrument_name="d", aggregation=ExponentialBucketHistogramAggregation()))):
        reader = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
        mp = MeterProvider(metric_readers=[reader], views=[view] if view else [])
        h = mp.get_meter("b").create_histogram("d", unit="ms",
                                                explicit_bucket_boundaries_advisory=[b * 1000 for b in BOUNDS_S])
        for v in values_ms.tolist():
            h.record(v)
        data = reader.get_metrics_data()
        assert data is not None
        mapped = otlp.map_request(encode_metrics(data), "a", now_ms=int(time.time() * 1000), max_future_ms=300_000,
                                  max_metric_names=10)
        agg = Aggregate(BucketKey("a", "web", 0))
        for o in mapped.observations:
            assert isinstance(o, models.Histogram)
            agg.add_histogram(o.name, o.status, o.count, o.sum, o.bounds, o.counts, o.min, o.max)
        rows.append((label, agg.timers["d"]))
    out = []
    for label, t in rows:
        t.flush()
        est = [t.digest.quantile(q) or 0.0 for q in (0.5, 0.95, 0.99)]
        out.append((label, *(abs(e - x) / x for e, x in zip(est, exact, strict=True))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000, help="points per end-to-end row")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    rng = np.random.default_rng(3)
    kinds = {"hist": "histograms (request duration, delta)", "sum_cumulative": "sums, cumulative",
             "sum_delta": "sums, delta"}
    bodies = {k: [export(k, i, rng) for i in range(DISTINCT)] for k in kinds}
    decode = {k: decode_rate(b) for k, b in bodies.items()}
    touch = {k: touch_rate(b) for k, b in bodies.items()}
    mapped = {k: map_rate(b) for k, b in bodies.items()}
    errors = percentile_errors()

    broker = KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="bench-kafka-")))
    dynamo = DynamoServer()
    broker.start()
    dynamo.start()
    uid = uuid.uuid4().hex[:6]
    overrides = {"METRICS_OBSERVATIONS_TOPIC": f"bo-{uid}", "METRICS_DLQ_TOPIC": f"bod-{uid}",
                 "METRICS_TABLE_NAME": f"bo-{uid}", "METRICS_PARTITIONS": "4"}
    settings = Settings.from_env({**overrides, "METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint})
    e2e: dict[str, float] = {}
    try:
        asyncio.run(ensure_topics(broker.address, settings.kafka))

        tok = create_token(settings, "app-0", "write")
        port = free_port()
        proc = start_role("ingest", worker_env(broker.url, dynamo.endpoint, data_dir=tempfile.mkdtemp(),
                                               web_port=port, extra={**overrides,
                                               "METRICS_ADMIN_PORT": str(free_port()), **AT_CAPACITY}))
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", 60, proc)
            for kind, distinct in bodies.items():
                load = [(distinct[i % DISTINCT].hex(), POINTS_PER_EXPORT)
                        for i in range(max(1, args.points // POINTS_PER_EXPORT))]
                path = Path(tempfile.mkdtemp()) / f"{kind}.json"
                path.write_bytes(orjson.dumps(load))
                out = subprocess.run([sys.executable, "-m", "tests.bench.otlp_client",
                                      f"http://127.0.0.1:{port}/v1/metrics", tok, str(path), str(args.concurrency)],
                                     cwd=str(ROOT), capture_output=True, text=True, check=True, env=os.environ)
                points, secs, failures = out.stdout.split()
                if int(failures):
                    raise RuntimeError(f"{failures} exports were not fully taken: {out.stderr.strip()[-500:]}")
                e2e[kind] = int(points) / float(secs)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    finally:
        dynamo.stop()
        broker.stop()
    rows = [f"| {label} | {decode[k]:,.0f} | {touch[k]:,.0f} ({touch[k] / decode[k]:.0%}) | {mapped[k]:,.0f} | "
            f"{e2e[k]:,.0f} | **{e2e[k] / decode[k]:.1%}** | {e2e[k] / mapped[k]:.0%} |" for k, label in kinds.items()]
    text = "\n".join([
        f"OTLP ingest benchmark ({os.cpu_count()} cores; exports of {POINTS_PER_EXPORT} points, protobuf, "
        f"{args.concurrency} connections from a separate process; one ingest process)", "",
        "| points | decode only (opentelemetry-proto) | decode + read each point's fields in Python (/ decode) "
        "| map only (this process) | end to end, HTTP in -> Kafka acked | end to end / decode only (target 50 %) "
        "| end to end / map only |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Percentiles of {100_000:,} lognormal latencies (median 80 ms), relative error against numpy's exact ones:",
        "", "| values arrived as | p50 | p95 | p99 |", "|---|---:|---:|---:|",
        *[f"| {label} | {a:.2%} | {b:.2%} | {c:.2%} |" for label, a, b, c in errors], "",
        "bench: " + " ".join([f"otlp_hist_pts_s={e2e['hist']:.0f}", f"otlp_sum_pts_s={e2e['sum_cumulative']:.0f}",
                              f"otlp_sum_delta_pts_s={e2e['sum_delta']:.0f}", f"decode_hist_pts_s={decode['hist']:.0f}",
                              f"decode_sum_pts_s={decode['sum_cumulative']:.0f}",
                              f"map_hist_pts_s={mapped['hist']:.0f}",
                              f"map_sum_pts_s={mapped['sum_cumulative']:.0f}"]),
    ])
    print(text)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-otlp.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
