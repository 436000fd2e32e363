"""The observation contract (topic ``observations``, key = app) and its validation.

A message value is one observation object or a JSON array of observations::

    {"kind":"router","app":"shop","dyno":"web.1","ts":1764000000123,"status":200,"service_ms":12.0,
     "connect_ms":1.0,"bytes":415,"code":null}
    {"kind":"runtime","app":"shop","dyno":"web.1","ts":...,"memory_total_mb":...,"memory_rss_mb":...,
     "memory_swap_mb":...,"memory_quota_mb":...,"load_avg_1m":...}
    {"kind":"metric","app":"shop","dyno":"web.1","ts":...,"name":"db.query_ms","type":"timer","value":3.2}

``ts`` is event time in epoch ms; the process type is ``dyno`` up to the first dot (``router`` -- requests
no dyno served -- counts under ``web``, the only process type the router serves).

Validation never raises: each bad record yields a :class:`Reject` with a reason, and the valid records
next to it go on. Functions here are on the hot path (once per observation), hence the plain style.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,99}\Z")
_CODE = re.compile(r"[A-Z][0-9]{1,3}\Z")
_METRIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}\Z")
METRIC_TYPES = frozenset(("timer", "counter", "gauge"))
RUNTIME_FIELDS = ("memory_rss_mb", "memory_swap_mb", "memory_total_mb", "memory_quota_mb", "load_avg_1m")
MAX_SERVICE_MS = 24 * 3600 * 1000.0  # a day: anything above is a unit mistake, not a slow request
MAX_RECORD_ECHO = 2048  # bytes of a bad record echoed into the dead-letter reason


@dataclass(frozen=True, slots=True)
class Reject:
    """A record (or a whole message) that could not be used, and why."""

    reason: str
    record: Any  # the offending value, or the message's text prefix when it was not parseable
    index: int = -1  # position in the message's array; -1 = the whole message


def decode(value: bytes | None, max_bytes: int) -> list[Any] | Reject:
    """Message bytes -> list of candidate observations, or one Reject for the whole message.

    orjson first (fast); its strictness would drop a whole array for one NaN/Infinity or a huge int, so
    on failure the stdlib parser is tried and those values are rejected one record at a time instead.
    """
    if value is None:
        return Reject("empty message", None)
    if len(value) > max_bytes:
        return Reject(f"message of {len(value)} bytes exceeds the {max_bytes} byte limit", _prefix(value))
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return Reject(f"malformed JSON: {exc}", _prefix(value))
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    return Reject("message must be a JSON object or array of objects", _prefix(value))


def _prefix(value: bytes) -> str:
    return value[:MAX_RECORD_ECHO].decode("utf-8", "replace")


def echo(record: Any) -> Any:
    """A bad record as it goes into the dead-letter topic: bounded in size, always JSON-serializable."""
    try:
        text = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    except (TypeError, orjson.JSONEncodeError):
        return repr(record)[:MAX_RECORD_ECHO]
    if len(text) > MAX_RECORD_ECHO:
        return text[:MAX_RECORD_ECHO].decode("utf-8", "replace")
    return record


_valid_names: set[str] = set()
_proc_of_dyno: dict[str, str] = {}


def valid_app(app: Any) -> TypeGuard[str]:
    if app in _valid_names:
        return True
    if type(app) is str and _NAME.match(app):
        if len(_valid_names) < 100_000:
            _valid_names.add(app)
        return True
    return False


def process_type(dyno: Any) -> str | None:
    """``web.1`` -> ``web``; ``router`` -> ``web``; None when the dyno name is not valid."""
    proc = _proc_of_dyno.get(dyno)
    if proc is not None:
        return proc
    if type(dyno) is not str:
        return None
    head = dyno.split(".", 1)[0]
    if not _NAME.match(dyno) or not head:
        return None
    proc = "web" if head == "router" else head
    if len(_proc_of_dyno) < 100_000:
        _proc_of_dyno[dyno] = proc
    return proc


def number(v: Any) -> TypeGuard[float]:
    """A finite JSON number (bool is not a number here)."""
    t = type(v)
    return (t is float and math.isfinite(v)) or t is int


def check_router(o: dict[str, Any]) -> str | None:
    """Reason the router observation is unusable, or None."""
    status = o.get("status")
    if type(status) is not int or not 100 <= status <= 599:
        return "status must be an integer 100..599"
    svc = o.get("service_ms")
    if not number(svc) or svc < 0 or svc > MAX_SERVICE_MS:
        return "service_ms must be a finite number 0..86400000"
    code = o.get("code")
    if code is not None and (type(code) is not str or not _CODE.match(code)):
        return "code must be null or a router error code like H12"
    return None


def check_runtime(o: dict[str, Any]) -> str | None:
    present = 0
    for f in RUNTIME_FIELDS:
        v = o.get(f)
        if v is None:
            continue
        if not number(v) or v < 0:
            return f"{f} must be a finite non-negative number"
        present += 1
    if not present:
        return "runtime sample has none of " + ", ".join(RUNTIME_FIELDS)
    return None


def check_metric(o: dict[str, Any]) -> str | None:
    name = o.get("name")
    if type(name) is not str or not _METRIC_NAME.match(name):
        return "name must be 1..200 characters of [A-Za-z0-9_.-:/]"
    if o.get("type") not in METRIC_TYPES:
        return "type must be one of timer, counter, gauge"
    v = o.get("value")
    if not number(v):
        return "value must be a finite number"
    if o["type"] == "timer" and v < 0:
        return "timer value must be >= 0"
    return None
