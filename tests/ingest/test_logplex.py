"""Logplex frame parsing on real-format lines (../shared/notes/heroku.md), and fuzzing."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import models
from app.ingest.logplex import FrameError, parse_frame, parse_ts_ms
from app.local.loadgen import frame, render

ROUTER_INFO = (b'<158>1 2012-11-30T06:45:29.123456+00:00 host heroku router - at=info method=GET path="/foo" '
               b'host=myapp.herokuapp.com request_id=e5bb3580-44b2 fwd="50.168.96.221" dyno=web.1 connect=0ms '
               b'service=2ms status=200 bytes=415 protocol=https')
ROUTER_ERROR = (b'<158>1 2012-11-30T06:45:30Z host heroku router - at=error code=H12 desc="Request timeout" '
                b'method=GET path="/slow" host=myapp.herokuapp.com request_id=abc fwd="1.2.3.4" dyno=web.2 '
                b'connect=1ms service=30000ms status=503 bytes=0 protocol=https')
ROUTER_NO_DYNO = (b'<158>1 2012-11-30T06:45:31+00:00 host heroku router - at=error code=H13 desc="Connection closed '
                  b'without response" method=POST path="/a b" host=myapp.herokuapp.com request_id=x fwd="1.2.3.4" '
                  b'dyno=router connect= service=0ms status=503 bytes= protocol=https')
MEMORY = (b'<45>1 2012-11-30T06:45:32+00:00 host heroku web.1 - source=web.1 '
          b'dyno=heroku.2808254.d97d0ea7-cf3d-411b-b453-d2943a50b456 sample#memory_total=21.00MB '
          b'sample#memory_rss=21.22MB sample#memory_cache=0.00MB sample#memory_swap=0.00MB '
          b'sample#memory_pgpgin=348836pages sample#memory_pgpgout=343403pages sample#memory_quota=512.00MB')
LOAD = (b'<45>1 2012-11-30T06:45:32+00:00 host heroku worker.1 - source=worker.1 '
        b'dyno=heroku.2808254.d97d0ea7-cf3d-411b-b453-d2943a50b456 sample#load_avg_1m=2.46 '
        b'sample#load_avg_5m=1.06 sample#load_avg_15m=0.99')
APP_LINE = b"<40>1 2012-11-30T06:45:29+00:00 host app web.3 - State changed from starting to up"
T = 1354257929000  # 2012-11-30T06:45:29Z


def test_heroku_example_frame_and_octet_counts() -> None:
    body = b"83 <40>1 2012-11-30T06:45:29+00:00 host app web.3 - State changed from starting to up\n"
    assert body == frame([APP_LINE])
    parsed = parse_frame(body, "myapp")
    assert (parsed.messages, parsed.ignored, parsed.observations, parsed.bad) == (1, 1, [], [])


def test_router_lines() -> None:
    p = parse_frame(frame([ROUTER_INFO, ROUTER_ERROR, ROUTER_NO_DYNO]), "myapp")
    assert p.messages == 3 and not p.bad
    info, err, nodyno = p.observations
    assert info == {"kind": "router", "app": "myapp", "dyno": "web.1", "ts": T + 123, "status": 200,
                    "service_ms": 2.0, "connect_ms": 0.0, "bytes": 415, "code": None}
    assert (err["code"], err["status"], err["service_ms"], err["ts"], err["dyno"]) == ("H12", 503, 30000.0, T + 1000,
                                                                                       "web.2")
    assert (nodyno["dyno"], nodyno["connect_ms"], nodyno["bytes"], nodyno["code"]) == ("router", None, None, "H13")


def test_runtime_lines() -> None:
    p = parse_frame(frame([MEMORY, LOAD]), "myapp")
    mem, load = p.observations
    assert mem == {"kind": "runtime", "app": "myapp", "dyno": "web.1", "ts": T + 3000, "memory_total_mb": 21.0,
                   "memory_rss_mb": 21.22, "memory_swap_mb": 0.0, "memory_quota_mb": 512.0}
    assert load == {"kind": "runtime", "app": "myapp", "dyno": "worker.1", "ts": T + 3000, "load_avg_1m": 2.46}


def test_unparseable_router_and_runtime_lines_are_reported_and_the_rest_counts() -> None:
    broken_router = b"<158>1 2012-11-30T06:45:29+00:00 host heroku router - at=info method=GET status=oops"
    broken_ts = ROUTER_INFO.replace(b"2012-11-30T06:45:29.123456+00:00", b"yesterday-at-noon")
    bad_units = MEMORY.replace(b"memory_rss=21.22MB", b"memory_rss=21.22furlongs")
    p = parse_frame(frame([broken_router, ROUTER_INFO, broken_ts, bad_units, LOAD]), "myapp")
    assert len(p.observations) == 2 and len(p.bad) == 3
    assert "oops" in p.bad[0].reason and "timestamp" in p.bad[1].reason and "MB" in p.bad[2].reason
    assert p.bad[0].line.startswith("<158>1")


def test_frame_errors() -> None:
    for body in (b"abc <40>1 x", b"500 <40>1 too short", b"12345678901 x"):
        try:
            parse_frame(body, "a")
        except FrameError:
            continue
        raise AssertionError(f"{body!r} should not parse")


def test_timestamps() -> None:
    assert parse_ts_ms(b"2012-11-30T06:45:29Z") == T
    assert parse_ts_ms(b"2012-11-30T06:45:29.5Z") == T + 500
    assert parse_ts_ms(b"2012-11-30T08:45:29.999999+02:00") == T + 999
    assert parse_ts_ms(b"2012-11-30T01:45:29-05:00") == T


@pytest.mark.parametrize("fraction, ms", [("", 0), (".5", 500), (".05", 50), (".123", 123), (".123456", 123),
                                          (".000999", 0), (".9", 900)])
def test_router_fast_path_fractions(fraction: str, ms: int) -> None:
    line = ROUTER_INFO.replace(b"29.123456+00:00", f"29{fraction}+00:00".encode())
    (obs,) = parse_frame(frame([line]), "myapp").observations
    assert obs["ts"] == T + ms


def test_loadgen_lines_round_trip() -> None:
    o = {"kind": "router", "app": "shop", "dyno": "web.3", "ts": T + 7, "status": 404, "service_ms": 17.0,
         "connect_ms": 1.0, "bytes": 99, "code": None}
    p = parse_frame(frame(render(o)), "shop")
    assert p.observations == [o]


REAL_FORMS = [ROUTER_INFO, ROUTER_ERROR, ROUTER_NO_DYNO, MEMORY, LOAD,
              b'<158>1 2012-11-30T06:45:29Z host heroku router - sock=client at=warning code=H27 desc="x" method=GET '
              b'path="/" host=a.b dyno= connect= service= status=499 bytes= protocol=https',
              b"<134>1 2012-11-30T06:45:29Z host app heroku-postgres - source=DATABASE addon=pg-1 "
              b"sample#db_size=104857600bytes sample#active-connections=7 sample#memory-free=1024kB sample#x=5KiB",
              b"<190>1 2012-11-30T06:45:29Z host app web.1 - source=eu count#orders=2 measure#checkout=1.5s "
              b"sample#cache=64MB",
              b"<45>1 2012-11-30T06:45:29Z host heroku web.1 - Error R14 (Memory quota exceeded)",
              b"<134>1 2012-11-30T06:45:29Z host app api - Scaled to web@3:Standard-1X worker@2:Standard-2X by user x"]
lines = st.one_of(st.binary(max_size=300), st.sampled_from(REAL_FORMS),
                  st.builds(lambda b, i, j: b[:i] + b[j:], st.sampled_from(REAL_FORMS),
                            st.integers(0, 250), st.integers(0, 250)))


@settings(max_examples=400, deadline=None)
@given(st.lists(lines, max_size=8))
def test_fuzz_well_framed_garbage_never_raises(msgs: list[bytes]) -> None:
    p = parse_frame(frame(msgs), "fuzz")
    assert p.messages == len(msgs)
    assert len(p.bad) + p.ignored <= len(msgs)
    assert len(p.observations) > 0 or len(p.bad) + p.ignored == len(msgs)
    for o in p.observations:  # whatever the parser lets through, the contract accepts as it is
        decoded = models.decode(orjson.dumps(o), 1 << 20)
        assert isinstance(decoded, models.Decoded) and not decoded.rejects, (o, decoded)
        assert o["app"] == "fuzz"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_raise_only_frame_error(body: bytes) -> None:
    with contextlib.suppress(FrameError):
        parse_frame(body, "fuzz")


def test_leading_zeros_still_give_valid_json() -> None:
    line = ROUTER_INFO.replace(b"bytes=415", b"bytes=007").replace(b"service=2ms", b"service=02ms")
    p = parse_frame(frame([line, ROUTER_INFO.replace(b"connect=0ms", b"connect=00ms")]), "myapp")
    assert [(o["bytes"], o["service_ms"]) for o in p.observations] == [(7, 2.0), (415, 2)]
    assert p.observations[1]["connect_ms"] == 0.0
