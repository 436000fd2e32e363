"""Logplex HTTPS drain frames -> observations of the core contract (app/models.py).

A frame body (``Content-Type: application/logplex-1``) is a sequence of octet-counted RFC 5424 messages::

    83 <40>1 2012-11-30T06:45:29+00:00 host app web.3 - State changed from starting to up

Heroku's messages carry no structured-data field: after PRI/VERSION come TIMESTAMP HOSTNAME APP-NAME
PROCID MSGID and the text. Two kinds of line become observations:

* router lines (APP-NAME ``heroku``, PROCID ``router``): ``at=info|error [code=H12 desc="..."] method=...
  path="..." host=... request_id=... fwd="..." dyno=web.1 connect=0ms service=2ms status=200 bytes=415``
  -> a ``router`` observation (``connect`` may be empty, ``dyno`` may be ``router``);
* log-runtime-metrics lines (``source=web.1 dyno=heroku.… sample#memory_rss=21.22MB …``, MB or pages
  units) -> a ``runtime`` observation with the MB and load fields present on that line.

Everything else (app output, platform events) is ignored and counted. A router or runtime line that does
not parse is returned as a :class:`BadLine` with a reason; the rest of the frame still counts.
Written for speed (this is the ingest hot path): bytes in, no per-field decoding beyond what is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

# The common case in one anchored match, straight to JSON bytes (no split, no dict, no encoder). Field
# patterns are strict enough that the captured bytes are safe to embed in JSON unescaped.
_ROUTER_FAST = re.compile(
    rb"<\d{1,3}>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) \S+ heroku router \S+ at=(?:info|error)(?: code=(H\d{1,3}))?.* dyno=([\w.\-]{1,100}) "
    rb"connect=(0|[1-9]\d{0,8}|)(?:ms)? service=(0|[1-9]\d{0,7})(?:ms)? status=([1-5]\d\d)"
    rb"(?: bytes=(0|[1-9]\d{0,14}|)(?=\s|$))?")
# Numbers with leading zeros ("bytes=007") are not JSON: such lines miss the fast path and are converted
# with int() by the general path.
_FRACTION_MS = {f"{i:0{w}d}".encode(): int(f"{i:0{w}d}".ljust(3, "0")) for w in (1, 2, 3) for i in range(10 ** w)}
"""Leading fraction digits of a syslog timestamp ("5", "05", "123") -> milliseconds: one dict lookup."""
_ROUTER_HEAD = re.compile(rb"at=(\w+)(?: code=(H\d{1,3}))?")
_ROUTER_TAIL = re.compile(
    rb"dyno=(\S+) connect=(\d*)(?:ms)? service=(\d+)(?:ms)? status=(\d+)(?: bytes=(\d*))?")
_SAMPLE = re.compile(rb"sample#(\w+)=([0-9.]+)(MB|pages)?")
_SOURCE = re.compile(rb"source=(\S+)")
_RUNTIME_FIELDS = {
    b"memory_rss": "memory_rss_mb", b"memory_swap": "memory_swap_mb", b"memory_total": "memory_total_mb",
    b"memory_quota": "memory_quota_mb", b"load_avg_1m": "load_avg_1m",
}
MAX_SERVICE_MS = 24 * 3600 * 1000


class FrameError(ValueError):
    """The frame as a whole cannot be read (not a client's single bad line)."""


@dataclass(slots=True)
class BadLine:
    reason: str
    line: str


@dataclass(slots=True)
class ParsedFrame:
    encoded: list[bytes] = field(default_factory=list)
    """One JSON object per observation, ready to join into the pipeline's array form."""
    bad: list[BadLine] = field(default_factory=list)
    messages: int = 0
    ignored: int = 0

    @property
    def observations(self) -> list[dict[str, Any]]:
        return [orjson.loads(o) for o in self.encoded]


_ts_cache: dict[bytes, int] = {}
_utc_seconds: dict[bytes, int] = {}  # "YYYY-MM-DDTHH:MM:SS" (UTC) -> epoch ms, for the router fast path


def parse_ts_ms(ts: bytes) -> int:
    """RFC 3339 timestamp -> epoch ms. The second-resolution part is cached (lines share seconds)."""
    # 2012-11-30T06:45:29.123456+00:00 | 2012-11-30T06:45:29Z | 2012-11-30T06:45:29+00:00
    frac_ms = 0
    if ts[19:20] == b".":
        zone_at = len(ts) - 1 if ts[-1:] in (b"Z", b"z") else len(ts) - 6
        digits = ts[20:zone_at]
        if not digits.isdigit():
            raise ValueError(f"bad fraction in {ts!r}")
        frac_ms = int((digits + b"000")[:3])
        key = ts[:19] + ts[zone_at:]
    else:
        key = ts
    base = _ts_cache.get(key)
    if base is None:
        text = key.decode("ascii")
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise ValueError(f"timestamp without a UTC offset: {text!r}")
        base = int(moment.timestamp()) * 1000
        if len(_ts_cache) > 50_000:
            _ts_cache.clear()
        _ts_cache[key] = base
    return base + frac_ms


_dyno_names: dict[bytes, str] = {}


def _dyno(raw: bytes) -> str:
    name = _dyno_names.get(raw)
    if name is None:
        name = raw.decode("utf-8", "replace")
        if len(_dyno_names) < 100_000:
            _dyno_names[raw] = name
    return name


def parse_frame(body: bytes, app: str) -> ParsedFrame:
    """Split a frame and convert its router/runtime lines for ``app`` (the drain token's app)."""
    out = ParsedFrame()
    encoded = out.encoded
    fast = _ROUTER_FAST.match
    app_b = app.encode()
    router_json = (b'{"kind":"router","app":"' + app_b +
                   b'","dyno":"%s","ts":%d,"status":%s,"service_ms":%s,"connect_ms":%s,"bytes":%s,"code":%s}')
    pos, n = 0, len(body)
    while pos < n:
        c = body[pos]
        if c == 32 or c == 10 or c == 13:
            pos += 1
            continue
        sp = body.find(b" ", pos, pos + 10)
        try:
            length = int(body[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length < 0:
            raise FrameError(f"expected an octet count at byte {pos}")
        start = sp + 1
        end = start + length
        if end > n:
            raise FrameError(f"message at byte {pos} claims {length} bytes, only {n - start} remain")
        out.messages += 1
        pos = end
        m = fast(body, start, end)
        if m is not None:
            second, frac, zone, code, dyno, connect, service, status, nbytes = m.groups()
            base = _utc_seconds.get(second) if zone == b"Z" or zone == b"+00:00" else None
            if base is None:
                try:
                    base = parse_ts_ms(second + zone)
                except ValueError:
                    out.bad.append(BadLine(f"bad syslog timestamp {second + zone!r}", _text(body, start, end)))
                    continue
                if zone == b"Z" or zone == b"+00:00":
                    if len(_utc_seconds) > 50_000:
                        _utc_seconds.clear()
                    _utc_seconds[second] = base
            ts_ms = base + _FRACTION_MS[frac[:3]] if frac else base
            encoded.append(router_json % (dyno, ts_ms, status, service, connect or b"null", nbytes or b"null",
                                          b'"' + code + b'"' if code else b"null"))
            continue
        line = body[start:end]
        parts = line.split(b" ", 6)
        if len(parts) < 7:
            out.ignored += 1
            continue
        appname, procid, text = parts[3], parts[4], parts[6]
        if procid == b"router" and appname == b"heroku":
            o = _router(parts[1], text, app)
        elif b"sample#" in text:
            o = _runtime(parts[1], text, app)
        else:
            out.ignored += 1
            continue
        if isinstance(o, str):
            out.bad.append(BadLine(o, _text(body, start, end)))
        else:
            encoded.append(orjson.dumps(o))
    return out


def _text(body: bytes, start: int, end: int) -> str:
    return body[start:min(end, start + 2048)].decode("utf-8", "replace")


def _router(ts: bytes, text: bytes, app: str) -> dict[str, Any] | str:
    head = _ROUTER_HEAD.match(text)
    at = text.rfind(b" dyno=")
    tail = _ROUTER_TAIL.match(text, at + 1) if at >= 0 else None
    if head is None or tail is None:
        return "router line lacks at=/dyno=/connect=/service=/status="
    try:
        ts_ms = parse_ts_ms(ts)
    except ValueError:
        return f"bad syslog timestamp {ts[:40]!r}"
    dyno, connect, service, status, nbytes = tail.groups()
    service_ms = int(service)
    if service_ms > MAX_SERVICE_MS:
        return "service time above one day"
    st = int(status)
    if not 100 <= st <= 599:
        return f"status {st} outside 100..599"
    code = head.group(2)
    return {"kind": "router", "app": app, "dyno": _dyno(dyno), "ts": ts_ms, "status": st,
            "service_ms": float(service_ms), "connect_ms": float(connect) if connect else None,
            "bytes": int(nbytes) if nbytes else None, "code": code.decode() if code else None}


def _runtime(ts: bytes, text: bytes, app: str) -> dict[str, Any] | str:
    src = _SOURCE.search(text)
    if src is None:
        return "runtime sample line lacks source="
    try:
        ts_ms = parse_ts_ms(ts)
    except ValueError:
        return f"bad syslog timestamp {ts[:40]!r}"
    o: dict[str, Any] = {"kind": "runtime", "app": app, "dyno": _dyno(src.group(1)),
                         "ts": ts_ms}
    for name, value, unit in _SAMPLE.findall(text):
        key = _RUNTIME_FIELDS.get(name)
        if key is None:
            continue
        if name.startswith(b"memory") and unit != b"MB":
            return f"sample#{name.decode()} must be in MB"
        try:
            o[key] = float(value)
        except ValueError:
            return f"sample#{name.decode()}={value.decode()} is not a number"
    if len(o) == 4:
        return "runtime line has no memory or load_avg_1m sample"
    return o
