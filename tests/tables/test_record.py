"""The stored record (tables/record.py): version 2 gives back the same aggregate, float for float, and the
same bytes every time; version 1 items, as the sink and the rollup job wrote them, still read."""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.storage.codec import pack, unpack
from tables import record as records
from tables.aggregate import RESOLUTIONS, Aggregate, BucketKey
from tables.digest import Digest

T0 = 1_796_169_600
MC = (20, 50, 1000)
names = st.text(min_size=1, max_size=12)


def service_times(draw: st.DrawFn) -> list[float]:
    """Integer ms, decimals of 1-6 digits, or any float: each takes its own digest form."""
    kind = draw(st.sampled_from(("int", "decimal", "float")))
    if kind == "int":
        return draw(st.lists(st.integers(0, 100_000).map(float), max_size=300))
    if kind == "decimal":
        k = draw(st.integers(1, 6))
        return draw(st.lists(st.integers(0, 10**8).map(lambda i: i / 10**k), max_size=300))
    return draw(st.lists(st.floats(allow_nan=False, width=64, min_value=-1e9, max_value=1e9), max_size=300))


def maybe_tdigest(draw: st.DrawFn, agg: Aggregate, digest: Digest) -> Digest:
    """Either mode: a small exact limit turns the digest into a t-digest once it holds more values."""
    if draw(st.booleans()):
        return Digest(agg.max_centroids, exact_limit=draw(st.integers(1, 8)))
    return digest


@st.composite
def aggregates(draw: st.DrawFn) -> Aggregate:
    agg = Aggregate(BucketKey(draw(names), draw(names), draw(st.integers(0, 2**42)) * 1000),
                    resolution_s=draw(st.sampled_from(RESOLUTIONS)), max_centroids=draw(st.sampled_from(MC)))
    agg.offset = draw(st.integers(-1, 2**40))
    agg.response.digest = maybe_tdigest(draw, agg, agg.response.digest)
    values = service_times(draw)
    statuses = draw(st.lists(st.sampled_from((101, 200, 204, 302, 404, 500, 503)), min_size=len(values),
                             max_size=len(values)))
    for v, s in zip(values, statuses, strict=True):
        agg.add_request(s, v, "H12" if s == 503 else None)
    for _ in range(draw(st.integers(0, 3))):  # router errors without a service time
        agg.add_request(503, None, draw(st.sampled_from(("H10", "H13", "H99"))))
    floats = st.none() | st.floats(0, 1e6, allow_nan=False)
    for _ in range(draw(st.integers(0, 4))):
        agg.add_runtime(draw(floats), draw(floats), draw(floats), draw(floats), draw(floats))
    ts_ms = st.integers(0, 2**41)
    for name in draw(st.lists(names, max_size=3, unique=True)):
        agg.add_metric(name, "timer", 0.0, 0)
        agg.timers[name].digest = maybe_tdigest(draw, agg, agg.timers[name].digest)
        for v in service_times(draw):
            agg.add_metric(name, "timer", v, draw(ts_ms))
    for name in draw(st.lists(names, max_size=3, unique=True)):
        for v in draw(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1, max_size=3)):
            agg.add_metric("c." + name, "counter", v, draw(ts_ms))
            agg.add_metric("g." + name, "gauge", v, draw(ts_ms))
    for src in draw(st.lists(names, max_size=2, unique=True)):
        agg.add_addon(src, draw(st.dictionaries(names, st.floats(-1e6, 1e6, allow_nan=False), max_size=3)),
                      draw(ts_ms))
    for name in draw(st.lists(names, max_size=3)):
        agg.add_event(name, draw(st.integers(1, 5)))
    return agg


mins_sets = st.none() | st.sets(st.integers(0, 119).map(lambda i: T0 + 60 * i)) | st.sets(
    st.integers(-(2**40), 2**40), max_size=20)


