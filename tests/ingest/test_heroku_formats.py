"""Every real-world Heroku log format the drain takes (../shared/notes/heroku.md), line by line, then a frame of
all of them through the contract and the aggregation windows: what each line becomes, and that only really
malformed lines are dead-lettered.

The lines are written here from the documented formats (router error lines with empty fields, ``sock=``,
``queue=``/``wait=``, add-on metrics, platform events, l2met); they are not copied from any published log.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app import models
from app.clock import ManualClock
from app.ingest.logplex import parse_frame
from app.local.loadgen import frame
from tables.windows import IngestResult, PartitionWindows

TS = b"2026-11-02T10:15:07.204518+00:00"
T = 1_793_614_507_204  # TS in epoch ms
HOST = b'host=shop.herokuapp.com request_id=0b7f1c1e-2f6a-4c1e-9d0e-5a1f3c2b7d11 fwd="203.0.113.9"'


def router_line(body: bytes, ts: bytes = TS, pri: bytes = b"158") -> bytes:
    return b"<" + pri + b">1 " + ts + b" host heroku router - " + body


def dyno_line(proc: bytes, text: bytes, app: bytes = b"heroku", pri: bytes = b"45") -> bytes:
    return b"<" + pri + b">1 " + TS + b" host " + app + b" " + proc + b" - " + text


def one(line: bytes, app: str = "shop") -> dict[str, Any]:
    p = parse_frame(frame([line]), app)
    assert p.messages == 1 and not p.bad and p.ignored == 0, (p.bad, p.ignored)
    (o,) = p.observations
    return o


# --- router lines where the router answered itself: empty fields, no service time -----------------------------

NO_DYNO_CODES = [(b"H10", b"App crashed", 503), (b"H11", b"Backlog too deep", 503),
                 (b"H14", b"No web dynos running", 503), (b"H16", b"Redirect to herokuapp.com", 301),
                 (b"H20", b"App boot timeout", 503), (b"H22", b"Connection limit reached", 503),
                 (b"H23", b"Endpoint misconfigured", 503), (b"H26", b"Request Error", 400),
                 (b"H70", b"Access to bamboo HTTP endpoint denied", 503), (b"H80", b"Maintenance mode", 503),
                 (b"H81", b"Blank app", 502), (b"H82", b"Free dyno quota exhausted", 503),
                 (b"H99", b"Platform error", 503)]


@pytest.mark.parametrize("code, desc, status", NO_DYNO_CODES)
def test_router_errors_with_empty_fields_count_without_a_service_time(code: bytes, desc: bytes, status: int) -> None:
    at = b"info" if code in (b"H16", b"H80", b"H81", b"H82") else b"error"
    line = router_line(b"at=" + at + b" code=" + code + b' desc="' + desc + b'" method=GET path="/" ' + HOST +
                       b" dyno= connect= service= status=" + str(status).encode() + b" bytes= protocol=https")
    o = one(line)
    assert o == {"kind": "router", "app": "shop", "dyno": "router", "ts": T, "status": status, "service_ms": None,
                 "connect_ms": None, "bytes": None, "code": code.decode()}
    assert models.process_type(o["dyno"]) == "web"


def test_router_errors_with_a_dyno_but_no_service_time() -> None:
    h19 = one(router_line(b'at=error code=H19 desc="Backend connection timeout" method=GET path="/" ' + HOST +
                          b" dyno=web.3 connect=5001ms service= status=503 bytes= protocol=https"))
    h13 = one(router_line(b'at=error code=H13 desc="Connection closed without response" method=POST path="/up" ' +
                          HOST + b" dyno=web.1 connect=0ms service=3ms status=503 bytes=0 protocol=https"))
    assert (h19["dyno"], h19["connect_ms"], h19["service_ms"], h19["code"]) == ("web.3", 5001.0, None, "H19")
    assert (h13["service_ms"], h13["bytes"]) == (3.0, 0)


def test_sock_before_at_the_current_h18_h27_form() -> None:
    h27 = one(router_line(b'sock=client at=warning code=H27 desc="Client Request Interrupted" method=POST '
                          b'path="/upload" ' + HOST + b" dyno=web.2 connect=1ms service=812ms status=499 bytes= "
                          b"protocol=https"))
    h18 = one(router_line(b'sock=backend at=error code=H18 desc="Server Request Interrupted" method=GET path="/" ' +
                          HOST + b" dyno=web.1 connect=0ms service=95ms status=503 bytes=1200 protocol=http1.1 "
                          b"tls=true tls_version=unknown"))
    bare = one(router_line(b'sock=backend at=error code=H18 desc="Server Request Interrupted" method=POST '
                           b"path=/x host=shop.example.com connect=0ms service=40ms status=503 bytes=9"))
    assert (h27["status"], h27["code"], h27["service_ms"], h27["bytes"]) == (499, "H27", 812.0, None)
    assert (h18["status"], h18["code"], h18["service_ms"], h18["bytes"]) == (503, "H18", 95.0, 1200)
    assert (bare["dyno"], bare["service_ms"]) == ("router", 40.0)  # no dyno= at all: no dyno served it


def test_pre_2013_queue_and_wait_fields_are_ignored() -> None:
    o = one(router_line(b"at=info method=GET path=/api/v1/things?ids=a,b,c host=shop.herokuapp.com "
                        b"fwd=198.51.100.7 dyno=web.11 queue=0 wait=0ms connect=2ms service=31ms status=200 "
                        b"bytes=5120"))
    two_fwd = one(router_line(b'at=info method=GET path=/ host=shop.herokuapp.com request_id=9d1e fwd="198.51.100.7, '
                              b'203.0.113.1" dyno=web.1 queue=3 wait=12ms connect=1ms service=7ms status=304 bytes=0'))
    empty_fwd = one(router_line(b"at=info method=POST path=/q host=shop.herokuapp.com fwd= dyno=web.2 queue=0 "
                                b"wait=0ms connect=3ms service=5ms status=404 bytes=238"))
    assert (o["dyno"], o["service_ms"], o["connect_ms"], o["status"], o["bytes"]) == ("web.11", 31.0, 2.0, 200, 5120)
    assert (two_fwd["status"], two_fwd["service_ms"]) == (304, 7.0)
    assert (empty_fwd["dyno"], empty_fwd["status"]) == ("web.2", 404)


def test_router_lines_that_really_are_malformed_are_dead_lettered_with_a_reason() -> None:
    bad = [
        (b'at=error code=H24 desc="Forced close" method=GET path="/" dyno=web.1 connect=1ms service=80000ms status= '
         b"bytes=18", "empty status="),
        (b"at=info method=GET path=/ dyno=web.1 connect=1ms service=fast status=200 bytes=1", "service=fast"),
        (b"at=info method=GET path=/ dyno=web.1 connect=1ms service=2ms status=999 bytes=1", "outside 100..599"),
        (b"at=error code=h12! method=GET path=/ dyno=web.1 connect=1ms service=2ms status=503", "router error code"),
        (b"Error H10 (App crashed) -> GET shop.heroku.com/ web=web.1 queue=0 wait=0ms service=0ms bytes=0",
         "lacks at= or status="),
    ]
    p = parse_frame(frame([router_line(b) for b, _ in bad] + [router_line(b"at=info method=GET path=/ " + HOST +
                                                                       b" dyno=web.1 connect=1ms service=2ms "
                                                                       b"status=200 bytes=10")]), "shop")
    assert len(p.observations) == 1 and p.ignored == 0
    for got, (_, why) in zip(p.bad, bad, strict=True):
        assert why in got.reason, (got.reason, why)


# --- add-on metrics -----------------------------------------------------------------------------------------

POSTGRES = (b"source=DATABASE addon=postgresql-curved-12345 sample#current_transaction=5120 "
            b"sample#db_size=104857600bytes sample#tables=12 sample#active-connections=7 sample#waiting-connections=0 "
            b"sample#index-cache-hit-rate=0.995 sample#table-cache-hit-rate=0.98 sample#load-avg-1m=0.25 "
            b"sample#load-avg-5m=0.2 sample#load-avg-15m=0.15 sample#read-iops=1.5 sample#write-iops=3 "
            b"sample#tmp-disk-used=1024 sample#memory-total=2048000kB sample#memory-free=1024000kB "
            b"sample#memory-cached=512000kB sample#memory-postgres=20480kB sample#wal-percentage-used=0.07")
REDIS = (b"source=REDIS addon=redis-fluffy-67890 sample#active-connections=3 sample#load-avg-1m=0.05 "
         b"sample#read-iops=0 sample#write-iops=0 sample#memory-total=1024000kB sample#memory-free=512000kB "
         b"sample#memory-redis=2097152bytes sample#hit-rate=0.5 sample#evicted-keys=0")


def test_postgres_metrics_become_addon_gauges_in_mb() -> None:
    o = one(dyno_line(b"heroku-postgres", POSTGRES, app=b"app", pri=b"134"))
    assert (o["kind"], o["source"], o["addon"], o["ts"]) == ("addon", "DATABASE", "postgresql-curved-12345", T)
    s = o["samples"]
    assert s["db_size_mb"] == 100.0 and s["memory_total_mb"] == 2000.0 and s["memory_postgres_mb"] == 20.0
    assert (s["active_connections"], s["tables"], s["index_cache_hit_rate"], s["load_avg_1m"]) == (7, 12, 0.995, 0.25)
    assert s["tmp_disk_used"] == 1024 and len(s) == 18


def test_redis_metrics_with_or_without_addon_field() -> None:
    o = one(dyno_line(b"heroku-redis", REDIS, app=b"app", pri=b"134"))
    assert (o["source"], o["samples"]["memory_redis_mb"], o["samples"]["hit_rate"]) == ("REDIS", 2.0, 0.5)
    bare = one(dyno_line(b"heroku-redis", REDIS.replace(b"addon=redis-fluffy-67890 ", b""), app=b"app"))
    assert bare["addon"] is None and bare["samples"] == o["samples"]


def test_addon_lines_are_never_dead_lettered() -> None:
    odd = b"source=-DATABASE sample#db_size=lots sample#tables=3 sample#bloat=12% sample#wal=5KiB"
    p = parse_frame(frame([dyno_line(b"heroku-postgres", odd, app=b"app"),
                           dyno_line(b"heroku-postgres", b"source=DATABASE sample#db_size=big", app=b"app"),
                           dyno_line(b"heroku-postgres", b"Database maintenance starting", app=b"app")]), "shop")
    assert not p.bad and p.ignored == 2
    (o,) = p.observations
    assert o["source"] == "DATABASE" and o["samples"] == {"tables": 3.0, "bloat_pct": 12.0, "wal_kib": 5.0}
    decoded = models.decode(orjson.dumps(o), 1 << 20)  # and the contract takes it as it is
    assert isinstance(decoded, models.Decoded) and not decoded.rejects


# --- platform events ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("proc, text, name", [
    (b"web.1", b"State changed from up to crashed", "crash"),
    (b"worker.2", b"State changed from starting to crashed", "crash"),
    (b"web.1", b"Process exited with status 137", "exit"),
    (b"web.2", b"Stopping all processes with SIGTERM", "stop"),
    (b"web.2", b"Stopping process with SIGKILL", "stop"),
    (b"web.1", b"Cycling", "restart"),
    (b"web.1", b"Restarting", "restart"),
    (b"web.1", b"Error R10 (Boot timeout) -> Web process failed to bind to $PORT within 60 seconds of launch", "R10"),
    (b"worker.1", b"Error R12 (Exit timeout) -> At least one process failed to exit within 30 seconds of SIGTERM",
     "R12"),
    (b"web.3", b"Error R13 (Attach error) -> Failed to attach to process", "R13"),
    (b"worker.1", b"Error R14 (Memory quota exceeded)", "R14"),
    (b"web.1", b"Error R15 (Memory quota vastly exceeded)", "R15"),
    (b"web.1", b"Error R99 (Platform error)", "R99"),
])
def test_dyno_platform_events(proc: bytes, text: bytes, name: str) -> None:
    o = one(dyno_line(proc, text))
    assert o == {"kind": "event", "app": "shop", "dyno": proc.decode(), "ts": T, "name": name}


def test_release_is_app_wide_and_scaling_names_each_process_type() -> None:
    release = one(dyno_line(b"api", b"Release v42 created by user dev@example.com", app=b"app", pri=b"134"))
    assert (release["dyno"], release["name"]) == (models.APP_SERIES, "release")
    scaled = b"Scaled to clock@1:Standard-1X web@4:Performance-M by user ops@example.com"
    p = parse_frame(frame([dyno_line(b"api", scaled, app=b"app")]), "shop")
    assert [(o["dyno"], o["name"]) for o in p.observations] == [("clock", "scale"), ("web", "scale")]


def test_other_platform_lines_are_ignored_not_dead_lettered() -> None:
    lines = [dyno_line(b"web.1", b"State changed from starting to up"),
             dyno_line(b"web.1", b"Starting process with command `bundle exec puma -C config/puma.rb`"),
             dyno_line(b"web.1", b"Process running mem=531M(103.7%)"),
             dyno_line(b"web.1", b"Error R11 (Bad bind) -> Process bound to port 5000"),
             dyno_line(b"logplex", b"Error L10 (output buffer overflow): 20 messages dropped", pri=b"172"),
             dyno_line(b"api", b"Set SECRET_KEY config vars by user dev@example.com", app=b"app"),
             dyno_line(b"web.1", b"Listening on tcp://0.0.0.0:5000 (pid 4) -- GET / 200 in 3ms", app=b"app"),
             dyno_line(b"web.1", "Bestellung für Müller übernommen — 3 Artikel".encode(), app=b"app")]
    p = parse_frame(frame(lines), "shop")
    assert (p.messages, p.ignored, p.observations, p.bad) == (len(lines), len(lines), [], [])


# --- l2met custom metrics ---------------------------------------------------------------------------------------

def test_l2met_count_measure_sample_with_units_and_source() -> None:
    line = dyno_line(b"web.1", b"at=info source=eu-west count#orders.created=3 measure#db.query=12.5ms "
                     b"measure#render=0.25s measure#rows=40 sample#queue.depth=17 sample#cache.size=64MB", app=b"app",
                     pri=b"190")
    p = parse_frame(frame([line]), "shop")
    assert not p.bad
    got = {o["name"]: (o["type"], o["value"]) for o in p.observations}
    assert got == {"orders.created:eu-west": ("counter", 3.0), "db.query:eu-west": ("timer", 12.5),
                   "render:eu-west": ("timer", 250.0), "rows:eu-west": ("timer", 40.0),
                   "queue.depth:eu-west": ("gauge", 17.0), "cache.size_MB:eu-west": ("gauge", 64.0)}
    assert {o["dyno"] for o in p.observations} == {"web.1"}


def test_malformed_l2met_metrics_are_dead_lettered_and_their_neighbours_kept() -> None:
    line = dyno_line(b"worker.1", b"count#jobs.done=2 measure#job.time=fast count#=1 measure#wait=-3ms", app=b"app")
    p = parse_frame(frame([line]), "shop")
    assert [(o["name"], o["value"]) for o in p.observations] == [("jobs.done", 2.0)]
    (bad,) = p.bad
    assert "measure#job.time=fast is not a number" in bad.reason and "metric name ''" in bad.reason
    assert "must be >= 0" in bad.reason
    only_bad = parse_frame(frame([dyno_line(b"web.1", b"count#signups=many", app=b"app")]), "shop")
    assert not only_bad.observations and "count#signups=many" in only_bad.bad[0].reason


# --- RFC 5424 details seen in the wild -----------------------------------------------------------------------------

INFO = (b'at=info method=GET path="/caf\xc3\xa9/men\xc3\xbc" ' + HOST + b" dyno=web.1 connect=0ms service=9ms "
        b"status=200 bytes=99 protocol=https")


@pytest.mark.parametrize("ts, ms", [
    (b"2026-11-02T10:15:07.204+00:00", T), (b"2026-11-02T10:15:07.20451+00:00", T),
    (b"2026-11-02T03:15:07.204518-07:00", T), (b"2026-11-02T15:45:07.204518+05:30", T),
    (b"2026-11-02T10:15:07Z", T - 204), (b"2026-11-02T10:15:07.2Z", T - 4),
])
def test_fractions_and_offsets(ts: bytes, ms: int) -> None:
    for line in (router_line(INFO, ts=ts), router_line(INFO.replace(b"service=9ms", b"service="), ts=ts)):
        assert one(line)["ts"] == ms, line


@pytest.mark.parametrize("pri", [b"13", b"45", b"134", b"158", b"190", b"191"])
def test_any_pri_and_multibyte_octet_counts_with_and_without_newline(pri: bytes) -> None:
    line = router_line(INFO, pri=pri)
    with_newline = b"%d %s\n" % (len(line) + 1, line)
    without = b"%d %s" % (len(line), line)
    for body in (with_newline + without, without + with_newline, with_newline * 2):
        p = parse_frame(body, "shop")
        assert p.messages == 2 and len(p.observations) == 2 and not p.bad, body


def test_nil_structured_data_field() -> None:
    o = one(b"<190>1 " + TS + b" host app web.1 - - count#logins=1")
    assert (o["kind"], o["name"], o["value"]) == ("metric", "logins", 1.0)


# --- a frame of every kind, through the contract and the aggregation windows -------------------------------------

def test_a_frame_of_every_kind_is_counted_in_its_minute() -> None:
    minute_ms = T - T % 60_000
    lines = [
        router_line(INFO),
        router_line(INFO.replace(b"service=9ms", b"service=31ms")),
        router_line(b'at=error code=H10 desc="App crashed" method=GET path="/" ' + HOST +
                    b" dyno= connect= service= status=503 bytes= protocol=https"),
        router_line(b'sock=client at=warning code=H27 desc="Client Request Interrupted" method=POST path="/" ' +
                    HOST + b" dyno=web.1 connect=1ms service=50ms status=499 bytes= protocol=https"),
        dyno_line(b"web.1", b"source=web.1 dyno=heroku.1.2 sample#memory_rss=300.00MB sample#memory_quota=512.00MB"),
        dyno_line(b"web.1", b"Error R14 (Memory quota exceeded)"),
        dyno_line(b"web.1", b"State changed from up to crashed"),
        dyno_line(b"heroku-postgres", POSTGRES, app=b"app"),
        dyno_line(b"api", b"Release v7 created by user dev@example.com", app=b"app"),
        dyno_line(b"web.1", b"measure#checkout=120ms count#orders=2", app=b"app"),
        dyno_line(b"web.1", b"count#orders=bad", app=b"app"),
        dyno_line(b"web.1", b"just some app output", app=b"app"),
    ]
    p = parse_frame(frame(lines), "shop")
    assert p.messages == len(lines) and p.ignored == 1 and len(p.bad) == 1
    value = b"[" + b",".join(p.encoded) + b"]"
    pw = PartitionWindows(0, clock=ManualClock(T + 1_000), grace_ms=10_000, idle_timeout_ms=30_000,
                          max_future_ms=300_000, max_message_bytes=1_000_000, max_centroids=100)
    result = IngestResult()
    pw.ingest(0, value, result)
    assert not result.dead and result.counts.accepted == len(p.encoded)
    web = pw.windows[("shop", "web", minute_ms)].summary()
    assert web["requests"] == 4 and web["status"] == {"2xx": 2, "4xx": 1, "5xx": 1} and web["failed"] == 1
    assert web["errors"] == {"H10": 1, "H27": 1}
    # the H10 request has no service time: latency is over the three served requests only, never a 0 ms
    assert web["response_ms"]["max"] == 50.0 and web["response_ms"]["mean"] == pytest.approx((9 + 31 + 50) / 3)
    assert web["platform"] == {"R14": 1, "crash": 1}
    assert web["memory_mb"]["rss_max"] == 300.0
    assert web["metrics"]["orders"] == {"type": "counter", "sum": 2.0} and web["metrics"]["checkout"]["max"] == 120.0
    app_wide = pw.windows[("shop", models.APP_SERIES, minute_ms)].summary()
    assert app_wide["platform"] == {"release": 1}
    assert app_wide["addons"]["DATABASE"]["db_size_mb"] == {"mean": 100.0, "max": 100.0, "last": 100.0}
    assert "requests" not in app_wide


def test_only_unserved_requests_in_a_minute_give_no_latency_section() -> None:
    h14 = router_line(b'at=error code=H14 desc="No web dynos running" method=GET path="/" ' + HOST +
                      b" dyno= connect= service= status=503 bytes= protocol=https")
    p = parse_frame(frame([h14] * 40), "shop")
    pw = PartitionWindows(0, clock=ManualClock(T + 1_000), grace_ms=10_000, idle_timeout_ms=30_000,
                          max_future_ms=300_000, max_message_bytes=1_000_000, max_centroids=100)
    result = IngestResult()
    pw.ingest(0, b"[" + b",".join(p.encoded) + b"]", result)  # 40 routers: the column-wise fast fold
    agg = pw.windows[("shop", "web", T - T % 60_000)]
    point = agg.summary()
    assert point["requests"] == 40 and point["failed"] == 40 and point["errors"] == {"H14": 40}
    assert "response_ms" not in point
    again = type(agg).from_record(orjson.loads(orjson.dumps(agg.to_record())))
    assert again.summary() == point


# --- the fast path and the general path agree ---------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    INFO,
    INFO.replace(b"service=9ms", b"service="),
    b'at=error code=H10 desc="App crashed" method=GET path="/" ' + HOST + b" dyno= connect= service= status=503 bytes= "
    b"protocol=https",
    b'sock=client at=warning code=H27 desc="Client Request Interrupted" method=POST path="/" ' + HOST +
    b" dyno=web.1 connect=1ms service=50ms status=499 bytes= protocol=https",
    b'at=error code=H12 desc="Request timeout" method=GET path="/" ' + HOST + b" dyno=web.2 connect=1ms "
    b"service=30000ms status=503 bytes=0 protocol=https",
])
def test_fast_and_general_router_paths_give_the_same_observation(body: bytes) -> None:
    from app.ingest import logplex

    line = router_line(body)
    assert logplex._ROUTER_FAST.match(line) is not None  # the frame parser takes these in one regex
    fast = one(line)
    general = logplex._classify(TS, b"heroku", b"router", body, "shop")
    assert isinstance(general, tuple) and general[1] is None
    assert general[0] == [fast]


@pytest.mark.parametrize("beside", [b"Deploy 2c3d4e5 by user dev@example.com",
                                    b"Rollback to v41 by user dev@example.com"])
def test_one_release_gives_one_marker(beside: bytes) -> None:
    """A deploy or rollback logs its own line at the same moment as "Release vN created": one marker."""
    lines = [dyno_line(b"api", beside, app=b"app"),
             dyno_line(b"api", b"Release v42 created by user dev@example.com", app=b"app")]
    p = parse_frame(frame(lines), "shop")
    assert [(o["dyno"], o["name"]) for o in p.observations] == [(models.APP_SERIES, "release")]
    assert (p.ignored, p.bad) == (1, [])
