"""``python -m app loadgen``: realistic traffic for N apps x M dynos, straight to Kafka or through the drain.

Both modes send the same observations (app/local/traffic.py, ``realistic``); ``drain`` mode frames them as
Logplex does and retries a frame with the same id on 5xx; ``--truth FILE`` writes their exact aggregates.
Reference: docs/ingest.md#load-generator
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from app.local.traffic import Generator, Truth, gauge_last
from app.ops import kafka
from app.settings import Settings


def syslog_ts(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="microseconds")


_DESC = {"H10": "App crashed", "H12": "Request timeout", "H13": "Connection closed without response",
         "H14": "No web dynos running"}
_DYNO_EVENT_TEXT = {"crash": "State changed from up to crashed", "restart": "Restarting",
                    "stop": "Stopping all processes with SIGTERM", "exit": "Process exited with status 143",
                    "R10": "Error R10 (Boot timeout)", "R12": "Error R12 (Exit timeout)",
                    "R13": "Error R13 (Attach error)", "R14": "Error R14 (Memory quota exceeded)",
                    "R15": "Error R15 (Memory quota vastly exceeded)", "R16": "Error R16 (Detached)",
                    "R17": "Error R17 (Checksum error)", "R99": "Error R99 (Platform error)"}
_UNDERSCORED = {"db_size", "current_transaction"}
"""Heroku Postgres sample names written with underscores; the others use dashes (``active-connections``)."""
_L2MET_PREFIX = {"counter": "count", "timer": "measure", "gauge": "sample"}


def _num(v: float) -> str:
    """A number as a log line writes it: integers without a fraction, others as the shortest exact repr."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(o: dict[str, Any]) -> list[bytes]:
    """An observation as the Heroku log line(s) that would have produced it (a runtime sample: two lines,
    load and memory, as log-runtime-metrics writes them)."""
    ts = syslog_ts(o["ts"])
    kind = o["kind"]
    if kind == "router":
        code = o.get("code")
        err = f'at=error code={code} desc="{_DESC.get(code, "Request failed")}" ' if code else "at=info "
        svc = o.get("service_ms")
        # The router's own answers (H10, H14, ...) leave dyno, connect, service and bytes empty.
        dyno = "" if svc is None and o["dyno"] == "router" else o["dyno"]
        connect = "" if o.get("connect_ms") is None else f'{int(o["connect_ms"])}ms'
        service = "" if svc is None else f"{int(svc)}ms"
        nbytes = "" if o.get("bytes") is None else str(o["bytes"])
        return [(f'<158>1 {ts} host heroku router - {err}method=GET path="/items?id=1 2" host={o["app"]}.example.com '
                 f'request_id={uuid.uuid4()} fwd="50.168.96.221" dyno={dyno} connect={connect} '
                 f'service={service} status={o["status"]} bytes={nbytes} protocol=https').encode()]
    if kind == "event":
        name = o["name"]
        if name == "release":
            # As Heroku logs a deploy: its own line and the release's, at the same moment (one marker).
            return [f"<134>1 {ts} host app api - Deploy 2c3d4e5 by user deploy@example.com".encode(),
                    f"<134>1 {ts} host app api - Release v42 created by user deploy@example.com".encode()]
        if name == "scale":
            return [f"<134>1 {ts} host app api - Scaled to {o['dyno']}@2:Standard-1X by user ops@example.com".encode()]
        return [f"<45>1 {ts} host heroku {o['dyno']} - {_DYNO_EVENT_TEXT[name]}".encode()]
    if kind == "addon":
        parts = [f"source={o['source']}"] + ([f"addon={o['addon']}"] if o.get("addon") else [])
        for key, v in o["samples"].items():
            if key.startswith("memory_") and key.endswith("_mb"):  # kB, as Heroku writes memory
                name, value = key[:-3], f"{_num(v * 1024)}kB"
            elif key.endswith("_mb"):
                name, value = key[:-3], f"{_num(v * 1048576)}bytes"
            else:
                name, value = key, _num(v)
            parts.append(f"sample#{name if name in _UNDERSCORED else name.replace('_', '-')}={value}")
        return [f"<134>1 {ts} host app heroku-postgres - {' '.join(parts)}".encode()]
    if kind == "metric":
        return render_batch([o])
    dyno = o["dyno"]
    source = f"<45>1 {ts} host heroku {dyno} - source={dyno} dyno=heroku.2808254.d97d0ea7-cf3d-411b-b453-d2943a50b456"
    return [
        f"{source} sample#load_avg_1m={o['load_avg_1m']:.2f} sample#load_avg_5m=1.06 sample#load_avg_15m=0.99".encode(),
        (f"{source} sample#memory_total={o['memory_total_mb']:.2f}MB sample#memory_rss={o['memory_rss_mb']:.2f}MB "
         f"sample#memory_cache=0.00MB sample#memory_swap={o['memory_swap_mb']:.2f}MB "
         f"sample#memory_pgpgin=348836pages sample#memory_pgpgout=343403pages "
         f"sample#memory_quota={o['memory_quota_mb']:.2f}MB").encode(),
    ]


