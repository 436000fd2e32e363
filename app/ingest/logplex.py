"""Logplex HTTPS drain frames -> observations of the core contract (app/models.py).

Who logged a line (RFC 5424 APP-NAME and PROCID) says what it is; a malformed line of a known kind is a
:class:`BadLine` with its reason, and the rest of the frame still counts. The ingest hot path: bytes in, and
every path linear in its input (tests/ingest/test_linear_parsing.py).
Reference: docs/ingest.md#heroku-log-drains-post-v1drainslogplex-python-m-app-ingest
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

from app.models import APP_SERIES, EVENT_NAMES, MAX_ADDON_SAMPLES

# The common case in one anchored match, straight to JSON bytes (no split, no dict, no encoder). Field
# patterns are strict enough that the captured bytes are safe to embed in JSON unescaped. It also takes the
# router's own errors with empty fields and the sock= form: in an outage every line is one of those.
_ROUTER_FAST = re.compile(
    rb"<\d{1,3}>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) \S+ heroku router \S+ "
    rb"(?:sock=\w{1,20} )?at=(?:info|error|warning)(?: code=(H\d{1,3}))?(?! code=).* dyno=([\w.\-]{0,100}) "
    rb"connect=(0|[1-9]\d{0,8}|)(?:ms)? service=(0|[1-9]\d{0,7}|)(?:ms)? status=([1-5]\d\d)"
    rb"(?: bytes=(0|[1-9]\d{0,14}|)(?=\s|$))?")
# Numbers with leading zeros ("bytes=007") are not JSON: such lines miss the fast path and are converted
# with int() by the general path.
_FRACTION_MS = {f"{i:0{w}d}".encode(): int(f"{i:0{w}d}".ljust(3, "0")) for w in (1, 2, 3) for i in range(10 ** w)}
"""Leading fraction digits of a syslog timestamp ("5", "05", "123") -> milliseconds: one dict lookup."""
_SAMPLE = re.compile(rb"sample#(\w+)=([0-9.]+)([A-Za-z]*)")
_SOURCE = re.compile(rb"source=(\S+)")
_RUNTIME_FIELDS = {
    b"memory_rss": "memory_rss_mb", b"memory_swap": "memory_swap_mb", b"memory_total": "memory_total_mb",
    b"memory_quota": "memory_quota_mb", b"load_avg_1m": "load_avg_1m",
}
MAX_SERVICE_MS = 24 * 3600 * 1000
MAX_LINE_BYTES = 10_240
"""Default cap on one syslog message (``METRICS_INGEST_MAX_LINE_BYTES``)."""
MAX_VALUE_BYTES = 64
"""A number with its unit (``measure#db=12.5ms``, ``sample#memory-total=15.05MB``) is at most this long."""
MAX_DYNO_BYTES = 100
MAX_METRICS_PER_LINE = 64
"""l2met metrics (or process types of a scaling line) one line may carry: ``count#a=1 count#b=1 ...`` must not
turn one 10 KB line into a thousand observations."""


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
    too_long: int = 0
    """Lines over the line cap (each also in ``bad``)."""

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


@lru_cache(maxsize=20_000)
def _dyno(raw: bytes) -> str:
    """Dyno names repeat across lines: decoded once. Callers pass at most ``MAX_DYNO_BYTES``, so the cache
    holds at most ~20,000 x 100 bytes (LRU: junk names from one tenant evict only junk, not everyone)."""
    return raw.decode("utf-8", "replace")


def parse_frame(body: bytes, app: str, *, max_line_bytes: int = MAX_LINE_BYTES) -> ParsedFrame:
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
        if length > max_line_bytes:
            out.too_long += 1
            out.bad.append(BadLine(f"line of {length} bytes over the {max_line_bytes}-byte limit (not parsed)",
                                   _text(body, start, end)))
            continue
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
            # Empty dyno=/service= (the router answered itself: H10, H14, ...): no dyno, no service time.
            encoded.append(router_json % (dyno or b"router", ts_ms, status, service or b"null", connect or b"null",
                                          nbytes or b"null", b'"' + code + b'"' if code else b"null"))
            continue
        line = body[start:end]
        parts = line.split(b" ", 6)
        if len(parts) < 7:
            out.ignored += 1
            continue
        o = _classify(parts[1], parts[3], parts[4], parts[6].rstrip(b"\r\n"), app)
        if o is None:
            out.ignored += 1
        elif isinstance(o, str):
            out.bad.append(BadLine(o, _text(body, start, end)))
        else:
            good, reason = o
            encoded.extend(orjson.dumps(x) for x in good)
            if reason is not None:
                out.bad.append(BadLine(reason, _text(body, start, end)))
    return out


def _text(body: bytes, start: int, end: int) -> str:
    return body[start:min(end, start + 2048)].decode("utf-8", "replace")


Parsed = tuple[list[dict[str, Any]], str | None] | str | None
"""What a line becomes: (observations, reason some part was refused) | the reason it was refused | None
(not a line we count: ignored)."""

# A key starts a token (the look-behind): without it a run of 10,000 letters is rescanned from each of its
# positions (quadratic). Quoted values are possessive and may lack their closing quote (then they run to the
# end of the line), so an unterminated quote is scanned once, not once per later '"'.
_KV = re.compile(rb'(?<![\w.\-])([A-Za-z_][\w.\-]*+)=("(?:[^"\\]++|\\.)*+"?|\S*+)')
_MS = re.compile(rb"(\d{1,12})(?:ms)?\Z")
_INT = re.compile(rb"\d{1,15}\Z")
_CODE = re.compile(rb"[A-Z]\d{1,3}\Z")
# Possessive: "\d+\.?\d*" split a digit run in every way before failing (11.7 s for 16 KB of digits).
_UNIT_NUMBER = re.compile(rb"([-+]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][-+]?\d{1,3})?)([A-Za-z%/\xc2\xb5]{0,16})\Z")
_ADDON_NAME = re.compile(rb"\baddon=(\S+)")
_ADDON_SOURCE = re.compile(r"[^A-Za-z0-9_.\-]")
_L2MET_TYPES = {b"count": "counter", b"measure": "timer", b"sample": "gauge"}
_ADDON_SAMPLE = re.compile(rb"sample#([A-Za-z0-9_\-]{1,64})=(\S+)")
_L2MET = re.compile(rb"(?:^|\s)(count|measure|sample)#([^=\s]*)=?(\S*)")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}\Z")
_STATE = re.compile(rb"State changed from \w+ to (\w+)")
_DYNO_EVENTS = ((b"Restarting", "restart"), (b"Cycling", "restart"), (b"Stopping all processes with SIG", "stop"),
                (b"Stopping process with SIG", "stop"), (b"Process exited with status ", "exit"))
