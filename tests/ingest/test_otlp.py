"""OTLP metrics in (app/ingest/otlp.py): requests made by the OpenTelemetry Python SDK's own encoder, mapped and
folded through the windows (tables/windows.py) into minutes that must equal the truth the test recorded.

The whole stack with the SDK's real OTLP/HTTP exporter is tests/integration/test_otlp.py; the HTTP answers
(content types, gzip, partial success, throttling) are tests/ingest/test_otlp_http.py.
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from app import models
from app.clock import ManualClock
from app.ingest import otlp
from tables.aggregate import Aggregate
from tables.streams import FIRST_POINT_MAX_AGE_MS
from tables.windows import IngestResult, PartitionWindows

SEMCONV_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
"""http.server.request.duration's recommended bucket boundaries (semantic conventions)."""


def provider(temporality: AggregationTemporality, *, exponential: bool = False, dyno: str = "web.1"
             ) -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader(preferred_temporality={Counter: temporality, Histogram: temporality,
                                                         UpDownCounter: temporality})
    views = [View(instrument_name="job.duration", aggregation=ExponentialBucketHistogramAggregation())] \
        if exponential else []
    mp = MeterProvider(metric_readers=[reader], views=views,
                       resource=Resource.create({"service.name": "shop", "service.instance.id": dyno}))
    return mp, reader


def request_of(reader: InMemoryMetricReader) -> ExportMetricsServiceRequest:
    data = reader.get_metrics_data()
    assert data is not None
    req: ExportMetricsServiceRequest = encode_metrics(data)
    return req


def mapped(req: ExportMetricsServiceRequest, *, now_ms: int | None = None, names: int = 100,
           encoding: str = otlp.PROTOBUF) -> otlp.Mapped:
    body = req.SerializeToString() if encoding == otlp.PROTOBUF else otlp._encoded(req, otlp.JSON)
    return otlp.map_request(otlp.decode(body, encoding), "shop", now_ms=now_ms or int(time.time() * 1000),
                            max_future_ms=300_000, max_metric_names=names)


class Folder:
    """The worker's fold: observations through PartitionWindows, minutes merged per process type."""

    def __init__(self) -> None:
        self.clock = ManualClock(int(time.time() * 1000))
        self.pw = PartitionWindows(0, clock=self.clock, grace_ms=10_000, idle_timeout_ms=30_000,
                                   max_future_ms=300_000, max_message_bytes=10_000_000)
        self.offset = 0
        self.dead: list[Any] = []

    def fold(self, observations: list[models.Observation]) -> None:
        result = IngestResult()
        self.pw.ingest(self.offset, msgspec.json.encode(observations), result)
        self.offset += 1
        self.dead += result.dead

    def total(self, proc: str = "web") -> Aggregate:
        """Every open minute of ``proc`` merged (what a coarse query sees)."""
        aggs = [a for k, a in self.pw.windows.items() if k[1] == proc]
        assert aggs, f"no minute for {proc}"
        out = Aggregate(aggs[0].key)
        for a in aggs:
            out.merge(a)
        return out


def latencies_s(n: int, seed: int) -> Iterator[float]:
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.lognormvariate(math.log(0.08), 0.9)


def bucket_width_ms(bounds_ms: list[float], v: float) -> float:
    i = bisect_left(bounds_ms, v)
    lo = bounds_ms[i - 1] if i > 0 else 0.0
    hi = bounds_ms[i] if i < len(bounds_ms) else v
    return hi - lo