def _l2met(o: dict[str, Any]) -> str:
    unit = "ms" if o["type"] == "timer" else ""
    return f"{_L2MET_PREFIX[o['type']]}#{o['name']}={_num(o['value'])}{unit}"


def render_batch(obs: list[dict[str, Any]]) -> list[bytes]:
    """Observations as log lines; consecutive custom metrics of one dyno and instant share one l2met line
    (``count#orders.created=2 measure#checkout=120ms``), as an app logs them."""
    out: list[bytes] = []
    i, n = 0, len(obs)
    while i < n:
        o = obs[i]
        if o["kind"] != "metric":
            out += render(o)
            i += 1
            continue
        j = i + 1
        while j < n and obs[j]["kind"] == "metric" and (obs[j]["dyno"], obs[j]["ts"]) == (o["dyno"], o["ts"]):
            j += 1
        fields = " ".join(_l2met(m) for m in obs[i:j])
        out.append(f"<190>1 {syslog_ts(o['ts'])} host app {o['dyno']} - at=info {fields}".encode())
        i = j
    return out


def as_logged(o: dict[str, Any]) -> dict[str, Any]:
    """What survives a trip through a log line: integer milliseconds, two-decimal samples. (Add-on samples,
    custom metrics and events are generated in forms a line carries exactly.)"""
    o = dict(o)
    if o["kind"] == "router":
        if o.get("service_ms") is not None:
            o["service_ms"] = float(int(o["service_ms"]))
    elif o["kind"] == "runtime":
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


def drain_id_of(token: str) -> str:
    """A stable Logplex drain id (``d.<uuid>``) per token, as Logplex gives each drain its own."""
    return f"d.{uuid.uuid5(uuid.NAMESPACE_URL, token)}"


def logplex_headers(token: str, count: int, *, frame_id: str | None = None, in_url: str = "basic"
                    ) -> dict[str, str]:
    """Exactly what Logplex sends for a drain registered as ``https://user:TOKEN@host/...`` (``in_url=
    "basic"``: HTTP basic auth) or ``https://host/...?token=TOKEN`` (``"query"``: the caller puts the token in
    the URL): the drain's own id in ``Logplex-Drain-Token``, never our secret."""
    headers = {"Content-Type": "application/logplex-1", "Logplex-Msg-Count": str(count),
               "Logplex-Frame-Id": frame_id or uuid.uuid4().hex, "Logplex-Drain-Token": drain_id_of(token),
               "User-Agent": "Logplex/v72"}
    if in_url == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"minutely:{token}".encode()).decode()
    return headers


async def post_frame(session: Any, url: str, token: str, body: bytes, count: int) -> None:
    """POST one frame; on 5xx or a connection error retry with the same Frame-Id (Logplex semantics)."""
    import aiohttp

    headers = logplex_headers(token, count)
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


@dataclass(frozen=True, slots=True)
class Load:
    """What :func:`run` sends: the ``loadgen`` options (``local`` and the tests build one directly)."""

    mode: str = "kafka"
    apps: int = 3
    dynos: int = 2
    rate: int = 1000
    duration: float = 60
    realtime: bool = False
    seed: int = 1
    start_ms: int | None = None
    bootstrap: str = ""
    topic: str = ""
    url: str = ""
    token: tuple[str, ...] = ()
    frame_lines: int = 200
    concurrency: int = 8
    truth: str | None = None
    quiet: bool = False