_RUNTIME_ERROR = re.compile(rb"Error (R\d\d)\b")
# One release, one marker: a deploy or rollback logs "Deploy <sha> by ..." / "Rollback to vM by ..." at the
# same moment as its "Release vN created by ..." line, and every release (config change, add-on change,
# pipeline promotion) logs the latter. So only it counts; the others are ignored.
_RELEASE = re.compile(rb"Release v\d+ created by ")
_SCALED = re.compile(rb"Scaled? to (.*?)(?: by |\Z)")
# A name starts a token (the look-behind), so a long run of letters is scanned once, not from each position.
_SCALE_PART = re.compile(rb"(?<![A-Za-z0-9_\-])([A-Za-z0-9_\-]{1,100}+)[@=]\d")
_TO_MB = {b"MB": 1.0, b"kB": 1 / 1024, b"KB": 1 / 1024, b"GB": 1024.0, b"bytes": 1 / 1048576, b"B": 1 / 1048576,
          b"pages": 4096 / 1048576}
"""Memory units Heroku logs -> MB (a page is 4 KiB on Heroku's Linux dynos)."""
_TO_MS = {b"ms": 1.0, b"s": 1000.0, b"us": 1e-3, b"\xc2\xb5s": 1e-3, b"ns": 1e-6, b"min": 60_000.0, b"h": 3_600_000.0}


def _classify(ts: bytes, appname: bytes, procid: bytes, text: bytes, app: str) -> Parsed:
    """One message's kind by who logged it: Heroku's router and dynos (APP-NAME ``heroku``), add-ons and the
    platform API (APP-NAME ``app``, PROCID ``heroku-postgres``/``heroku-redis``/``api``), or the app itself."""
    if text[:2] == b"- ":  # a nil STRUCTURED-DATA field (log-shuttle, RFC 5424 senders): not part of the text
        text = text[2:]
    if appname == b"heroku":
        if procid == b"router":
            return _router(ts, text, app)
        if b"sample#" in text:
            return _runtime(ts, text, app)
        return _dyno_event(ts, procid, text, app)
    if procid.startswith(b"heroku-") or (b"sample#" in text and b" addon=" in text):
        return _addon(ts, procid, text, app)
    if procid == b"api":
        return _api_event(ts, text, app)
    if b"#" in text:
        return _l2met(ts, procid, text, app)
    return None


def _ts(ts: bytes) -> int | str:
    try:
        return parse_ts_ms(ts)
    except ValueError:
        return f"bad syslog timestamp {ts[:40]!r}"