def true_quantile(values: list[float], q: float) -> float:
    """The interpolated quantile Digest uses for exact values (linear between ranks)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("temporality", [AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE])
def test_request_duration_becomes_the_request_series_exactly(temporality: AggregationTemporality) -> None:
    mp, reader = provider(temporality)
    h = mp.get_meter("t").create_histogram("http.server.request.duration", unit="s",
                                           explicit_bucket_boundaries_advisory=SEMCONV_BOUNDS_S)
    truth: dict[int, list[float]] = {200: [], 404: [], 503: []}
    rng = random.Random(7)
    folder = Folder()
    for round_ in range(3):  # three exports: a cumulative stream is differenced twice
        for v in latencies_s(400, round_):
            status = rng.choice((200, 200, 200, 404, 503))
            truth[status].append(v * 1000)
            h.record(v, {"http.response.status_code": status, "http.route": "/x"})
        m = mapped(request_of(reader))
        assert m.rejected == 0, m.message()
        folder.fold(m.observations)
    assert not folder.dead
    web = folder.total()
    everything = [v for vs in truth.values() for v in vs]
    assert web.requests == len(everything) == 1200
    assert web.status[2] == len(truth[200]) and web.status[4] == len(truth[404]) and web.status[5] == len(truth[503])
    assert web.failed == len(truth[503])
    assert web.response.n == 1200
    assert web.response.sum == pytest.approx(math.fsum(everything), rel=1e-12)
    # Cumulative too: an interval's max is exact when it rose, bounded by the one before otherwise.
    assert web.response.max == max(everything)
    assert web.response.digest.min == min(everything)
    bounds_ms = [b * 1000 for b in SEMCONV_BOUNDS_S]
    for q in (0.5, 0.95, 0.99):
        est, real = web.response.digest.quantile(q), true_quantile(everything, q)
        assert est is not None and web.response.max is not None
        assert abs(est - real) <= bucket_width_ms(bounds_ms, real), (q, est, real)


def test_exponential_histograms_keep_count_sum_min_max_and_relative_error() -> None:
    mp, reader = provider(AggregationTemporality.DELTA, exponential=True)
    h = mp.get_meter("t").create_histogram("job.duration", unit="ms")
    values = [v * 1000 for v in latencies_s(2000, 3)]
    for v in values:
        h.record(v)
    req = request_of(reader)
    scale = req.resource_metrics[0].scope_metrics[0].metrics[0].exponential_histogram.data_points[0].scale
    folder = Folder()
    folder.fold(mapped(req).observations)
    t = folder.total().timers["job.duration"]
    assert (t.n, t.max, t.digest.min) == (2000, max(values), min(values))
    assert t.sum == pytest.approx(math.fsum(values), rel=1e-12)
    rel = 2 ** (2.0 ** -scale) - 1  # one bucket's relative width
    for q in (0.5, 0.95, 0.99):
        est, real = t.digest.quantile(q), true_quantile(values, q)
        assert est is not None and abs(est - real) <= rel * real, (q, est, real, rel)


def test_cumulative_exponential_histogram_is_differenced_across_a_downscale() -> None:
    mp, reader = provider(AggregationTemporality.CUMULATIVE, exponential=True)
    h = mp.get_meter("t").create_histogram("job.duration", unit="ms")
    folder = Folder()
    h.record(1.0)  # scale 20 at first: one value
    req = request_of(reader)
    scales = [req.resource_metrics[0].scope_metrics[0].metrics[0].exponential_histogram.data_points[0].scale]
    folder.fold(mapped(req).observations)
    for v in (1000.0, 0.001, 5.0):  # each widens the range: the SDK downscales
        h.record(v)
        req = request_of(reader)
        scales.append(req.resource_metrics[0].scope_metrics[0].metrics[0].exponential_histogram.data_points[0].scale)
        folder.fold(mapped(req).observations)
    assert len(set(scales)) > 1, scales
    t = folder.total().timers["job.duration"]
    assert t.n == 4 and t.sum == pytest.approx(1006.001)
    assert (t.max, t.digest.min) == (1000.0, 0.001)


def test_counters_delta_and_cumulative_add_up_and_gauges_keep_mean_max_last() -> None:
    for temporality in (AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE):
        mp, reader = provider(temporality)
        meter = mp.get_meter("t")
        c = meter.create_counter("jobs.processed")
        depth = [3.0]
        meter.create_observable_gauge("queue.depth", [_reads(depth)])
        folder = Folder()
        added = 0
        for i in range(4):
            c.add(i + 1, {"queue": "a"})
            c.add(10, {"queue": "b"})
            added += i + 11
            depth[0] = float(i * 2)
            folder.fold(mapped(request_of(reader)).observations)
        agg = folder.total()
        assert agg.counters["jobs.processed"] == added, temporality
        g = agg.gauges["queue.depth"]
        assert (g.stat.n, g.stat.max, g.last) == (4, 6.0, 6.0)
        assert g.stat.mean() == 3.0


def _reads(box: list[float]) -> Any:
    """An observable instrument's callback reporting ``box[0]`` at each collection."""
    return lambda _: [_observation(box[0])]