async def run(args: Load) -> Truth:
    start_ms = args.start_ms if args.start_ms is not None else int(time.time() * 1000)
    gen = Generator(apps=args.apps, dynos=args.dynos, seed=args.seed, start_ms=start_ms, realistic=True)
    truth = Truth()
    per_app_s = max(1, round(args.rate / args.apps))  # router requests per app per second of event time
    seconds = int(args.duration)
    progress = Progress("lines" if args.mode == "drain" else "observations", quiet=args.quiet)
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

        producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5,
                                    max_request_size=8 * 1024 * 1024, **kafka.client_kwargs(Settings.from_env().kafka))
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
                    lines = render_batch(obs)
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
        await asyncio.to_thread(Path(args.truth).write_bytes,
                                orjson.dumps(truth_table(truth), option=orjson.OPT_INDENT_2))
    return truth


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def truth_table(truth: Truth) -> dict[str, Any]:
    """Exact per-minute aggregates: ``"app|proc|minute_start_s": {...}``. Latency (max, percentiles) is over
    the served requests only and absent for a minute in which the router answered every request itself."""
    out: dict[str, Any] = {}
    for key in sorted(truth.keys()):
        app, proc, start_ms = key
        entry: dict[str, Any] = {}
        requests = truth.requests.get(key, 0)
        if requests:
            entry.update(requests=requests, failed=truth.failed.get(key, 0),
                         errors=dict(truth.errors.get(key, {})))
            v = sorted(truth.service_ms.get(key, []))
            if v:
                entry.update(served=len(v), max=v[-1], p50=_quantile(v, 0.5), p95=_quantile(v, 0.95),
                             p99=_quantile(v, 0.99))
        if key in truth.rss_max:
            entry["rss_max"] = truth.rss_max[key]
        if truth.platform.get(key):
            entry["platform"] = dict(sorted(truth.platform[key].items()))
        if key in truth.addons:
            entry["addons"] = {src: {name: {"max": max(v for _, v in pts), "last": gauge_last(pts)}
                                     for name, pts in sorted(samples.items())}
                               for src, samples in sorted(truth.addons[key].items())}
        metrics: dict[str, Any] = {}
        for name, total in truth.counters.get(key, {}).items():
            metrics[name] = {"type": "counter", "sum": total}
        for name, values in truth.timers.get(key, {}).items():
            metrics[name] = {"type": "timer", "count": len(values), "max": max(values)}
        for name, pts in truth.gauges.get(key, {}).items():
            metrics[name] = {"type": "gauge", "max": max(v for _, v in pts), "last": gauge_last(pts)}
        if metrics:
            entry["metrics"] = dict(sorted(metrics.items()))
        out[f"{app}|{proc}|{start_ms // 1000}"] = entry
    return out


def _settings_default(pick: Callable[[Settings], Any]) -> Callable[[], Any]:
    """A default read from the settings when the option is missing (not when the module is imported)."""
    def default() -> Any:
        return pick(Settings.from_env())
    return default


@click.command(help="Realistic Heroku traffic for N apps x M dynos, straight to Kafka or through the drain "
                    "(docs/ingest.md).")
@click.option("--mode", type=click.Choice(("kafka", "drain")), default="kafka", show_default=True)
@click.option("--apps", type=int, default=3, show_default=True)
@click.option("--dynos", type=int, default=2, show_default=True)
@click.option("--rate", type=int, default=1000, show_default=True, help="router requests per second (event time)")
@click.option("--duration", type=float, default=60, show_default=True, help="seconds of event time to generate")
@click.option("--realtime", is_flag=True, help="pace to the wall clock instead of as fast as possible")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--start-ms", type=int, default=None, help="event time of the first second (default: now)")
@click.option("--bootstrap", default=_settings_default(lambda s: kafka.bootstrap(s.kafka)),
              show_default="METRICS_BROKER_URL")
@click.option("--topic", default=_settings_default(lambda s: s.kafka.observations_topic),
              show_default="METRICS_OBSERVATIONS_TOPIC")
@click.option("--url", default=_settings_default(lambda s: f"http://127.0.0.1:{s.web.port}"),
              show_default="http://127.0.0.1:METRICS_WEB_PORT", help="ingest base URL (drain mode)")
@click.option("--token", multiple=True, help="APP=DRAIN_TOKEN (drain mode; once per app)")
@click.option("--frame-lines", type=int, default=200, show_default=True)
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--truth", default=None, help="write exact per-minute aggregates (JSON) here")
@click.option("--quiet", is_flag=True, help="no progress bar")
def loadgen(**options: Any) -> None:
    asyncio.run(run(Load(**options)))
