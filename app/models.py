"""The observation contract (topic ``observations``, key = app) and its validation.

A bad record is refused with its own reason and never costs its valid neighbours: a message is decoded in C
(msgspec) first, leniently element by element only when that fails. The checks msgspec cannot express run in
``decode(now_ms=...)``; what depends on window state stays in tables/windows.py.
Reference: docs/ingest.md#input-topic-observations-key-app
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import compress
from operator import not_
from typing import Annotated, Any, Literal, TypeGuard, cast

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
    service_ms: Annotated[float, Meta(ge=0.0, le=MAX_SERVICE_MS)] | None = None
    code: Annotated[str, Meta(pattern=r"^[A-Z][0-9]{1,3}$")] | None = None


class Runtime(Struct, tag_field="kind", tag="runtime", frozen=True, gc=False):
    app: str
    dyno: str
    ts: EpochMs
    memory_rss_mb: NonNegative | None = None
    memory_swap_mb: NonNegative | None = None
    memory_total_mb: NonNegative | None = None
    memory_quota_mb: NonNegative | None = None
    load_avg_1m: NonNegative | None = None


MetricName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-:/]{0,199}$")]
Finite = Annotated[float, Meta(ge=-1e300, le=1e300)]  # the bounds also refuse NaN and infinities
StreamId = Annotated[str, Meta(pattern=r"^[0-9a-f]{16}$")]
MAX_BUCKETS = 512
"""Bounds of one histogram: OTLP SDKs default to 15 explicit ones and 160 exponential buckets per sign."""


class Metric(Struct, tag_field="kind", tag="metric", frozen=True, gc=False):
    """A custom metric sample. A counter with ``stream`` carries a cumulative total, since ``start``: the
    worker differences it per stream (tables/streams.py)."""
    app: str
    dyno: str
    ts: EpochMs
    name: MetricName
    type: Literal["timer", "counter", "gauge"]
    value: Finite
    stream: StreamId | None = None
    start: EpochMs | None = None


class Histogram(Struct, tag_field="kind", tag="histogram", frozen=True, gc=False):
    """Many values at once (an OTLP histogram point): ``counts[i]`` values in ``(bounds[i-1], bounds[i]]``,
    the first bucket unbounded below and the last above, so ``len(counts) == len(bounds) + 1``.

    ``name`` None is the app's request series: service times in ms, all of one ``status``. With ``stream``,
    count, sum and counts are totals since ``start`` (cumulative temporality), differenced by the worker."""
    app: str
    dyno: str
    ts: EpochMs
    count: Annotated[int, Meta(ge=0, le=10**15)]
    sum: Finite
    bounds: Annotated[list[Finite], Meta(max_length=MAX_BUCKETS)]
    counts: Annotated[list[Annotated[int, Meta(ge=0, le=10**15)]], Meta(min_length=1, max_length=MAX_BUCKETS + 1)]
    min: Finite | None = None
    max: Finite | None = None
    name: MetricName | None = None
    status: Annotated[int, Meta(ge=100, le=599)] | None = None
    stream: StreamId | None = None
    start: EpochMs | None = None


class Addon(Struct, tag_field="kind", tag="addon", frozen=True, gc=False):
    """One metrics line of an add-on (Heroku Postgres, Redis): gauges in base units (MB, counts, ratios)."""
    app: str
    ts: EpochMs
    source: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")]
    samples: Annotated[dict[SampleName, Annotated[float, Meta(ge=-1e300, le=1e300)]],
                       Meta(min_length=1, max_length=MAX_ADDON_SAMPLES)]
    addon: Annotated[str, Meta(max_length=200)] | None = None


class Event(Struct, tag_field="kind", tag="event", frozen=True, gc=False):
    """A platform event of a dyno (``web.1``), a process type (``web``) or the app (:data:`APP_SERIES`)."""
    app: str
    dyno: str
    ts: EpochMs
    name: Literal[EVENT_NAMES]  # type: ignore[valid-type]


Observation = Router | Runtime | Metric | Addon | Event | Histogram
KINDS = ("router", "runtime", "metric", "addon", "event", "histogram")
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
    app: str | None = None  # the record's app, when only another rule failed (dead letters carry it)


@dataclass(slots=True)
class Decoded:
    observations: list[Observation]
    indexes: list[int] | None  # original positions when some were rejected; None = 0..n-1
    rejects: list[Reject]
    more_rejects: int = 0
    """Rejected records past ``max_rejects``: counted, not described (a body of 2 million bad elements must
    not become 2 million reject objects)."""
    apps: AbstractSet[str] = frozenset()
    """Checked decode only: the distinct apps of ``observations``."""
    process_types: dict[str, str] = field(default_factory=dict)
    """Checked decode only: each dyno of ``observations`` -> its process type, worked out once per dyno."""
    router_mask: Sequence[bool] = ()
    ts_ms: Sequence[int] = ()
    """Columns the checks of a large message pulled out (empty otherwise): whether each observation is a
    Router, and its ``ts``. The column-wise fold reuses them: each pass over 500 objects costs ~5 %."""


def decode(value: bytes | None, max_bytes: int, *, max_rejects: int | None = None, now_ms: int | None = None,
           max_future_ms: int = 0) -> Decoded | Reject:
    """Message bytes -> typed observations plus per-record rejects (the first ``max_rejects``, if given), or
    one Reject for the whole message.

    With ``now_ms`` (the consumer's clock), each record is also held to the rules msgspec cannot express:
    a valid app and dyno name, ``ts`` at most ``max_future_ms`` ahead of ``now_ms``, a runtime sample
    with a field, a timer >= 0. The ingest API leaves it out: it forwards what the contract parses and
    the worker judges it with its own clock."""
    if value is None:
        return Reject("empty message", None)
    if len(value) > max_bytes:
        return Reject(f"message of {len(value)} bytes exceeds the {max_bytes} byte limit", _prefix(value))
    obs: list[Observation] | None = None
    try:
        head = value.lstrip()[:1]
        if head == b"[":
            obs = _many.decode(value)
        elif head == b"{":
            obs = [_one.decode(value)]
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    if obs is None:
        decoded = _decode_lenient(value, max_rejects)
        if now_ms is None or isinstance(decoded, Reject):
            return decoded
        return _split(decoded, now_ms + max_future_ms, max_future_ms, max_rejects)
    if now_ms is None:
        return Decoded(obs, None, [])
    future_ms = now_ms + max_future_ms
    checked = _check_few(obs, future_ms) if len(obs) < _FEW else _check_many(obs, future_ms)
    if checked is not None:
        return checked
    return _split(Decoded(obs, None, []), future_ms, max_future_ms, max_rejects)  # find the bad records


REASON_APP = "app must be 1..100 characters of [A-Za-z0-9._-]"
REASON_DYNO = "dyno must look like web.1"
REASON_RUNTIME = "runtime sample has no memory_* or load_avg_1m field"
REASON_TIMER = "timer value must be >= 0"
_FEW = 8
"""Observations below which a message is checked one by one: the column checks cost a few set builds."""


def _check_many(obs: list[Observation], future_ms: int) -> Decoded | None:
    """The checked message if every record passes (None if one does not), column-wise over distinct values
    (C-level comprehensions): a batched message is mostly router requests of one app and a few dynos."""
    mask = [o.__class__ is Router for o in obs]
    others = [] if all(mask) else list(compress(obs, map(not_, mask)))
    with_dyno: list[Any] = obs
    if others and any(o.__class__ is Addon for o in others):
        with_dyno = [o for o in obs if o.__class__ is not Addon]
    apps = {o.app for o in obs}
    procs = {dyno: process_type(dyno) for dyno in {o.dyno for o in with_dyno}}
    ts_ms = [o.ts for o in obs]
    if not (all(map(valid_app, apps)) and None not in procs.values() and max(ts_ms) <= future_ms):
        return None
    for o in others:
        if o.__class__ is Runtime:
            if not _has_field(o):
                return None
        elif ((o.__class__ is Metric and metric_problem(o) is not None)
              or (o.__class__ is Histogram and histogram_problem(o) is not None)):
            return None
    return Decoded(obs, None, [], 0, apps, cast(dict[str, str], procs), mask, ts_ms)


def _check_few(obs: list[Observation], future_ms: int) -> Decoded | None:
    """:func:`_check_many` one record at a time: a small message (mostly one observation) is too short for
    the column checks' set builds. Inlined name checks: msgspec made both fields ``str``."""
    apps: set[str] = set()
    procs: dict[str, str] = {}
    valid_name, proc_of_dyno, max_chars = _valid_name, _proc_of_dyno, MAX_NAME_CHARS
    for o in obs:
        cls = o.__class__
        app = o.app
        if len(app) > max_chars or not valid_name(app) or o.ts > future_ms:
            return None
        if cls is not Addon:
            dyno = o.dyno  # type: ignore[union-attr]
            proc = proc_of_dyno(dyno) if len(dyno) <= max_chars else None
            if proc is None:
                return None
            if cls is Runtime:
                if (o.memory_rss_mb is None and o.memory_swap_mb is None  # type: ignore[union-attr]
                        and o.memory_total_mb is None and o.memory_quota_mb is None  # type: ignore[union-attr]
                        and o.load_avg_1m is None):  # type: ignore[union-attr]
                    return None
            elif cls is Metric:
                if metric_problem(o) is not None:  # type: ignore[arg-type]
                    return None
            elif cls is Histogram and histogram_problem(o) is not None:  # type: ignore[arg-type]
                return None
            procs[dyno] = proc
        apps.add(app)
    return Decoded(obs, None, [], 0, apps, procs)


def metric_problem(m: Metric) -> str | None:
    """What msgspec cannot check of a custom sample (None: it is valid)."""
    if m.type == "timer" and m.value < 0:
        return REASON_TIMER
    if (m.stream is None) != (m.start is None):
        return "stream and start come together (a cumulative counter's identity and start time)"
    if m.stream is not None and m.type != "counter":
        return "only a counter can be cumulative (stream)"
    return None


def histogram_problem(h: Histogram) -> str | None:
    """What msgspec cannot check of a histogram (None: it is valid)."""
    bounds, counts = h.bounds, h.counts
    if len(counts) != len(bounds) + 1:
        return f"a histogram has one count more than bounds: {len(counts)} counts, {len(bounds)} bounds"
    if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
        return "histogram bounds must be strictly ascending"
    if sum(counts) != h.count:
        return f"histogram counts add up to {sum(counts)}, not its count {h.count}"
    if h.min is not None and h.max is not None and h.min > h.max:
        return "histogram min is above its max"
    if (h.stream is None) != (h.start is None):
        return "stream and start come together (a cumulative histogram's identity and start time)"
    if h.name is None:
        if h.status is None:
            return "a request histogram (no name) needs the response status"
        if h.sum < 0 or (h.min is not None and h.min < 0):
            return "service times must be >= 0"
    elif h.status is not None:
        return "status belongs to the request histogram only (no name)"
    return None


def _has_field(r: Runtime) -> bool:
    return not (r.memory_rss_mb is None and r.memory_swap_mb is None and r.memory_total_mb is None
                and r.memory_quota_mb is None and r.load_avg_1m is None)


def _split(d: Decoded, future_ms: int, max_future_ms: int, max_rejects: int | None) -> Decoded:
    """One record at a time: each bad record becomes a Reject with the first rule it breaks, in this order:
    app, dyno, clock skew, then the kind's own rules (runtime fields, timer sign, histogram shape)."""
    apps: set[str] = set()
    procs: dict[str, str] = {}
    keep: list[Observation] = []
    kept: list[int] = []
    rejects: list[Reject] = []
    more = d.more_rejects
    room = -1 if max_rejects is None else max_rejects - len(d.rejects)
    indexes = d.indexes
    for i, o in enumerate(d.observations):
        app: str | None = o.app
        proc = None if isinstance(o, Addon) else procs.get(o.dyno) or process_type(o.dyno)
        reason: str | None
        if not valid_app(app):
            reason, app = REASON_APP, None
        elif proc is None and not isinstance(o, Addon):
            reason = REASON_DYNO
        elif o.ts > future_ms:
            reason = f"ts is more than {max_future_ms} ms ahead of the wall clock"
        elif isinstance(o, Runtime):
            reason = None if _has_field(o) else REASON_RUNTIME
        elif isinstance(o, Metric):
            reason = metric_problem(o)
        elif isinstance(o, Histogram):
            reason = histogram_problem(o)
        else:
            reason = None
        if reason is None:
            apps.add(o.app)
            if proc is not None:
                procs[o.dyno] = proc  # type: ignore[union-attr]  # every kind but Addon has a dyno
            keep.append(o)
            kept.append(i if indexes is None else indexes[i])
            continue
        if room < 0 or len(rejects) < room:
            rejects.append(Reject(reason, echo(o), i if indexes is None else indexes[i], app))
        else:
            more += 1
    if len(keep) == len(d.observations):
        d.apps, d.process_types = apps, procs
        return d
    if d.rejects:
        rejects = sorted(d.rejects + rejects, key=lambda r: r.index)
    return Decoded(keep, kept, rejects, more, apps, procs)


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