def _observation(v: float) -> Any:
    from opentelemetry.metrics import Observation
    return Observation(v)


def test_memory_and_load_become_the_runtime_charts() -> None:
    mp, reader = provider(AggregationTemporality.DELTA, dyno="worker.3")
    meter = mp.get_meter("t")
    meter.create_observable_up_down_counter("process.memory.usage", [lambda _: [_observation(256 * 2**20)]],
                                            unit="By")
    meter.create_observable_gauge("system.cpu.load_average.1m", [lambda _: [_observation(1.5)]])
    folder = Folder()
    folder.fold(mapped(request_of(reader)).observations)
    agg = folder.total("worker")
    assert (agg.rss.max, agg.load.max) == (256.0, 1.5)
    assert not agg.gauges and not agg.counters


def _point_request(points: list[pb.NumberDataPoint], *, name: str = "jobs", cumulative: bool = True,
                   dyno: str = "web.1") -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.instance.id", value=AnyValue(string_value=dyno)))
    metric = rm.scope_metrics.add().metrics.add()
    metric.name = name
    metric.sum.aggregation_temporality = otlp.CUMULATIVE if cumulative else otlp.DELTA
    metric.sum.is_monotonic = True
    metric.sum.data_points.extend(points)
    return req


def _num(v: float, ts_ms: int, start_ms: int, **attrs: str) -> pb.NumberDataPoint:
    p = pb.NumberDataPoint(as_double=v, time_unix_nano=ts_ms * 1_000_000, start_time_unix_nano=start_ms * 1_000_000)
    for k, s in attrs.items():
        p.attributes.append(KeyValue(key=k, value=AnyValue(string_value=s)))
    return p


def test_cumulative_first_point_reset_and_repeat() -> None:
    folder = Folder()
    now = folder.clock.now_ms()
    start = now - 50_000
    old_start = now - FIRST_POINT_MAX_AGE_MS - 60_000

    def total() -> float:
        return folder.total().counters.get("jobs", 0.0)

    folder.fold(mapped(_point_request([_num(7, now - 40_000, start)])).observations)
    assert total() == 7  # a new process's first point counts from its start
    folder.fold(mapped(_point_request([_num(10, now - 30_000, start)])).observations)
    assert total() == 10
    folder.fold(mapped(_point_request([_num(10, now - 30_000, start)])).observations)  # an exporter's retry
    assert total() == 10
    folder.fold(mapped(_point_request([_num(4, now - 20_000, start)])).observations)  # went down: a reset
    assert total() == 14
    folder.fold(mapped(_point_request([_num(2, now - 10_000, now - 15_000)])).observations)  # new start: reset
    assert total() == 16
    folder.fold(mapped(_point_request([_num(1000, now - 5_000, old_start, q="x")])).observations)
    assert total() == 16  # a stream first seen long after its start is only a baseline
    folder.fold(mapped(_point_request([_num(1003, now - 1_000, old_start, q="x")])).observations)
    assert total() == 19
    assert len(folder.pw.streams) == 2


def test_streams_survive_a_restart_through_the_table() -> None:
    from tables.state import WindowTableState

    folder = Folder()
    now = folder.clock.now_ms()
    start = now - 50_000
    table: dict[bytes, bytes] = {}
    state = WindowTableState(table, "observations")
    folder.fold(mapped(_point_request([_num(5, now - 40_000, start)])).observations)
    state.persist(folder.pw)
    [(wins, apps, offset, streams)] = state.load_all({0}).values()
    fresh = Folder()
    fresh.pw.restore(wins, apps, offset)
    fresh.pw.restore_streams(streams)
    fresh.offset = folder.offset
    fresh.fold(mapped(_point_request([_num(8, now - 30_000, start)])).observations)
    assert fresh.total().counters["jobs"] == 8