def same(a: Aggregate, b: Aggregate) -> None:
    assert b.to_record() == a.to_record()
    assert orjson.dumps(b.to_record()) == orjson.dumps(a.to_record())  # the same floats, -0.0 included
    assert b.response.digest.exact == a.response.digest.exact
    assert all(b.timers[k].digest.exact == t.digest.exact for k, t in a.timers.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(aggregates(), mins_sets)
def test_version_2_round_trips_exactly_and_deterministically(agg: Aggregate, mins: set[int] | None) -> None:
    payload = records.encode(agg, mins=mins)
    assert payload[0] == records.V2
    back, got = records.decode(payload)
    same(agg, back)
    assert got == (None if mins is None else sorted(mins))
    assert records.encode(back, mins=got) == payload  # what was read back stores as the same bytes
    # and as the sink makes it: from the metrics-1m JSON
    minute = Aggregate.from_record(orjson.loads(orjson.dumps(agg.to_record())))
    again = records.decode(records.encode(minute, mins=mins))[0]
    same(minute, again)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(aggregates(), mins_sets)
def test_version_1_is_the_json_the_sink_and_rollup_wrote(agg: Aggregate, mins: set[int] | None) -> None:
    rec = agg.to_record()
    if mins is not None:
        rec["mins"] = sorted(mins)  # agents/rollup.py's Bucket.record
    old = orjson.dumps(rec)
    assert records.encode(agg, mins=mins, version=1) == records.encode_v1(agg, mins) == old
    back, got = records.decode(old)
    assert back.to_record() == Aggregate.from_record(orjson.loads(old)).to_record()
    assert got == (None if mins is None else sorted(mins))


def runtime_minute(n: int, seed: int = 7) -> Aggregate:
    """``n`` requests with integer-ms service times (lognormal(3.0, 0.8), rounded) and 3 runtime samples."""
    rng = np.random.default_rng(seed)
    agg = Aggregate(BucketKey("app-0", "web", T0 * 1000))
    statuses = rng.choice([200, 200, 200, 200, 200, 301, 404, 500], n).tolist()
    for s, v in zip(statuses, np.round(rng.lognormal(3.0, 0.8, n)).tolist(), strict=True):
        agg.add_request(s, v, "H12" if s == 500 and v > 60 else None)
    for i in range(3):
        agg.add_runtime(281.38 + i, 0.0, 449.41 + 1.5 * i, 512.0, 1.08 + i / 10)
    return Aggregate.from_record(orjson.loads(orjson.dumps(agg.to_record())))  # as the sink reads it


def test_a_busy_minute_fits_one_write_unit() -> None:
    sizes = {}
    for n in (60, 600, 6000):
        agg = runtime_minute(n)
        v1, v2 = records.encode_v1(agg), records.encode(agg)
        sizes[n] = (len(v1), len(v2))
        same(agg, records.decode(v2)[0])
    print("requests: (v1 JSON bytes, v2 bytes)", sizes)
    assert sizes[6000][1] < 800 and sizes[6000][1] * 5 < sizes[6000][0]


def test_a_full_rollup_bucket_lists_its_minutes_in_a_few_bytes() -> None:
    agg = runtime_minute(600)
    full = [T0 + 60 * i for i in range(120)]
    assert len(records.mins_bytes(full)) < 25  # a bitmap
    assert len(records.mins_bytes(full[::40])) < 10  # a list
    assert records.mins_of(records.mins_bytes([])) == []
    assert records.decode(records.encode(agg, mins=full))[1] == full
    assert len(records.encode(agg, mins=full)) < len(records.encode(agg)) + 25


def test_the_backends_leave_version_2_as_it_is_and_unzip_old_gzipped_items() -> None:
    rng = np.random.default_rng(5)
    big = runtime_minute(6000)
    big.response.digest = Digest(1000, exact_limit=100)
    big.response.digest.add_many(rng.lognormal(3.0, 0.8, 50_000).tolist())  # a t-digest of ~1000 centroids
    for agg in (runtime_minute(6000), big):
        payload = records.encode(agg)
        assert pack(payload, 0) == (payload, False)  # gzip cannot shrink deflated bytes: stored as they are
        old = records.encode_v1(agg, [T0])
        zipped, z = pack(old, 1024)
        assert z and records.decode(unpack(zipped, z, "item"))[0].to_record() == agg.to_record()


def v2(obj: Any) -> bytes:
    deflate = zlib.compressobj(records.LEVEL, zlib.DEFLATED, -15)
    return bytes([records.V2]) + deflate.compress(msgspec.msgpack.encode(obj)) + deflate.flush()


def test_anything_else_is_a_value_error_that_says_what() -> None:
    good = records.encode(runtime_minute(600), mins=[T0, T0 + 60])
    rec = msgspec.msgpack.decode(zlib.decompress(good[1:], -15))
    cases = {
        b"": "empty",
        b"\x03abc": "starts with byte 0x03",
        b"\x1f\x8b\x08": "starts with byte 0x1f",
        good[:-3]: "truncated",
        good + b"x": "after the deflate stream",
        b"\x02not deflate": "version 2",
        v2([1, 2]): "not a msgpack map",
        v2({**rec, "v": 7}): "unsupported aggregate record version 7",
        v2({**rec, "resp": {**rec["resp"], "d": {"exact": True}}}): "expected msgpack bin",
        v2({**rec, "mins": b"\x09"}): "unknown mins form",
        v2({k: v for k, v in rec.items() if k != "app"}): "'app'",
        b"{not json": "version 1",
        b"{}": "version 1",
        orjson.dumps({**orjson.loads(records.encode_v1(runtime_minute(60))), "st": "x"}): "version 1",
    }
    for payload, match in cases.items():
        with pytest.raises(ValueError, match=match):
            records.decode(payload)
    with pytest.raises(ValueError, match="unknown record version 3"):
        records.encode(runtime_minute(60), version=3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_value_error(data: bytes) -> None:
    for payload in (data, b"\x02" + data, v2(data), b"{" + data):
        with contextlib.suppress(ValueError):
            records.decode(payload)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mangled_record_never_raises_anything_but_value_error(data: st.DataObject) -> None:
    rec = msgspec.msgpack.decode(zlib.decompress(records.encode(runtime_minute(60), mins=[T0])[1:], -15))
    for key in data.draw(st.lists(st.sampled_from(sorted(rec)), min_size=1, max_size=3)):
        rec[key] = data.draw(msgpack_values)
    with contextlib.suppress(ValueError):
        records.decode(v2(rec))