def _router(ts: bytes, text: bytes, app: str) -> Parsed:
    """Any router line the fast path did not take: ``sock=`` first, empty fields, ``queue=``/``wait=``."""
    fields: dict[bytes, bytes] = {}
    for k, v in _KV.findall(text):
        fields.setdefault(k, v)
    at = fields.get(b"at")
    status_raw = fields.get(b"status")
    if not at or status_raw is None:
        return "router line lacks at= or status="
    if not status_raw:
        return "router line has an empty status= (no status class to count the request under)"
    if not _INT.match(status_raw) or not 100 <= int(status_raw) <= 599:
        return f"status {status_raw[:20]!r} outside 100..599"
    service = fields.get(b"service", b"")
    connect = fields.get(b"connect", b"")
    nbytes = fields.get(b"bytes", b"")
    for name, raw, pattern in ((b"service", service, _MS), (b"connect", connect, _MS), (b"bytes", nbytes, _INT)):
        if raw and not pattern.match(raw):
            return f"{name.decode()}={raw[:20].decode('utf-8', 'replace')} is not a number of ms/bytes"
    service_ms = int(_MS.match(service).group(1)) if service else None  # type: ignore[union-attr]
    if service_ms is not None and service_ms > MAX_SERVICE_MS:
        return "service time above one day"
    code = fields.get(b"code")
    if code is not None and not _CODE.match(code):
        return f"code={code[:20].decode('utf-8', 'replace')} is not a router error code like H12"
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return ts_ms
    dyno = fields.get(b"dyno")
    if dyno is not None and len(dyno) > MAX_DYNO_BYTES:
        return f"dyno= over {MAX_DYNO_BYTES} bytes"
    return [{"kind": "router", "app": app, "dyno": _dyno(dyno) if dyno else "router", "ts": ts_ms,
             "status": int(status_raw), "service_ms": None if service_ms is None else float(service_ms),
             "connect_ms": float(_MS.match(connect).group(1)) if connect else None,  # type: ignore[union-attr]
             "bytes": int(nbytes) if nbytes else None, "code": code.decode() if code else None}], None


def _runtime(ts: bytes, text: bytes, app: str) -> Parsed:
    """log-runtime-metrics; a line with none of the samples we keep (``sample#diskmbytes``) is ignored."""
    src = _SOURCE.search(text)
    if src is None:
        return "runtime sample line lacks source="
    if len(src.group(1)) > MAX_DYNO_BYTES:
        return f"source= over {MAX_DYNO_BYTES} bytes"
    o: dict[str, Any] = {"kind": "runtime", "app": app, "dyno": _dyno(src.group(1)), "ts": 0}
    for name, value, unit in _SAMPLE.findall(text):
        key = _RUNTIME_FIELDS.get(name)
        if key is None:
            continue
        try:
            v = float(value)
        except ValueError:
            return f"sample#{name[:60].decode()}={value[:40].decode()} is not a number"
        if name.startswith(b"memory"):
            scale = _TO_MB.get(unit or b"MB")
            if scale is None:
                return f"sample#{name[:60].decode()} has unit {unit[:20].decode()!r}; expected MB, kB, GB or bytes"
            v *= scale
        o[key] = v
    if len(o) == 4:
        return None
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return ts_ms
    o["ts"] = ts_ms
    return [o], None


def _number(raw: bytes) -> tuple[float, bytes] | None:
    if len(raw) > MAX_VALUE_BYTES:
        return None
    m = _UNIT_NUMBER.match(raw)
    if m is None:
        return None
    v = float(m.group(1))
    return (v, m.group(2)) if math.isfinite(v) else None


def _addon(ts: bytes, procid: bytes, text: bytes, app: str) -> Parsed:
    """Heroku Postgres / Redis metrics -> one ``addon`` observation of gauges in MB or plain numbers.

    Never a dead letter: a sample we cannot read is skipped (the platform, not the user, wrote the line)."""
    src = _SOURCE.search(text)
    source = (src.group(1) if src else procid).decode("utf-8", "replace")[:100]
    samples: dict[str, float] = {}
    for name, raw in _ADDON_SAMPLE.findall(text):
        got = _number(raw)
        if got is None or len(samples) >= MAX_ADDON_SAMPLES:
            continue
        v, unit = got
        key = name.decode().lower().replace("-", "_")
        scale = _TO_MB.get(unit)
        if scale is not None:
            v, key = v * scale, key + "_mb"
        elif unit:
            key = f"{key}_{_unit_suffix(unit)}".lower()
        samples[key[:64]] = v
    if not samples:
        return None
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return None
    addon = _ADDON_NAME.search(text)
    return [{"kind": "addon", "app": app, "ts": ts_ms,
             "source": _ADDON_SOURCE.sub("_", source).lstrip(".-") or "addon",
             "addon": addon.group(1).decode("utf-8", "replace")[:200] if addon else None,
             "samples": samples}], None


