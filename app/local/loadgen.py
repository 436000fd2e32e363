"""``python -m app loadgen``: realistic traffic for N apps x M dynos, straight to Kafka or through the drain.

Router requests have lognormal service times, a status mix with 4xx/5xx and H12/H13 errors; every dyno
sends runtime samples every 20 s (app/local/traffic.py). In ``drain`` mode they are rendered as Heroku router and
log-runtime-metrics lines, framed as Logplex frames and POSTed with drain tokens (``Logplex-Frame-Id``,
``Logplex-Msg-Count``), retrying a frame with the same id on 5xx as Logplex does. ``--truth FILE`` writes
the exact aggregates of what was sent, to check the stored minutes against.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson

from app.local.traffic import Generator, Truth
from app.ops import kafka


def syslog_ts(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, timezone.utc).isoformat(timespec="microseconds")


def render(o: dict[str, Any]) -> list[bytes]:
    """An observation as the Heroku log line(s) that would have produced it."""
    ts = syslog_ts(o["ts"])
    if o["kind"] == "router":
        err = f'at=error code={o["code"]} desc="Request failed" ' if o["code"] else "at=info "
        connect = "" if o.get("connect_ms") is None else f'{int(o["connect_ms"])}ms'
        return [(f'<158>1 {ts} host heroku router - {err}method=GET path="/items?id=1 2" host={o["app"]}.example.com '
                 f'request_id={uuid.uuid4()} fwd="50.168.96.221" dyno={o["dyno"]} connect={connect} '
                 f'service={int(o["service_ms"])}ms status={o["status"]} bytes={o.get("bytes") or 0} '
                 f'protocol=https').encode()]
    dyno = o["dyno"]
    source = f"<45>1 {ts} host heroku {dyno} - source={dyno} dyno=heroku.2808254.d97d0ea7-cf3d-411b-b453-d2943a50b456"
    return [
        f"{source} sample#load_avg_1m={o['load_avg_1m']:.2f} sample#load_avg_5m=1.06 sample#load_avg_15m=0.99".encode(),
        (f"{source} sample#memory_total={o['memory_total_mb']:.2f}MB sample#memory_rss={o['memory_rss_mb']:.2f}MB "
         f"sample#memory_cache=0.00MB sample#memory_swap={o['memory_swap_mb']:.2f}MB "
         f"sample#memory_pgpgin=348836pages sample#memory_pgpgout=343403pages "
         f"sample#memory_quota={o['memory_quota_mb']:.2f}MB").encode(),
    ]


def as_logged(o: dict[str, Any]) -> dict[str, Any]:
    """What survives a trip through a log line: integer milliseconds, two-decimal samples."""
    o = dict(o)
    if o["kind"] == "router":
        o["service_ms"] = float(int(o["service_ms"]))
    else:
        for k in ("memory_rss_mb", "memory_swap_mb", "memory_total_mb", "memory_quota_mb", "load_avg_1m"):
            o[k] = round(o[k], 2)
    return o


def frame(lines: list[bytes]) -> bytes:
    """Octet-counted messages; like Logplex, each message ends with a newline counted in its length."""
    return b"".join(b"%d %s\n" % (len(line) + 1, line) for line in lines)


class Progress:
    """A one-line progress bar on stderr: share of the event-time span generated, count, achieved rate."""

    def __init__(self, unit: str, *, quiet: bool = False) -> None:
        self.unit, self.t0, self.n, self.last, self.fraction = unit, time.monotonic(), 0, 0.0, 0.0
        self.quiet = quiet

    def add(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if not self.quiet and now - self.last >= 0.5:
            self.last = now
            el = now - self.t0
            filled = int(30 * min(1.0, self.fraction))
            sys.stderr.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {el:5.1f}s {self.n:,} {self.unit} "
                             f"{self.n / max(el, 1e-9):,.0f}/s ")
            sys.stderr.flush()

    def done(self) -> None:
        if self.quiet:
            return
        el = time.monotonic() - self.t0
        sys.stderr.write(f"\nsent {self.n:,} {self.unit} in {el:.1f}s ({self.n / max(el, 1e-9):,.0f}/s)\n")


async def post_frame(session: Any, url: str, token: str, body: bytes, count: int) -> None:
    """POST one frame; on 5xx or a connection error retry with the same Frame-Id (Logplex semantics)."""
    import aiohttp

    headers = {"Content-Type": "application/logplex-1", "Logplex-Msg-Count": str(count),
               "Logplex-Frame-Id": uuid.uuid4().hex, "Logplex-Drain-Token": token, "User-Agent": "Logplex/v123"}
    delay_s = 0.2
    for _ in range(30):
        try:
            async with session.post(url, data=body, headers=headers) as r:
                if r.status < 300:
                    return
                if 400 <= r.status < 500:
                    raise RuntimeError(f"drain refused a frame: {r.status} {await r.text()}")
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 5.0)
    raise RuntimeError("drain kept failing; gave up after 30 attempts")


async def run(args: argparse.Namespace) -> Truth:
    start_ms = args.start_ms if args.start_ms is not None else int(time.time() * 1000)
    gen = Generator(apps=args.apps, dynos=args.dynos, seed=args.seed, start_ms=start_ms)
    truth = Truth()
    per_app_s = max(1, round(args.rate / args.apps))  # router requests per app per second of event time
    seconds = int(args.duration)
    progress = Progress("lines" if args.mode == "drain" else "observations", quiet=getattr(args, "quiet", False))
    tokens = dict(t.split("=", 1) for t in args.token or [])
    if args.mode == "drain":
        missing = [a for a in gen.apps if a not in tokens]
        if missing:
            raise SystemExit(f"no --token for apps {missing}; create them with `python -m app tokens create`")
    import aiohttp

    session = aiohttp.ClientSession() if args.mode == "drain" else None
    producer = None
    if args.mode == "kafka":
        from aiokafka import AIOKafkaProducer

        from app.settings import Settings

        producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5,
                                    max_request_size=8 * 1024 * 1024, **kafka.client_kwargs(Settings.from_env()))
        await producer.start()
    sem = asyncio.Semaphore(args.concurrency)
    pending: set[asyncio.Task[None]] = set()

    async def send_frame(app: str, lines: list[bytes]) -> None:
        async with sem:
            assert session is not None
            await post_frame(session, args.url.rstrip("/") + "/v1/drains/logplex", tokens[app], frame(lines),
                             len(lines))
            progress.add(len(lines))

    t0 = time.monotonic()
    try:
        for second in range(seconds):
            progress.fraction = (second + 1) / max(seconds, 1)
            for app in gen.apps:
                obs = [as_logged(o) for o in gen.batch(app, per_app_s, 1000)]
                for o in obs:
                    truth.add(o)
                if producer is not None:
                    await producer.send(args.topic, key=app.encode(), value=orjson.dumps(obs))
                    progress.add(len(obs))
                else:
                    lines = [line for o in obs for line in render(o)]
                    for i in range(0, len(lines), args.frame_lines):
                        task = asyncio.create_task(send_frame(app, lines[i:i + args.frame_lines]))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                    if len(pending) > 4 * args.concurrency:
                        await asyncio.gather(*list(pending))
            gen.now_ms += 1000
            if args.realtime:
                await asyncio.sleep(max(0.0, t0 + second + 1 - time.monotonic()))
        await asyncio.gather(*list(pending))
        if producer is not None:
            await producer.flush()
    finally:
        if producer is not None:
            await producer.stop()
        if session is not None:
            await session.close()
    progress.done()
    if args.truth:
        with open(args.truth, "wb") as f:
            f.write(orjson.dumps(truth_table(truth), option=orjson.OPT_INDENT_2))
    return truth


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def truth_table(truth: Truth) -> dict[str, Any]:
    """Exact per-minute aggregates: ``"app|proc|minute_start_s": {...}``."""
    out: dict[str, Any] = {}
    for (app, proc, start_ms), values in truth.service_ms.items():
        v = sorted(values)
        out[f"{app}|{proc}|{start_ms // 1000}"] = {
            "requests": len(v), "failed": truth.failed.get((app, proc, start_ms), 0),
            "errors": dict(truth.errors.get((app, proc, start_ms), {})), "max": v[-1],
            "p50": _quantile(v, 0.5), "p95": _quantile(v, 0.95), "p99": _quantile(v, 0.99)}
    return out


def main(argv: list[str]) -> int:
    from app.settings import Settings

    s = Settings.from_env()
    ap = argparse.ArgumentParser(prog="python -m app loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("kafka", "drain"), default="kafka")
    ap.add_argument("--apps", type=int, default=3)
    ap.add_argument("--dynos", type=int, default=2)
    ap.add_argument("--rate", type=int, default=1000, help="router requests per second (event time)")
    ap.add_argument("--duration", type=float, default=60, help="seconds of event time to generate")
    ap.add_argument("--realtime", action="store_true", help="pace to the wall clock instead of as fast as possible")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start-ms", type=int, default=None, help="event time of the first second (default: now)")
    ap.add_argument("--bootstrap", default=kafka.bootstrap(s))
    ap.add_argument("--topic", default=s.observations_topic)
    ap.add_argument("--url", default=f"http://127.0.0.1:{s.web_port}", help="ingest base URL (drain mode)")
    ap.add_argument("--token", action="append", help="APP=DRAIN_TOKEN (drain mode; once per app)")
    ap.add_argument("--frame-lines", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--truth", help="write exact per-minute aggregates (JSON) here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    asyncio.run(run(ap.parse_args(argv)))
    return 0
