"""OTLP/HTTP metrics (``POST /v1/metrics``) -> observations: every point type mapped onto the minute.

Pure: the request in (protobuf or its JSON mapping, both read into opentelemetry-proto's messages), the
observations and the refusals out; app/ingest/server.py does the HTTP. The app is the token's; a resource
says only which dyno (process type) sent the points.
Reference: docs/otlp.md
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from app import models

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

REQUEST_METRICS = {
    "http.server.request.duration": ("http.response.status_code", 1000.0),
    "http.server.duration": ("http.status_code", 1.0),  # the semantic conventions before v1.20: ms
}
"""Histograms that are the app's request series: the status attribute and the default unit's factor to ms."""
UNIT_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 0.001, "ns": 1e-6}
MB = 1024.0 * 1024.0
RUNTIME_METRICS: dict[str, tuple[str, float]] = {
    "process.memory.usage": ("memory_rss_mb", 1 / MB),
    "process.memory.swap": ("memory_swap_mb", 1 / MB),
    "process.memory.limit": ("memory_quota_mb", 1 / MB),
    "system.cpu.load_average.1m": ("load_avg_1m", 1.0),
}
"""Gauges and sums that are the memory and load charts: the Runtime field and the factor to its unit."""
MAX_ATTRIBUTES = 128
"""Attributes a point may carry (the OpenTelemetry SDKs' own default attribute count limit)."""
MAX_ATTRIBUTE_BYTES = 16 * 1024
MAX_REASONS = 5
"""Distinct reasons written into a partial success's ``error_message``."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}\Z")
_DYNO = re.compile(r"[a-z][a-z0-9_-]{0,59}\.[0-9]{1,6}\Z")
_PROCESS_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,59}\Z")
DELTA, CUMULATIVE = 1, 2
NO_RECORDED_VALUE = 1
"""DataPointFlags: the point marks a stream as stale; it carries no value."""


class BodyError(ValueError):
    """The request cannot be read at all (400, not retried)."""


@dataclass(slots=True)
class Mapped:
    observations: list[models.Observation] = field(default_factory=list)
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def refuse(self, reason: str, n: int = 1) -> None:
        self.rejected += n
        self.reasons[reason] += n

    def message(self) -> str:
        """The partial success's ``error_message``: the commonest reasons first, each with its count."""
        parts = [f"{reason} ({n})" for reason, n in self.reasons.most_common(MAX_REASONS)]
        more = len(self.reasons) - MAX_REASONS
        return "; ".join(parts) + (f"; and {more} other reasons" if more > 0 else "")


def decode(body: bytes, content_type: str) -> ExportMetricsServiceRequest:
    """The request message; BodyError when it cannot be read."""
    req = ExportMetricsServiceRequest()
    try:
        if content_type == PROTOBUF:
            req.ParseFromString(body)
        else:
            json_format.Parse(body, req, ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        what = "protobuf" if content_type == PROTOBUF else "OTLP JSON"
        raise BodyError(f"the body is not a readable {what} ExportMetricsServiceRequest: {exc}") from None
    return req


def response(mapped: Mapped, content_type: str) -> bytes:
    """ExportMetricsServiceResponse, in the request's encoding; ``partial_success`` only when points were
    refused (an empty one means full success)."""
    resp = ExportMetricsServiceResponse()
    if mapped.rejected:
        resp.partial_success.rejected_data_points = mapped.rejected
        resp.partial_success.error_message = mapped.message()
    return _encoded(resp, content_type)


def status(code: int, message: str, content_type: str) -> bytes:
    """A google.rpc.Status, the body OTLP prescribes for a failed request (``code``: a gRPC status code)."""
    return _encoded(status_pb2.Status(code=code, message=message), content_type)


def _encoded(msg: Any, content_type: str) -> bytes:
    if content_type == PROTOBUF:
        out: bytes = msg.SerializeToString()
        return out
    return str(json_format.MessageToJson(msg, indent=None)).encode()


def dyno_of(resource: dict[str, Any]) -> str:
    """The dyno a resource's points count for (docs/otlp.md#process-type), first match wins: a dyno name
    (``web.1``, Heroku's ``$DYNO``) in ``service.instance.id``, ``host.name`` or ``host.id``; a process type
    in ``heroku.process.type`` or ``process.type``; the head of a Fir dyno name (``web-6b9d8c7f5-x2x9q``) in
    one of the first three; else ``web``. The semantic conventions put Heroku's dyno UUID
    (``HEROKU_DYNO_ID``) in ``service.instance.id``: no process type can be read from that."""
    names = [v for k in DYNO_KEYS if isinstance(v := resource.get(k), str)]
    for name in names:
        if _DYNO.match(name):
            return name
    for key in ("heroku.process.type", "process.type"):
        ptype = resource.get(key)
        if isinstance(ptype, str) and _PROCESS_TYPE.match(ptype):
            return ptype
    for name in names:
        head, dash, rest = name.partition("-")
        if dash and _PROCESS_TYPE.match(head) and _FIR_SUFFIX.match(rest):
            return head
    return "web"


DYNO_KEYS = ("service.instance.id", "host.name", "host.id")
_FIR_SUFFIX = re.compile(r"[0-9a-z]{5,10}-[0-9a-z]{5}\Z")
RESOURCE_KEYS = frozenset({*DYNO_KEYS, "heroku.process.type", "process.type"})


def map_request(req: ExportMetricsServiceRequest, app: str, *, now_ms: int, max_future_ms: int,
                max_metric_names: int) -> Mapped:
    """Every point of ``req`` as observations of ``app``, or refused with its reason."""
    out = Mapped()
    future_ms = now_ms + max_future_ms
    names: dict[str, set[str]] = {}  # process type -> custom names taken in this request
    for rm in req.resource_metrics:
        resource = {kv.key: _value(kv.value) for kv in rm.resource.attributes if kv.key in RESOURCE_KEYS}
        dyno = dyno_of(resource)
        proc = models.process_type(dyno) or "web"
        taken = names.setdefault(proc, set())
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _map_metric(metric, app, dyno, out, future_ms, taken, max_metric_names)
    return out


def _map_metric(metric: Any, app: str, dyno: str, out: Mapped, future_ms: int, taken: set[str],
                max_names: int) -> None:
    kind = metric.WhichOneof("data")
    name = metric.name
    if kind is None:
        return  # a metric with no data: nothing to refuse
    data = getattr(metric, kind)
    points = data.data_points
    if not points:
        return
    if not _NAME.match(name):
        out.refuse(f"metric name {name[:60]!r} is not 1..200 characters of [A-Za-z0-9_.-:/]", len(points))
        return
    request = REQUEST_METRICS.get(name)
    if request is not None and kind in ("histogram", "exponential_histogram"):
        if data.aggregation_temporality not in (DELTA, CUMULATIVE):
            out.refuse("aggregation temporality unspecified", len(points))
            return
        factor = UNIT_TO_MS.get(metric.unit, request[1])
        cumulative = data.aggregation_temporality == CUMULATIVE
        for p in points:
            if _usable(p, out, future_ms):
                _request_histogram(p, kind, app, dyno, request[0], factor, cumulative, out)
        return
    runtime = RUNTIME_METRICS.get(name)
    if runtime is not None and kind in ("gauge", "sum"):
        fld, factor = runtime
        for p in points:
            if _usable(p, out, future_ms):
                v = _number(p, out)
                if v is not None:
                    if v < 0:
                        out.refuse(f"{name} must be >= 0")
                        continue
                    out.observations.append(models.Runtime(app, dyno, p.time_unix_nano // 1_000_000,
                                                           **{fld: v * factor}))
        return
    if name not in taken:
        if len(taken) >= max_names:
            out.refuse(f"more than {max_names} custom metric names for one process type in one request (the "
                       "app's max_metric_names): keep ids out of metric names", len(points))
            return
        taken.add(name)
    if kind == "gauge":
        for p in points:
            if _usable(p, out, future_ms) and (v := _number(p, out)) is not None:
                out.observations.append(models.Metric(app, dyno, p.time_unix_nano // 1_000_000, name, "gauge", v))
    elif kind == "sum":
        temporality = data.aggregation_temporality
        if temporality not in (DELTA, CUMULATIVE):
            out.refuse("aggregation temporality unspecified", len(points))
            return
        level = temporality == CUMULATIVE and not data.is_monotonic  # an up-down counter's current value
        for p in points:
            if not (_usable(p, out, future_ms) and (v := _number(p, out)) is not None):
                continue
            ts_ms = p.time_unix_nano // 1_000_000
            if level:
                out.observations.append(models.Metric(app, dyno, ts_ms, name, "gauge", v))
            elif temporality == DELTA:
                out.observations.append(models.Metric(app, dyno, ts_ms, name, "counter", v))
            else:
                out.observations.append(models.Metric(app, dyno, ts_ms, name, "counter", v,
                                                      _stream(dyno, name, p.attributes),
                                                      p.start_time_unix_nano // 1_000_000))
    elif kind in ("histogram", "exponential_histogram"):
        temporality = data.aggregation_temporality
        if temporality not in (DELTA, CUMULATIVE):
            out.refuse("aggregation temporality unspecified", len(points))
            return
        for p in points:
            if not _usable(p, out, future_ms):
                continue
            sid = _stream(dyno, name, p.attributes) if temporality == CUMULATIVE else None
            shape = _shape(p, kind, 1.0, out)
            if shape is not None:
                bounds, counts, lo, hi, total = shape
                out.observations.append(models.Histogram(
                    app, dyno, p.time_unix_nano // 1_000_000, p.count, total, bounds, counts, lo, hi, name,
                    None, sid, None if sid is None else p.start_time_unix_nano // 1_000_000))
    elif kind == "summary":
        _summary(points, app, dyno, name, out, future_ms)


def _request_histogram(p: Any, kind: str, app: str, dyno: str, status_key: str, factor: float,
                       cumulative: bool, out: Mapped) -> None:
    code = None
    for kv in p.attributes:
        if kv.key == status_key:
            code = _value(kv.value)
            break
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 599:
        out.refuse(f"a request duration point needs {status_key} (100..599)")
        return
    shape = _shape(p, kind, factor, out)
    if shape is None:
        return
    bounds, counts, lo, hi, total = shape
    if total < 0 or (lo is not None and lo < 0):
        out.refuse("request durations must be >= 0")
        return
    sid = start = None
    if cumulative:  # differenced per stream by the worker (tables/streams.py)
        sid = _stream(dyno, "", p.attributes)
        start = p.start_time_unix_nano // 1_000_000
    out.observations.append(models.Histogram(app, dyno, p.time_unix_nano // 1_000_000, p.count, total, bounds,
                                             counts, lo, hi, None, code, sid, start))


def _shape(p: Any, kind: str, factor: float, out: Mapped
           ) -> tuple[list[float], list[int], float | None, float | None, float] | None:
    """(bounds, counts, min, max, sum) of a histogram point in the observation's form, scaled by ``factor``."""
    total = p.sum * factor if p.HasField("sum") else None
    lo = p.min * factor if p.HasField("min") else None
    hi = p.max * factor if p.HasField("max") else None
    if ((total is not None and not math.isfinite(total)) or (lo is not None and not math.isfinite(lo))
            or (hi is not None and not math.isfinite(hi))):
        out.refuse("histogram sum, min or max is NaN or infinite")
        return None
    counts = list(p.bucket_counts) if kind == "histogram" else None
    if counts is not None:
        raw = tuple(p.explicit_bounds)
        got = _BOUNDS.get((raw, factor))
        if got is None:
            got = _checked_bounds([b * factor for b in raw])
            if len(_BOUNDS) >= _BOUNDS_MAX:
                _BOUNDS.clear()
            _BOUNDS[raw, factor] = got
        if isinstance(got, str):
            out.refuse(got)
            return None
        bounds = got
        if not counts:
            counts = [p.count]
        if len(counts) != len(bounds) + 1:
            out.refuse(f"{len(counts)} bucket counts for {len(bounds)} explicit bounds (there must be one more)")
            return None
    else:
        exp = _exponential(p, factor, out)
        if exp is None:
            return None
        bounds, counts = exp
        problem = _checked_bounds(bounds)
        if isinstance(problem, str):
            out.refuse(problem)
            return None
    if sum(counts) != p.count:
        out.refuse(f"histogram bucket counts add up to {sum(counts)}, not its count {p.count}")
        return None
    if total is None:
        total = _midpoint_sum(bounds, counts, lo, hi)
    return bounds, counts, lo, hi, total


_BOUNDS: dict[tuple[tuple[float, ...], float], list[float] | str] = {}
"""Explicit bounds seen lately, scaled and checked once: an SDK sends the same few on every point."""
_BOUNDS_MAX = 1024


def _checked_bounds(bounds: list[float]) -> list[float] | str:
    """The bounds, or why they cannot be used."""
    if len(bounds) > models.MAX_BUCKETS:
        return f"more than {models.MAX_BUCKETS} histogram buckets"
    if not all(map(math.isfinite, bounds)) or any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
        return "histogram bounds must be finite and strictly ascending"
    return bounds


def _midpoint_sum(bounds: list[float], counts: list[int], lo: float | None, hi: float | None) -> float:
    """A histogram without a sum (allowed for ones with negative values): its buckets' midpoints."""
    total = 0.0
    for i, c in enumerate(counts):
        if c:
            a = bounds[i - 1] if i > 0 else (lo if lo is not None else bounds[0] if bounds else 0.0)
            b = bounds[i] if i < len(bounds) else (hi if hi is not None else bounds[-1] if bounds else a)
            total += c * (a + b) / 2
    return total


def _exponential(p: Any, factor: float, out: Mapped) -> tuple[list[float], list[int]] | None:
    """An exponential histogram point as explicit bounds: bucket ``i`` of scale ``s`` is
    ``(2**(i/2**s), 2**((i+1)/2**s)]`` (negatives mirrored), the zero bucket ``[-threshold, threshold]``.
    The bound formula keeps a downscaled stream's bounds identical floats, so cumulative points difference."""
    scale = p.scale
    if not -10 <= scale <= 20:
        out.refuse(f"exponential histogram scale {scale} outside -10..20")
        return None
    step = 2.0 ** -scale
    bounds: list[float] = []
    counts: list[int] = [0]

    def add(a: float, b: float, c: int) -> None:
        if bounds and a < bounds[-1]:
            a = bounds[-1]
        if b <= a:
            counts[-2 if len(counts) > 1 else -1] += c
            return
        if not bounds or bounds[-1] != a:
            bounds.append(a)
            counts.append(0)
        counts[-1] += c
        bounds.append(b)
        counts.append(0)

    try:
        neg = p.negative
        for k in range(len(neg.bucket_counts) - 1 if any(neg.bucket_counts) else -1, -1, -1):
            idx = neg.offset + k
            add(-(2.0 ** ((idx + 1) * step)) * factor, -(2.0 ** (idx * step)) * factor, neg.bucket_counts[k])
        if p.zero_count:
            zt = p.zero_threshold * factor
            add(-zt if zt > 0 else math.nextafter(0.0, -1.0), zt, p.zero_count)
        pos = p.positive
        for k, c in enumerate(pos.bucket_counts):
            idx = pos.offset + k
            add((2.0 ** (idx * step)) * factor, (2.0 ** ((idx + 1) * step)) * factor, c)
    except OverflowError:
        out.refuse("exponential histogram bucket beyond float range")
        return None
    return bounds, counts


def _summary(points: Iterable[Any], app: str, dyno: str, name: str, out: Mapped, future_ms: int) -> None:
    """A summary's quantiles cannot be merged across dynos or minutes: its count and sum (cumulative, since
    start) become counters ``<name>.count`` and ``<name>.sum``, each quantile a gauge ``<name>.q<q>``
    (``q0`` and ``q1`` are the dyno's min and max), whose mean, max and last are over the dynos' values."""
    for p in points:
        if not _usable(p, out, future_ms):
            continue
        if not math.isfinite(p.sum) or any(not math.isfinite(q.value) for q in p.quantile_values):
            out.refuse("summary sum or quantile is NaN or infinite")
            continue
        ts_ms, start_ms = p.time_unix_nano // 1_000_000, p.start_time_unix_nano // 1_000_000
        if len(name) > 194:
            out.refuse("a summary's name must leave room for .count and .sum (194 characters at most)")
            continue
        for suffix, v in ((".count", float(p.count)), (".sum", p.sum)):
            out.observations.append(models.Metric(app, dyno, ts_ms, name + suffix, "counter", v,
                                                  _stream(dyno, name + suffix, p.attributes), start_ms))
        for q in p.quantile_values:
            qname = f"{name}.q{q.quantile:g}"
            if not 0.0 <= q.quantile <= 1.0 or len(qname) > 200:
                out.refuse("a summary quantile must be in 0..1, and its gauge's name (<name>.q<q>) 200 characters "
                           "at most")
                continue
            out.observations.append(models.Metric(app, dyno, ts_ms, qname, "gauge", q.value))


def _usable(p: Any, out: Mapped, future_ms: int) -> bool:
    """Whether a point has a time, is not a staleness marker, is not from the future, and its attributes
    are of a sane size (they are read only to tell cumulative streams apart)."""
    if p.flags & NO_RECORDED_VALUE:
        return False
    attributes = p.attributes
    if attributes:
        if len(attributes) > MAX_ATTRIBUTES:
            out.refuse(f"more than {MAX_ATTRIBUTES} attributes on a point")
            return False
        # The whole point's size bounds its attributes': one C call, summed per attribute only when over.
        size = p.ByteSize()
        if size > MAX_ATTRIBUTE_BYTES and (size := sum(kv.ByteSize() for kv in attributes)) > MAX_ATTRIBUTE_BYTES:
            out.refuse(f"a point's attributes take {size} bytes, over {MAX_ATTRIBUTE_BYTES}")
            return False
    ts_ms = p.time_unix_nano // 1_000_000
    if ts_ms <= 0:
        out.refuse("time_unix_nano missing")
        return False
    if ts_ms > future_ms:
        out.refuse("time_unix_nano is ahead of the ingest's clock by more than the allowed skew")
        return False
    return True


def _number(p: Any, out: Mapped) -> float | None:
    which = p.WhichOneof("value")
    if which is None:
        out.refuse("number point without a value")
        return None
    v = float(getattr(p, which))
    if not math.isfinite(v) or abs(v) > 1e300:
        out.refuse("value is NaN or infinite")
        return None
    return v


def _stream(dyno: str, name: str, attributes: Any) -> str:
    """A cumulative stream's id within the app: its dyno, metric and attributes (order-free), hashed."""
    parts = sorted(kv.SerializeToString(deterministic=True) for kv in attributes)
    h = blake2b(dyno.encode(), digest_size=8)
    h.update(b"\0" + name.encode() + b"\0")
    for part in parts:
        h.update(len(part).to_bytes(4, "little") + part)
    return h.hexdigest()


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return None if which is None else getattr(v, which)