def _unit_suffix(unit: bytes) -> str:
    return unit.decode("utf-8", "replace").replace("%", "pct").replace("/", "_per_").replace("\u00b5", "u")


def _dyno_event(ts: bytes, procid: bytes, text: bytes, app: str) -> Parsed:
    """Dyno lifecycle and runtime errors logged by Heroku for ``procid`` (``web.1``); anything else: None."""
    name: str | None = None
    m = _STATE.match(text)
    if m is not None:
        name = "crash" if m.group(1) == b"crashed" else None
    else:
        err = _RUNTIME_ERROR.match(text)
        if err is not None:
            code = err.group(1).decode()
            name = code if code in EVENT_NAMES else None
        else:
            for prefix, event in _DYNO_EVENTS:
                if text.startswith(prefix):
                    name = event
                    break
    if name is None:
        return None
    if len(procid) > MAX_DYNO_BYTES:
        return f"dyno name over {MAX_DYNO_BYTES} bytes"
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return ts_ms
    return [{"kind": "event", "app": app, "dyno": _dyno(procid), "ts": ts_ms, "name": name}], None


def _api_event(ts: bytes, text: bytes, app: str) -> Parsed:
    """Platform API lines: releases (app-wide) and scaling (one event per process type it names)."""
    dynos: list[str] = []
    if _RELEASE.match(text):
        name, dynos = "release", [APP_SERIES]
    else:
        m = _SCALED.match(text)
        if m is None:
            return None
        name = "scale"
        dynos = list(dict.fromkeys(p.decode() for p in _SCALE_PART.findall(m.group(1))))
        if not dynos:
            return None
        if len(dynos) > MAX_METRICS_PER_LINE:
            return f"scaling line names {len(dynos)} process types, over {MAX_METRICS_PER_LINE}"
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return ts_ms
    return [{"kind": "event", "app": app, "dyno": d, "ts": ts_ms, "name": name} for d in dynos], None


def _l2met(ts: bytes, procid: bytes, text: bytes, app: str) -> Parsed:
    """l2met custom metrics in an app's own log line: ``count#`` counter, ``measure#`` timer (time units
    normalised to ms), ``sample#`` gauge; other units are kept as a name suffix (``db.size_MB``). An optional
    ``source=`` becomes a name suffix (``db.query:us-east``). A malformed one is refused with its reason; the
    line's well-formed ones still count."""
    found = _L2MET.findall(text)
    if not found:
        return None
    over = len(found) - MAX_METRICS_PER_LINE
    if over > 0:
        found = found[:MAX_METRICS_PER_LINE]
    if len(procid) > MAX_DYNO_BYTES:
        return f"dyno name over {MAX_DYNO_BYTES} bytes"
    src = _SOURCE.search(text)
    suffix = ":" + src.group(1).decode("utf-8", "replace") if src else ""
    ts_ms = _ts(ts)
    if isinstance(ts_ms, str):
        return ts_ms
    dyno = _dyno(procid)
    good: list[dict[str, Any]] = []
    problems: list[str] = []
    for kind, raw_name, raw_value in found:
        name = raw_name.decode("utf-8", "replace")
        label = f"{kind.decode()}#{name[:60]}"
        got = _number(raw_value)
        if got is None:
            problems.append(f"{label}={raw_value[:40].decode('utf-8', 'replace')} is not a number with a unit")
            continue
        value, unit = got
        mtype = _L2MET_TYPES[kind]
        if unit:
            scale = _TO_MS.get(unit) if mtype == "timer" else None
            if scale is not None:
                value *= scale
            else:
                name = f"{name}_{_unit_suffix(unit)}"
        name += suffix
        if not _METRIC_NAME.match(name):
            problems.append(f"{label}: metric name {name[:60]!r} must be 1..200 characters of [A-Za-z0-9_.-:/]")
            continue
        if mtype == "timer" and value < 0:
            problems.append(f"{label}: a measure must be >= 0")
            continue
        good.append({"kind": "metric", "app": app, "dyno": dyno, "ts": ts_ms, "name": name, "type": mtype,
                     "value": value})
    if over > 0:
        problems.append(f"{over} metrics past the first {MAX_METRICS_PER_LINE} of the line refused")
    if not good:
        return "; ".join(problems)[:1000]
    return good, "; ".join(problems)[:1000] if problems else None