def test_bad_points_are_refused_with_reasons_and_their_neighbours_kept() -> None:
    now = int(time.time() * 1000)
    good = _num(3, now - 1000, now - 2000)
    nan = _num(float("nan"), now - 1000, now - 2000)
    huge = _num(1, now - 1000, now - 2000, **{f"k{i}": "v" for i in range(otlp.MAX_ATTRIBUTES + 1)})
    fat = _num(1, now - 1000, now - 2000, blob="x" * (otlp.MAX_ATTRIBUTE_BYTES + 1))
    future = _num(1, now + 3_600_000, now - 2000)
    timeless = _num(1, 0, 0)
    m = mapped(_point_request([good, nan, huge, fat, future, timeless], cumulative=False))
    assert [o.value for o in m.observations] == [3.0]  # type: ignore[union-attr]
    assert m.rejected == 5
    text = m.message()
    for part in ("NaN or infinite", f"more than {otlp.MAX_ATTRIBUTES} attributes", "bytes, over",
                 "ahead of the ingest's clock", "time_unix_nano missing"):
        assert part in text, text


def test_bad_histograms_and_unspecified_temporality() -> None:
    now_ns = int(time.time() * 1e9)
    req = ExportMetricsServiceRequest()
    metrics = req.resource_metrics.add().scope_metrics.add().metrics
    ok = metrics.add(name="ok")
    ok.histogram.aggregation_temporality = otlp.DELTA
    ok.histogram.data_points.add(time_unix_nano=now_ns, count=2, sum=3.0, explicit_bounds=[1.0],
                                 bucket_counts=[1, 1])
    bad = metrics.add(name="bad")
    bad.histogram.aggregation_temporality = otlp.DELTA
    bad.histogram.data_points.add(time_unix_nano=now_ns, count=5, sum=3.0, explicit_bounds=[1.0],
                                  bucket_counts=[1, 1])  # counts do not add up to count
    bad.histogram.data_points.add(time_unix_nano=now_ns, count=2, sum=3.0, explicit_bounds=[2.0, 1.0],
                                  bucket_counts=[1, 1, 0])  # bounds not ascending
    bad.histogram.data_points.add(time_unix_nano=now_ns, count=2, sum=3.0, explicit_bounds=[1.0],
                                  bucket_counts=[2])  # one count too few
    nostatus = metrics.add(name="http.server.request.duration", unit="s")
    nostatus.histogram.aggregation_temporality = otlp.DELTA
    nostatus.histogram.data_points.add(time_unix_nano=now_ns, count=1, sum=0.1, bucket_counts=[1])
    unspecified = metrics.add(name="u")
    unspecified.sum.data_points.add(time_unix_nano=now_ns, as_int=1)
    m = mapped(req)
    assert [o.name for o in m.observations] == ["ok"]  # type: ignore[union-attr]
    assert m.rejected == 5
    for part in ("not its count 5", "strictly ascending", "must be one more", "needs http.response.status_code",
                 "temporality unspecified"):
        assert part in m.message()


def test_custom_names_past_the_limit_are_refused() -> None:
    now = int(time.time() * 1000)
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for i in range(5):
        metric = rm.scope_metrics.add().metrics.add(name=f"m{i}")
        metric.gauge.data_points.append(_num(i, now - 1000, 0))
    m = mapped(req, names=3)
    assert sorted(str(o.name) for o in m.observations) == ["m0", "m1", "m2"]  # type: ignore[union-attr]
    assert m.rejected == 2 and "more than 3 custom metric names" in m.message()


def test_json_encoding_maps_like_protobuf() -> None:
    mp, reader = provider(AggregationTemporality.CUMULATIVE, exponential=True)
    meter = mp.get_meter("t")
    meter.create_histogram("job.duration").record(4.0, {"k": "v"})
    meter.create_counter("jobs").add(3)
    meter.create_histogram("http.server.request.duration", unit="s").record(0.2, {"http.response.status_code": 200})
    req = request_of(reader)
    now = int(time.time() * 1000)
    a, b = mapped(req, now_ms=now), mapped(req, now_ms=now, encoding=otlp.JSON)
    assert a.observations == b.observations and len(a.observations) == 3


