"""The observation contract (topic ``observations``, key = app) and its validation.

A message value is one observation object or a JSON array of observations::

    {"kind":"router","app":"shop","dyno":"web.1","ts":1764000000123,"status":200,"service_ms":12.0,
     "connect_ms":1.0,"bytes":415,"code":null}
    {"kind":"runtime","app":"shop","dyno":"web.1","ts":...,"memory_total_mb":...,"memory_rss_mb":...,
     "memory_swap_mb":...,"memory_quota_mb":...,"load_avg_1m":...}
    {"kind":"metric","app":"shop","dyno":"web.1","ts":...,"name":"db.query_ms","type":"timer","value":3.2}
    {"kind":"addon","app":"shop","ts":...,"source":"DATABASE","addon":"postgresql-x-123",
     "samples":{"db_size_mb":25004.8,"active_connections":92.0}}
    {"kind":"event","app":"shop","dyno":"web.1","ts":...,"name":"R14"}

``ts`` is event time in epoch ms; the process type is ``dyno`` up to the first dot (``router`` -- requests
no dyno served -- counts under ``web``, the only process type the router serves). Unknown fields are
ignored, so producers can send more than we aggregate.

A router request without ``service_ms`` (null or absent) is one the router answered itself (H10 App
crashed, H14 No web dynos, ...): it counts as a request, by status and error code, but has no latency, so
it enters no percentile, mean or max. Add-on samples and app-wide events (releases) belong to the app,
not to a process type: they are kept under the reserved process type :data:`APP_SERIES`.

Decoding has two paths. The fast one decodes and type/bound-checks a whole message in C (msgspec, ~3 M
observations/s). Only a message that fails it takes the lenient path: parse leniently (orjson, then the
stdlib parser, which accepts NaN/Infinity and huge ints), then check each element on its own, so a bad
record gets its own reason and its valid neighbours are kept. Checks msgspec cannot express (name
patterns, dyno names, clock skew, lateness) run in the aggregation loop (tables/windows.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeGuard, Union

import msgspec
import orjson
from msgspec import Meta, Struct

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,99}\Z")
MAX_SERVICE_MS = 24 * 3600 * 1000.0  # a day: anything above is a unit mistake, not a slow request
MAX_RECORD_ECHO = 2048  # bytes of a bad record echoed into the dead-letter record

NonNegative = Annotated[float, Meta(ge=0.0, le=1e15)]
EpochMs = Annotated[int, Meta(ge=0, le=10**15)]


APP_SERIES = "app"
"""The process type under which add-on samples and app-wide events (releases) are aggregated."""
EVENT_NAMES = ("crash", "restart", "stop", "exit", "release", "scale",
               "R10", "R12", "R13", "R14", "R15", "R16", "R17", "R99")
"""Platform events counted per minute: dyno state to crashed, restart (Restarting/Cycling), stop (SIGTERM or
SIGKILL sent), exit (process exited), release (deploy, rollback), scale, and the runtime errors R10..R99."""
MAX_ADDON_SAMPLES = 64
"""Samples per add-on line: Heroku Postgres sends ~18, Redis ~17; more is a runaway producer."""

SampleName = Annotated[str, Meta(pattern=r"^[a-z0-9_]{1,64}$")]


class Router(Struct, tag_field="kind", tag="router", frozen=True, gc=False):
    app: str
    dyno: str
    ts: EpochMs
    status: Annotated[int, Meta(ge=100, le=599)]
    service_ms: Union[Annotated[float, Meta(ge=0.0, le=MAX_SERVICE_MS)], None] = None
    code: Union[Annotated[str, Meta(pattern=r"^[A-Z][0-9]{1,3}$")], None] = None


class Runtime(Struct, tag_field="kind", tag="runtime", frozen=True, gc=False):
    app: str
    dyno: str
    ts: EpochMs
    memory_rss_mb: Union[NonNegative, None] = None
    memory_swap_mb: Union[NonNegative, None] = None
    memory_total_mb: Union[NonNegative, None] = None
    memory_quota_mb: Union[NonNegative, None] = None
    load_avg_1m: Union[NonNegative, None] = None


class Metric(Struct, tag_field="kind", tag="metric", frozen=True, gc=False):
    app: str
    dyno: str
    ts: EpochMs
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}$")]
    type: Literal["timer", "counter", "gauge"]
    value: Annotated[float, Meta(ge=-1e300, le=1e300)]  # bounds also refuse NaN and infinities


class Addon(Struct, tag_field="kind", tag="addon", frozen=True, gc=False):
    """One metrics line of an add-on (Heroku Postgres, Redis): gauges in base units (MB, counts, ratios)."""
    app: str
    ts: EpochMs
    source: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")]
    samples: Annotated[dict[SampleName, Annotated[float, Meta(ge=-1e300, le=1e300)]],
                       Meta(min_length=1, max_length=MAX_ADDON_SAMPLES)]
    addon: Union[Annotated[str, Meta(max_length=200)], None] = None


class Event(Struct, tag_field="kind", tag="event", frozen=True, gc=False):
    """A platform event of a dyno (``web.1``), a process type (``web``) or the app (:data:`APP_SERIES`)."""
    app: str
    dyno: str
    ts: EpochMs
    name: Literal[EVENT_NAMES]  # type: ignore[valid-type]


Observation = Union[Router, Runtime, Metric, Addon, Event]
KINDS = ("router", "runtime", "metric", "addon", "event")
# gc=False above: the structs hold only str/int/float/None and can never be part of a reference cycle, so
# the collector need not track the ~500 of them a batched message creates (measured ~10 % faster decode).
_many = msgspec.json.Decoder(list[Observation])
_one = msgspec.json.Decoder(Observation)


@dataclass(frozen=True, slots=True)
class Reject:
    """A record (or a whole message) that could not be used, and why."""

    reason: str
    record: Any  # the offending value, or the message's text prefix when it was not parseable
    index: int = -1  # position in the message's array; -1 = the whole message


@dataclass(slots=True)
class Decoded:
    observations: list[Observation]
    indexes: list[int] | None  # original positions when some were rejected; None = 0..n-1
    rejects: list[Reject]
    more_rejects: int = 0
    """Rejected records past ``max_rejects``: counted, not described (a body of 2 million bad elements must
    not become 2 million reject objects)."""


def decode(value: bytes | None, max_bytes: int, *, max_rejects: int | None = None) -> Decoded | Reject:
    """Message bytes -> typed observations plus per-record rejects (the first ``max_rejects``, if given), or
    one Reject for the whole message."""
    if value is None:
        return Reject("empty message", None)
    if len(value) > max_bytes:
        return Reject(f"message of {len(value)} bytes exceeds the {max_bytes} byte limit", _prefix(value))
    try:
        head = value.lstrip()[:1]
        if head == b"[":
            return Decoded(_many.decode(value), None, [])
        if head == b"{":
            return Decoded([_one.decode(value)], None, [])
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    return _decode_lenient(value, max_rejects)


def _decode_lenient(value: bytes, max_rejects: int | None = None) -> Decoded | Reject:
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return Reject(f"malformed JSON: {exc}", _prefix(value))
    if isinstance(data, dict):
        data = [data]
    elif not isinstance(data, list):
        return Reject("message must be a JSON object or array of objects", _prefix(value))
    out: list[Observation] = []
    indexes: list[int] = []
    rejects: list[Reject] = []
    more = 0
    room = len(data) if max_rejects is None else max_rejects
    for i, element in enumerate(data):
        reason = _element_problem(element)
        if reason is None:
            try:
                out.append(msgspec.convert(element, Observation))
                indexes.append(i)
                continue
            except msgspec.ValidationError as exc:
                reason = str(exc)
        if len(rejects) < room:
            rejects.append(Reject(reason, echo(element), i))
        else:
            more += 1
    return Decoded(out, indexes, rejects, more)


def _element_problem(element: Any) -> str | None:
    """What msgspec.convert would let through or explain badly: non-objects, unknown kinds."""
    if not isinstance(element, dict):
        return "observation must be a JSON object"
    if element.get("kind") not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}"
    return None


def _prefix(value: bytes) -> str:
    return value[:MAX_RECORD_ECHO].decode("utf-8", "replace")


def echo(record: Any) -> Any:
    """A bad record as it goes into the dead-letter topic: bounded in size, always JSON-serializable."""
    if isinstance(record, Struct):
        record = msgspec.to_builtins(record)
    try:
        text = orjson.dumps(record)
    except (TypeError, orjson.JSONEncodeError):
        return repr(record)[:MAX_RECORD_ECHO]
    if len(text) > MAX_RECORD_ECHO:
        return text[:MAX_RECORD_ECHO].decode("utf-8", "replace")
    return record


MAX_NAME_CHARS = 100
"""Longest app or dyno name: a longer one is refused before any cache sees it, so junk names cost the
caches at most ``_CACHE_MAX`` short entries."""
_CACHE_MAX = 100_000


@lru_cache(maxsize=_CACHE_MAX)
def _valid_name(name: str) -> bool:
    return _NAME.match(name) is not None


def valid_app(app: Any) -> TypeGuard[str]:
    # An LRU, not a fill-once cache: junk names only evict, they never stop caching for good (L6).
    return type(app) is str and len(app) <= MAX_NAME_CHARS and _valid_name(app)


@lru_cache(maxsize=_CACHE_MAX)
def _proc_of_dyno(dyno: str) -> str | None:
    head = dyno.split(".", 1)[0]
    if not head or not _NAME.match(dyno):
        return None
    return "web" if head == "router" else head


def process_type(dyno: str) -> str | None:
    """``web.1`` -> ``web``; ``router`` -> ``web``; None when the dyno name is not valid.

    Answers come from a bounded LRU (C-level lookups); names over MAX_NAME_CHARS are refused first."""
    if len(dyno) > MAX_NAME_CHARS:
        return None
    return _proc_of_dyno(dyno)


known_process_type = process_type
"""Kept for the column-wise fold (tables/windows.py): since the LRU also judges unseen dynos, it is
:func:`process_type` itself."""