def test_unreadable_bodies_raise_body_error() -> None:
    mp, reader = provider(AggregationTemporality.DELTA)
    mp.get_meter("t").create_counter("jobs").add(1)
    body = request_of(reader).SerializeToString()
    with pytest.raises(otlp.BodyError, match="protobuf"):
        otlp.decode(body[: len(body) // 2], otlp.PROTOBUF)
    with pytest.raises(otlp.BodyError, match="OTLP JSON"):
        otlp.decode(b'{"resourceMetrics": [', otlp.JSON)
    with pytest.raises(otlp.BodyError):
        otlp.decode(b'{"resourceMetrics": 5}', otlp.JSON)


@pytest.mark.parametrize(("resource", "dyno"), [
    ({"service.instance.id": "web.3"}, "web.3"),
    ({"service.instance.id": "worker.12"}, "worker.12"),
    ({"heroku.process.type": "clock", "service.instance.id": "8f2c-uuid"}, "clock"),
    ({"service.instance.id": "worker-6b9d8c7f5-x2x9q"}, "worker"),
    ({"service.instance.id": "9b2f0f4e-3f2a-4b7e-8f0e-3d6b8f7c2a11"}, "web"),  # HEROKU_DYNO_ID, semconv's
    ({"service.instance.id": "9b2f0f4e-3f2a-4b7e-8f0e-3d6b8f7c2a11", "host.name": "clock.1"}, "clock.1"),
    ({"service.instance.id": "api-7c9f-x", "process.type": "worker"}, "worker"),
    ({}, "web"),
])
def test_process_type_comes_from_the_resource(resource: dict[str, str], dyno: str) -> None:
    assert otlp.dyno_of(resource) == dyno


def test_an_idle_cumulative_histogram_opens_no_minute() -> None:
    folder = Folder()
    now = folder.clock.now_ms()
    start_ns = (now - 200_000) * 1_000_000

    def export(ts_ms: int, count: int) -> ExportMetricsServiceRequest:
        req = ExportMetricsServiceRequest()
        metric = req.resource_metrics.add().scope_metrics.add().metrics.add(name="job.duration")
        metric.histogram.aggregation_temporality = otlp.CUMULATIVE
        metric.histogram.data_points.add(time_unix_nano=ts_ms * 1_000_000, start_time_unix_nano=start_ns,
                                         count=count, sum=2.0 * count, explicit_bounds=[1.0, 5.0],
                                         bucket_counts=[0, count, 0])
        return req

    folder.fold(mapped(export(now - 150_000, 3)).observations)
    folder.fold(mapped(export(now - 90_000, 3)).observations)  # a later minute, nothing new
    folder.fold(mapped(export(now - 30_000, 5)).observations)
    assert len(folder.pw.windows) == 2 and not folder.dead
    assert folder.total().timers["job.duration"].n == 5


def test_latency_and_error_rate_monitors_fire_on_otel_request_minutes() -> None:
    """The monitors read the same minute fields (p95 of the response digest, failed / requests) whatever
    reported the requests: an OTel app's slow, failing minute fires both, as a router-logged one would."""
    from app.alerting.minute import Minute
    from app.alerting.monitors import ERROR_RATE, LATENCY, Monitor, MonitorConfig

    mp, reader = provider(AggregationTemporality.DELTA)
    h = mp.get_meter("t").create_histogram("http.server.request.duration", unit="s",
                                           explicit_bucket_boundaries_advisory=SEMCONV_BOUNDS_S)
    for i in range(100):
        h.record(0.9 if i % 10 else 0.02, {"http.response.status_code": 503 if i % 4 == 0 else 200})
    folder = Folder()
    folder.fold(mapped(request_of(reader)).observations)
    [agg] = folder.pw.windows.values()
    minute = Minute.from_aggregate(agg)
    assert (minute.requests, minute.failed) == (100, 25)
    assert minute.p95_ms is not None and 750 <= minute.p95_ms <= 1000  # in the (750, 1000] ms bucket
    for metric, threshold in ((LATENCY, 500.0), (ERROR_RATE, 0.2)):
        monitor = Monitor(MonitorConfig(f"m-{metric}", "web", metric, threshold, 1, 5))
        assert [e.event for e in monitor.observe("shop", minute)] == ["firing"], metric


def test_json_with_hex_exemplar_ids_and_a_summary() -> None:
    """OTLP JSON writes trace and span ids in hex (protobuf's JSON mapping would read base64): exemplars are
    ignored, so their ids must not break the body. A summary keeps count, sum and each quantile."""
    import orjson

    now_ns = time.time_ns()
    body = orjson.dumps({"resourceMetrics": [{"resource": {"attributes": [
        {"key": "service.instance.id", "value": {"stringValue": "web.4"}}]}, "scopeMetrics": [{"metrics": [
            {"name": "jobs", "sum": {"aggregationTemporality": 1, "isMonotonic": True, "dataPoints": [
                {"asInt": "3", "timeUnixNano": str(now_ns), "exemplars": [
                    {"asDouble": 1.0, "timeUnixNano": str(now_ns), "traceId": "5b8efff798038103d269b633813fc60c",
                     "spanId": "eee19b7ec3c1b174"}]}]}},
            {"name": "rpc.latency", "summary": {"dataPoints": [
                {"timeUnixNano": str(now_ns), "startTimeUnixNano": str(now_ns - 10**9), "count": "4", "sum": 10.0,
                 "quantileValues": [{"quantile": 0.5, "value": 2.0}, {"quantile": 1.0, "value": 4.0}]}]}}]}]}]})
    m = otlp.map_request(otlp.decode(body, otlp.JSON), "shop", now_ms=now_ns // 1_000_000, max_future_ms=300_000,
                         max_metric_names=10)
    assert m.rejected == 0, m.message()
    got = {(o.name, o.type, o.value, o.stream is not None) for o in m.observations}  # type: ignore[union-attr]
    assert got == {("jobs", "counter", 3.0, False), ("rpc.latency.count", "counter", 4.0, True),
                   ("rpc.latency.sum", "counter", 10.0, True), ("rpc.latency.q0.5", "gauge", 2.0, False),
                   ("rpc.latency.q1", "gauge", 4.0, False)}
    assert {o.dyno for o in m.observations} == {"web.4"}  # type: ignore[union-attr]


def test_a_stream_quiet_for_an_hour_is_forgotten_and_its_next_point_is_a_first_point() -> None:
    from tables.streams import STREAM_IDLE_MS

    folder = Folder()
    now = folder.clock.now_ms()
    old_start = now - 3 * STREAM_IDLE_MS
    folder.fold(mapped(_point_request([_num(5, now - 2 * STREAM_IDLE_MS, old_start, q="quiet")])).observations)
    folder.fold(mapped(_point_request([_num(1, now - 1000, now - 2000, q="busy")])).observations)
    assert len(folder.pw.streams) == 2
    assert folder.pw.expire_streams() == 1 and len(folder.pw.streams) == 1
    assert folder.pw.expire_streams() == 0  # the next scan waits for the watermark to move a minute
    _, gone = folder.pw.take_dirty_streams()
    assert [k[1] for k in gone] and all(k not in folder.pw.streams for k in gone)
    before = folder.total().counters["jobs"]
    folder.fold(mapped(_point_request([_num(9, now - 500, old_start, q="quiet")])).observations)
    assert folder.total().counters["jobs"] == before  # forgotten: an old stream's first point is a baseline


def test_an_app_past_its_stream_limit_gets_new_streams_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    import tables.windows

    monkeypatch.setattr(tables.windows, "MAX_STREAMS_PER_APP", 2)
    folder = Folder()
    now = folder.clock.now_ms()
    points = [_num(1, now - 1000, now - 2000, q=f"q{i}") for i in range(3)]
    folder.fold(mapped(_point_request(points)).observations)
    assert len(folder.pw.streams) == 2 and folder.total().counters["jobs"] == 2
    [dead] = folder.dead
    assert "more than 2 cumulative streams of shop" in dead.reason
