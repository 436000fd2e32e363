"""Threshold monitors and web-dyno autoscaling: pure state machines over closed minutes.

Nothing here touches Kafka, a clock or the network. Every decision is a function of the closed minutes
(event time: ``Minute.start_ms``) and of the state kept between them, so the Faust binding
(agents/alerts.py, agents/autoscale.py) replays the same decisions after a restart, and tests script
timelines minute by minute.

**Monitors** (alerting). A monitor watches one metric of one process type of one app:

* ``LATENCY``: the minute's p95 response time >= ``threshold`` ms (threshold >= 50).
* ``ERROR_RATE``: failed requests (status >= 500) / requests >= ``threshold`` (0.005 .. 1.0).

The condition must hold for ``sensitivity_min`` (1, 5 or 10) consecutive minutes before the monitor
fires. A minute without requests, or a minute that produced no record at all (a gap between two
records of the process type), does not hold: it cannot fire and it breaks a streak. While firing, a
reminder goes out at most every ``notify_every_min`` (5, 60 or 1440) minutes, counted from the last
notification. The first minute whose condition does not hold resolves the monitor. States: ``ok`` (never
fired) -> ``firing`` -> ``resolved`` -> ``firing`` ...; every transition is an :class:`AlertEvent`.

**Autoscaling**. One policy per app for its ``web`` process: ``min_dynos`` >= 1, ``max_dynos``, a desired
p95. The model (:func:`estimate`) and its rules are described there and in :class:`Autoscaler`.

**Idempotence.** Input is at-least-once: a minute may arrive twice. Each monitor and policy keeps the
start of the last minute it applied and ignores minutes at or before it. Minutes of one (app, process
type) arrive in order; different process types may interleave, and each monitor only looks at its own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import orjson

from app import models
from app.sealing import Secret, secret_from_record, secret_to_record
from tables.aggregate import Aggregate

WINDOW_MS = 60_000

LATENCY = "LATENCY"
ERROR_RATE = "ERROR_RATE"
METRICS = (LATENCY, ERROR_RATE)
SENSITIVITIES_MIN = (1, 5, 10)
NOTIFY_EVERY_MIN = (5, 60, 1440)
LATENCY_MIN_MS = 50.0
LATENCY_MAX_MS = 300_000.0
ERROR_RATE_MIN = 0.005
ERROR_RATE_MAX = 1.0
AUTOSCALE_PROCESS_TYPES = ("web",)
MAX_DYNOS_LIMIT = 1000
MAX_EMAILS = 10
MAX_WEBHOOKS = 5

OK = "ok"
FIRING = "firing"
RESOLVED = "resolved"
MONITOR_DELETED = "monitor_deleted"
"""``reason`` of the ``resolved`` event of a monitor deleted while firing."""

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
"""Matched whole (``fullmatch``: ``$`` would accept a trailing newline, which ends the mail's headers).
The local part is RFC 5322 ``atext`` and dots: ASCII, no space, quote, comma, semicolon or angle bracket."""
_MONITOR_ID = re.compile(r"^mon_[0-9a-f]{12}$")


class ValidationError(ValueError):
    """A monitor or policy definition is invalid; ``field`` names the offending field (HTTP 400)."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


# --- input ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Minute:
    """What monitors and policies need from one closed minute of one (app, process type)."""

    app: str
    process_type: str
    start_ms: int
    requests: int
    failed: int
    p95_ms: float | None

    @classmethod
    def from_aggregate(cls, agg: Aggregate) -> "Minute":
        n = agg.requests
        p95 = agg.response.digest.quantile(0.95) if agg.response.n else None  # .n flushes buffered values
        return cls(agg.key.app, agg.key.process_type, agg.key.start_ms, n, agg.failed if n else 0,
                   None if p95 is None else float(p95))

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Minute":
        """From a ``metrics-1m`` record (Aggregate.to_record()); ValueError when it is not one."""
        try:
            return cls.from_aggregate(Aggregate.from_record(dict(rec)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a metrics-1m record: {exc!r}") from None

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.requests if self.requests else None


# --- notification targets -----------------------------------------------------------------------------

def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: what a read-token holder sees of a webhook URL, which is often itself
    the credential (Slack, Discord). Only the write-token holder that set it got it back in full."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "…"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}/…"


def redacted(public: dict[str, Any]) -> dict[str, Any]:
    """A rendered monitor or policy (``public()``) with its webhook URLs cut by :func:`redact_url`."""
    hooks = public.get("webhooks")
    if not hooks:
        return public
    return {**public, "webhooks": [{**w, "url": redact_url(w["url"])} for w in hooks]}


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: Secret = field(repr=False)
    """Plaintext from the API; sealed in records (``secret_enc``) when ``METRICS_SECRETS_KEY`` is set, and
    then also in memory once decoded: only the sender decrypts it, to sign (app/notify/delivery.py)."""

    def to_record(self) -> dict[str, Any]:
        return {"url": self.url, **secret_to_record(self.secret)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Webhook":
        if "secret" not in rec and "secret_enc" not in rec:
            raise KeyError("secret")
        return cls(rec["url"], secret_from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "secret_set": True}  # the signing secret is never read back


@dataclass(frozen=True, slots=True)
class Targets:
    email: tuple[str, ...] = ()
    webhooks: tuple[Webhook, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"email": list(self.email), "webhooks": [w.to_record() for w in self.webhooks]}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Targets":
        return cls(tuple(rec.get("email", ())), tuple(Webhook.from_record(w) for w in rec.get("webhooks", ())))

    def public(self) -> dict[str, Any]:
        return {"email": list(self.email), "webhooks": [w.public() for w in self.webhooks]}


def _check_keys(body: Any, allowed: set[str], required: set[str], where: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError(where, "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(body))
    if missing:
        raise ValidationError(missing[0], "is required")
    return body


def _number(body: Mapping[str, Any], name: str) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValidationError(name, "must be a finite number")
    return float(v)


def _integer(body: Mapping[str, Any], name: str) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValidationError(name, "must be an integer")
    return v


def _process_type(body: Mapping[str, Any], name: str = "process_type") -> str:
    v = body[name]
    if not isinstance(v, str) or not models.valid_app(v):
        raise ValidationError(name, "must be 1..100 characters of [A-Za-z0-9._-]")
    return v


def parse_targets(body: Mapping[str, Any]) -> Targets:
    """``email`` (addresses) and ``webhooks`` (``{url, secret}``), both optional lists."""
    emails = body.get("email", [])
    if not isinstance(emails, list) or len(emails) > MAX_EMAILS:
        raise ValidationError("email", f"must be a list of at most {MAX_EMAILS} addresses")
    for e in emails:
        if not isinstance(e, str) or len(e) > 254 or not _EMAIL.fullmatch(e):
            raise ValidationError("email", f"{e!r} is not an e-mail address")
    hooks = body.get("webhooks", [])
    if not isinstance(hooks, list) or len(hooks) > MAX_WEBHOOKS:
        raise ValidationError("webhooks", f"must be a list of at most {MAX_WEBHOOKS} objects")
    out: list[Webhook] = []
    for h in hooks:
        h = _check_keys(h, {"url", "secret"}, {"url", "secret"}, "webhooks")
        url, secret = h["url"], h["secret"]
        if not isinstance(url, str) or len(url) > 2048:
            raise ValidationError("webhooks.url", "must be an http(s) URL of at most 2048 characters")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError("webhooks.url", f"{url!r} is not an http(s) URL")
        if not isinstance(secret, str) or not 16 <= len(secret) <= 256:
            raise ValidationError("webhooks.secret", "must be a string of 16..256 characters (HMAC-SHA256 key)")
        out.append(Webhook(url, secret))
    return Targets(tuple(dict.fromkeys(emails)), tuple(out))


# --- monitors ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MonitorConfig:
    id: str
    process_type: str
    metric: str
    threshold: float
    sensitivity_min: int
    notify_every_min: int
    targets: Targets = field(default_factory=Targets)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "process_type": self.process_type, "metric": self.metric,
                "threshold": self.threshold, "sensitivity_min": self.sensitivity_min,
                "notify_every_min": self.notify_every_min, **self.targets.to_record()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "MonitorConfig":
        return cls(rec["id"], rec["process_type"], rec["metric"], float(rec["threshold"]),
                   int(rec["sensitivity_min"]), int(rec["notify_every_min"]), Targets.from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "process_type": self.process_type, "metric": self.metric,
                "threshold": self.threshold, "sensitivity_min": self.sensitivity_min,
                "notify_every_min": self.notify_every_min, **self.targets.public()}


MONITOR_FIELDS = {"process_type", "metric", "threshold", "sensitivity_min", "notify_every_min", "email",
                  "webhooks"}


def valid_monitor_id(monitor_id: str) -> bool:
    return bool(_MONITOR_ID.match(monitor_id))


def parse_monitor(body: Any, *, monitor_id: str) -> MonitorConfig:
    """A monitor definition from an API body; raises :class:`ValidationError` with the field at fault."""
    b = _check_keys(body, MONITOR_FIELDS, {"metric", "threshold", "sensitivity_min", "notify_every_min"})
    metric = b["metric"]
    if metric not in METRICS:
        raise ValidationError("metric", f"must be one of {', '.join(METRICS)}")
    threshold = _number(b, "threshold")
    if metric == LATENCY and not LATENCY_MIN_MS <= threshold <= LATENCY_MAX_MS:
        raise ValidationError("threshold", f"LATENCY threshold is p95 in ms: {LATENCY_MIN_MS:g}.."
                                           f"{LATENCY_MAX_MS:g}")
    if metric == ERROR_RATE and not ERROR_RATE_MIN <= threshold <= ERROR_RATE_MAX:
        raise ValidationError("threshold", f"ERROR_RATE threshold is a fraction of requests: "
                                           f"{ERROR_RATE_MIN:g}..{ERROR_RATE_MAX:g}")
    sensitivity = _integer(b, "sensitivity_min")
    if sensitivity not in SENSITIVITIES_MIN:
        raise ValidationError("sensitivity_min", f"must be one of {SENSITIVITIES_MIN} (consecutive minutes)")
    every = _integer(b, "notify_every_min")
    if every not in NOTIFY_EVERY_MIN:
        raise ValidationError("notify_every_min", f"must be one of {NOTIFY_EVERY_MIN} (minutes)")
    proc = _process_type(b) if "process_type" in b else "web"
    return MonitorConfig(monitor_id, proc, metric, threshold, sensitivity, every, parse_targets(b))


@dataclass(slots=True)
class MonitorState:
    status: str = OK
    streak: int = 0
    """Consecutive minutes (capped at the sensitivity) whose condition held."""
    last_minute_ms: int = -1
    """Start of the last minute applied: minutes at or before it are replays and ignored."""
    firing_since_ms: int | None = None
    last_notified_ms: int | None = None
    last_value: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {"status": self.status, "streak": self.streak, "last_minute_ms": self.last_minute_ms,
                "firing_since_ms": self.firing_since_ms, "last_notified_ms": self.last_notified_ms,
                "last_value": self.last_value}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "MonitorState":
        return cls(rec["status"], int(rec["streak"]), int(rec["last_minute_ms"]), rec["firing_since_ms"],
                   rec["last_notified_ms"], rec["last_value"])


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A transition (``firing``, ``resolved``) or a reminder while firing (``still_firing``)."""

    event: str
    app: str
    process_type: str
    monitor_id: str
    metric: str
    minute_start_ms: int
    value: float | None
    requests: int
    threshold: float
    sensitivity_min: int
    firing_since_ms: int | None
    reason: str = ""
    """Set when the event is not the outcome of a minute: ``monitor_deleted``. Left out of the record
    when empty, so ordinary events keep their shape."""

    @property
    def event_id(self) -> str:
        """Deterministic: a replayed minute re-sends the same id, so receivers can de-duplicate."""
        return f"{self.app}/{self.monitor_id}/{self.minute_start_ms}/{self.event}"

    def to_record(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "event": self.event, "app": self.app,
                "process_type": self.process_type, "monitor_id": self.monitor_id, "metric": self.metric,
                "minute_start_ms": self.minute_start_ms, "value": self.value, "requests": self.requests,
                "threshold": self.threshold, "sensitivity_min": self.sensitivity_min,
                "firing_since_ms": self.firing_since_ms, **({"reason": self.reason} if self.reason else {})}


class Monitor:
    def __init__(self, config: MonitorConfig, state: MonitorState | None = None) -> None:
        self.config = config
        self.state = state or MonitorState()

    def value_of(self, minute: Minute) -> float | None:
        return minute.p95_ms if self.config.metric == LATENCY else minute.error_rate

    def observe(self, app: str, minute: Minute) -> list[AlertEvent]:
        """Apply one closed minute of this monitor's process type; returns the events it causes."""
        st = self.state
        if minute.start_ms <= st.last_minute_ms:
            return []  # at-least-once input: this minute (or a later one) was already applied
        events: list[AlertEvent] = []
        if st.last_minute_ms >= 0 and minute.start_ms > st.last_minute_ms + WINDOW_MS:
            # The minutes in between produced no record: no traffic, so the condition did not hold.
            self._step(app, st.last_minute_ms + WINDOW_MS, None, 0, events)
        value = self.value_of(minute)
        self._step(app, minute.start_ms, value, minute.requests, events)
        st.last_minute_ms = minute.start_ms
        return events

    def _step(self, app: str, minute_ms: int, value: float | None, requests: int,
              events: list[AlertEvent]) -> None:
        cfg, st = self.config, self.state
        holds = requests > 0 and value is not None and value >= cfg.threshold
        st.streak = min(st.streak + 1, cfg.sensitivity_min) if holds else 0
        st.last_value = value

        def event(kind: str) -> AlertEvent:
            return AlertEvent(kind, app, cfg.process_type, cfg.id, cfg.metric, minute_ms, value, requests,
                              cfg.threshold, cfg.sensitivity_min, st.firing_since_ms)

        if st.status != FIRING:
            if holds and st.streak >= cfg.sensitivity_min:
                st.status, st.firing_since_ms, st.last_notified_ms = FIRING, minute_ms, minute_ms
                events.append(event("firing"))
        elif not holds:
            st.status = RESOLVED
            events.append(event("resolved"))
            st.firing_since_ms = None
        elif st.last_notified_ms is None or minute_ms - st.last_notified_ms >= cfg.notify_every_min * WINDOW_MS:
            st.last_notified_ms = minute_ms
            events.append(event("still_firing"))

    def deleted(self, app: str) -> AlertEvent | None:
        """The ``resolved`` event a firing monitor owes when it is deleted (None when not firing): whoever
        saw ``firing`` would otherwise wait for a resolve forever. No minute caused it, so it carries no
        value and the minute after the last one applied; being derived from the state alone, a redelivered
        delete command repeats the same event id."""
        cfg, st = self.config, self.state
        if st.status != FIRING:
            return None
        return AlertEvent(RESOLVED, app, cfg.process_type, cfg.id, cfg.metric, st.last_minute_ms + WINDOW_MS, None,
                          0, cfg.threshold, cfg.sensitivity_min, st.firing_since_ms, MONITOR_DELETED)

    def to_record(self) -> dict[str, Any]:
        return {"cfg": self.config.to_record(), "st": self.state.to_record()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Monitor":
        return cls(MonitorConfig.from_record(rec["cfg"]), MonitorState.from_record(rec["st"]))

    def public(self) -> dict[str, Any]:
        st = self.state
        return {**self.config.public(),
                "state": {"status": st.status, "streak_min": st.streak, "last_minute_ms": st.last_minute_ms,
                          "firing_since_ms": st.firing_since_ms, "last_notified_ms": st.last_notified_ms,
                          "last_value": st.last_value}}


class AppMonitors:
    """Every monitor of one app, stored as one table value (bounded: at most ``max_monitors``)."""

    VERSION = 1

    def __init__(self, monitors: dict[str, Monitor] | None = None) -> None:
        self.monitors: dict[str, Monitor] = monitors or {}

    def observe(self, minute: Minute) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for m in self.monitors.values():
            if m.config.process_type == minute.process_type:
                events.extend(m.observe(minute.app, minute))
        return events

    def put(self, config: MonitorConfig) -> Monitor:
        """Create, or replace the definition and keep the state: the new condition applies from the next
        minute (a firing monitor resolves at the first minute the new condition does not hold)."""
        old = self.monitors.get(config.id)
        m = Monitor(config, old.state if old is not None else None)
        if m.state.streak > config.sensitivity_min:
            m.state.streak = config.sensitivity_min
        self.monitors[config.id] = m
        return m

    def to_bytes(self) -> bytes:
        return orjson.dumps({"v": self.VERSION, "monitors": [m.to_record() for m in self.monitors.values()]})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "AppMonitors":
        rec = orjson.loads(raw)
        if rec.get("v") != cls.VERSION:
            raise ValueError(f"unsupported monitors record version {rec.get('v')!r}")
        monitors = [Monitor.from_record(r) for r in rec["monitors"]]
        return cls({m.config.id: m for m in monitors})


# --- autoscaling --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AutoscaleParams:
    """Model constants (settings ``METRICS_AUTOSCALE_*``); the defaults are explained in app/settings.py."""

    history_min: int = 60
    min_requests: int = 20
    up_cooldown_min: int = 1
    down_cooldown_min: int = 5
    down_stable_min: int = 5
    down_headroom: float = 0.2
    pinned_notify_every_min: int = 1440


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    process_type: str
    min_dynos: int
    max_dynos: int
    p95_target_ms: float
    current_dynos: int | None = None
    """The count running when the policy was written (the configured source); None: ``min_dynos``."""
    targets: Targets = field(default_factory=Targets)

    def to_record(self) -> dict[str, Any]:
        return {"process_type": self.process_type, "min_dynos": self.min_dynos, "max_dynos": self.max_dynos,
                "p95_target_ms": self.p95_target_ms, "current_dynos": self.current_dynos,
                **self.targets.to_record()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "PolicyConfig":
        return cls(rec["process_type"], int(rec["min_dynos"]), int(rec["max_dynos"]),
                   float(rec["p95_target_ms"]), rec.get("current_dynos"), Targets.from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"process_type": self.process_type, "min_dynos": self.min_dynos, "max_dynos": self.max_dynos,
                "p95_target_ms": self.p95_target_ms, "current_dynos": self.current_dynos,
                **self.targets.public()}


POLICY_FIELDS = {"min_dynos", "max_dynos", "p95_target_ms", "current_dynos", "email", "webhooks"}


def parse_policy(body: Any, *, process_type: str) -> PolicyConfig:
    if process_type not in AUTOSCALE_PROCESS_TYPES:
        raise ValidationError("process_type", "autoscaling applies to the web process type only "
                                              "(its response times are what the policy targets)")
    b = _check_keys(body, POLICY_FIELDS, {"min_dynos", "max_dynos", "p95_target_ms"})
    lo, hi = _integer(b, "min_dynos"), _integer(b, "max_dynos")
    if lo < 1:
        raise ValidationError("min_dynos", "must be >= 1")
    if not lo <= hi <= MAX_DYNOS_LIMIT:
        raise ValidationError("max_dynos", f"must be within min_dynos..{MAX_DYNOS_LIMIT}")
    target = _number(b, "p95_target_ms")
    if not LATENCY_MIN_MS <= target <= LATENCY_MAX_MS:
        raise ValidationError("p95_target_ms", f"must be within {LATENCY_MIN_MS:g}..{LATENCY_MAX_MS:g} ms")
    current = None
    if b.get("current_dynos") is not None:
        current = _integer(b, "current_dynos")
        if not 0 <= current <= MAX_DYNOS_LIMIT:
            raise ValidationError("current_dynos", f"must be within 0..{MAX_DYNOS_LIMIT}")
    return PolicyConfig(process_type, lo, hi, target, current, parse_targets(b))


@dataclass(slots=True)
class PolicyState:
    dynos: int
    last_minute_ms: int = -1
    last_step_ms: int | None = None
    down_streak: int = 0
    pinned_notified_ms: int | None = None
    history: list[tuple[int, int, float | None, int]] = field(default_factory=list)
    """(minute start ms, requests, p95 ms, dynos running) for the past ``history_min`` minutes."""

    def to_record(self) -> dict[str, Any]:
        return {"dynos": self.dynos, "last_minute_ms": self.last_minute_ms, "last_step_ms": self.last_step_ms,
                "down_streak": self.down_streak, "pinned_notified_ms": self.pinned_notified_ms,
                "history": [list(h) for h in self.history]}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "PolicyState":
        return cls(int(rec["dynos"]), int(rec["last_minute_ms"]), rec["last_step_ms"], int(rec["down_streak"]),
                   rec["pinned_notified_ms"], [(int(h[0]), int(h[1]), h[2], int(h[3])) for h in rec["history"]])


@dataclass(frozen=True, slots=True)
class Estimate:
    capacity_per_dyno: float | None
    """Requests per minute one dyno served within the target (None: not measurable from the hour)."""
    needed: int
    """Smallest dyno count meeting the target at the current throughput (unclamped)."""
    needed_with_headroom: int
    """The same with ``down_headroom`` spare capacity: scaling down must keep this many."""
    breach: bool


def estimate(history: list[tuple[int, int, float | None, int]], *, requests: int, p95_ms: float | None,
             dynos: int, target_ms: float, params: AutoscaleParams) -> Estimate:
    """The capacity model.

    For every minute of the past hour with at least ``min_requests`` requests, the per-dyno throughput is
    ``x = requests / dynos running``. Minutes whose p95 exceeded the target bound the capacity from
    above: one dyno cannot serve ``min(x of those minutes)``. The capacity ``C`` is the largest ``x``
    whose p95 met the target and that lies below that bound: throughput one dyno has demonstrably served
    within the target. At the current throughput ``R`` the smallest count meeting the target is
    ``ceil(R / C)``. When the current minute misses the target the estimate is at least one more dyno
    than running (the hour over-estimated the capacity). Without any qualifying minute there is no
    estimate and the count holds (or grows by one while the target is missed); without traffic it is 1.
    """
    samples = [(r / d, p) for _, r, p, d in history if r >= params.min_requests and p is not None and d >= 1]
    ceiling = min((x for x, p in samples if p > target_ms), default=math.inf)
    capacity = max((x for x, p in samples if p <= target_ms and x < ceiling), default=None)
    breach = requests >= params.min_requests and p95_ms is not None and p95_ms > target_ms
    if requests == 0:
        needed = spare = 1
    elif capacity is None:
        needed = spare = dynos
    else:
        # A tiny epsilon keeps 300 / 100.0 at 3, not 4, through float rounding.
        needed = max(1, math.ceil(requests / capacity - 1e-9))
        spare = max(1, math.ceil(requests / (capacity * (1.0 - params.down_headroom)) - 1e-9))
    if breach:
        needed = max(needed, dynos + 1)
        spare = max(spare, needed)
    return Estimate(capacity, needed, spare, breach)


@dataclass(frozen=True, slots=True)
class Decision:
    """One evaluated minute of a policy. ``action``: up, down or hold; ``to_dynos`` is the new count."""

    app: str
    process_type: str
    minute_start_ms: int
    action: str
    from_dynos: int
    to_dynos: int
    reason: str
    requests: int
    p95_ms: float | None
    p95_target_ms: float
    capacity_per_dyno: float | None
    needed_dynos: int
    min_dynos: int
    max_dynos: int
    pinned_at_max: bool
    notify_pinned: bool

    @property
    def changed(self) -> bool:
        return self.to_dynos != self.from_dynos

    @property
    def event_id(self) -> str:
        return f"{self.app}/{self.process_type}/{self.minute_start_ms}/autoscale"

    def to_record(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "app": self.app, "process_type": self.process_type,
                "minute_start_ms": self.minute_start_ms, "action": self.action, "from_dynos": self.from_dynos,
                "to_dynos": self.to_dynos, "reason": self.reason, "requests": self.requests,
                "p95_ms": self.p95_ms, "p95_target_ms": self.p95_target_ms,
                "capacity_per_dyno": self.capacity_per_dyno, "needed_dynos": self.needed_dynos,
                "min_dynos": self.min_dynos, "max_dynos": self.max_dynos, "pinned_at_max": self.pinned_at_max}


class Autoscaler:
    """One policy and its state. Rules, applied once per closed minute of the web process:

    * the count stays within ``[min_dynos, max_dynos]``: a count outside (the policy was just written)
      moves to the nearest bound at once -- the only step larger than one dyno;
    * up by one when the estimate needs more dynos and ``up_cooldown_min`` have passed since the last step;
    * down by one only after ``down_stable_min`` consecutive minutes in which the target was met and the
      estimate *with headroom* still needs fewer dynos, and ``down_cooldown_min`` after the last step;
    * pinned at max (the estimate needs more than ``max_dynos`` while running ``max_dynos``) notifies at
      most once every ``pinned_notify_every_min`` minutes.
    """

    def __init__(self, config: PolicyConfig, state: PolicyState | None = None) -> None:
        self.config = config
        self.state = state or PolicyState(dynos=config.current_dynos if config.current_dynos is not None
                                          else config.min_dynos)

    def observe(self, app: str, minute: Minute, params: AutoscaleParams) -> Decision | None:
        cfg, st = self.config, self.state
        if minute.process_type != cfg.process_type or minute.start_ms <= st.last_minute_ms:
            return None
        cur = st.dynos
        st.history.append((minute.start_ms, minute.requests, minute.p95_ms, cur))
        horizon_ms = minute.start_ms - params.history_min * WINDOW_MS
        st.history = [h for h in st.history if h[0] > horizon_ms]
        est = estimate(st.history, requests=minute.requests, p95_ms=minute.p95_ms, dynos=cur,
                       target_ms=cfg.p95_target_ms, params=params)
        lo, hi = cfg.min_dynos, cfg.max_dynos
        since_step_min = (math.inf if st.last_step_ms is None
                          else (minute.start_ms - st.last_step_ms) // WINDOW_MS)
        to, action = cur, "hold"
        if cur < lo:
            to, action, reason = lo, "up", "below min_dynos"
        elif cur > hi:
            to, action, reason = hi, "down", "above max_dynos"
        elif est.needed > cur:
            st.down_streak = 0
            if cur >= hi:
                reason = "at max_dynos"
            elif since_step_min < params.up_cooldown_min:
                reason = "up cooldown"
            else:
                to, action = cur + 1, "up"
                reason = "p95 above target" if est.breach else "throughput above capacity"
        elif min(max(est.needed_with_headroom, lo), hi) < cur and not est.breach:
            st.down_streak += 1
            if st.down_streak < params.down_stable_min:
                reason = f"headroom {st.down_streak}/{params.down_stable_min} min"
            elif since_step_min < params.down_cooldown_min:
                reason = "down cooldown"
            else:
                to, action, reason = cur - 1, "down", "sustained headroom"
                st.down_streak = 0
        else:
            st.down_streak = 0
            reason = "within target"
        pinned = est.needed > hi and to == hi
        notify_pinned = pinned and (st.pinned_notified_ms is None or minute.start_ms - st.pinned_notified_ms
                                    >= params.pinned_notify_every_min * WINDOW_MS)
        if notify_pinned:
            st.pinned_notified_ms = minute.start_ms
        if to != cur:
            st.dynos, st.last_step_ms = to, minute.start_ms
        st.last_minute_ms = minute.start_ms
        return Decision(app, cfg.process_type, minute.start_ms, action, cur, to, reason, minute.requests,
                        minute.p95_ms, cfg.p95_target_ms, est.capacity_per_dyno, est.needed, lo, hi, pinned,
                        notify_pinned)

    def reconfigure(self, config: PolicyConfig) -> None:
        """A new definition keeps the history; an explicit ``current_dynos`` overrides the known count
        (someone scaled by hand)."""
        if config.current_dynos is not None and config.current_dynos != self.config.current_dynos:
            self.state.dynos = config.current_dynos
        self.config = config

    def to_record(self) -> dict[str, Any]:
        return {"cfg": self.config.to_record(), "st": self.state.to_record()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Autoscaler":
        return cls(PolicyConfig.from_record(rec["cfg"]), PolicyState.from_record(rec["st"]))

    def public(self) -> dict[str, Any]:
        st = self.state
        return {**self.config.public(),
                "state": {"dynos": st.dynos, "last_minute_ms": st.last_minute_ms, "last_step_ms": st.last_step_ms,
                          "down_streak_min": st.down_streak, "pinned_notified_ms": st.pinned_notified_ms}}


class AppPolicies:
    """Autoscaling policies of one app (one per process type), stored as one table value."""

    VERSION = 1

    def __init__(self, policies: dict[str, Autoscaler] | None = None) -> None:
        self.policies: dict[str, Autoscaler] = policies or {}

    def observe(self, minute: Minute, params: AutoscaleParams) -> Decision | None:
        a = self.policies.get(minute.process_type)
        return None if a is None else a.observe(minute.app, minute, params)

    def put(self, config: PolicyConfig) -> Autoscaler:
        a = self.policies.get(config.process_type)
        if a is None:
            a = self.policies[config.process_type] = Autoscaler(config)
        else:
            a.reconfigure(config)
        return a

    def to_bytes(self) -> bytes:
        return orjson.dumps({"v": self.VERSION, "policies": [a.to_record() for a in self.policies.values()]})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "AppPolicies":
        rec = orjson.loads(raw)
        if rec.get("v") != cls.VERSION:
            raise ValueError(f"unsupported policies record version {rec.get('v')!r}")
        policies = [Autoscaler.from_record(r) for r in rec["policies"]]
        return cls({a.config.process_type: a for a in policies})


# --- configuration commands ------------------------------------------------------------------------------

MONITOR_CREATE = "monitor.create"
MONITOR_REPLACE = "monitor.replace"
MONITOR_DELETE = "monitor.delete"
POLICY_PUT = "policy.put"
POLICY_DELETE = "policy.delete"
MONITOR_OPS = (MONITOR_CREATE, MONITOR_REPLACE, MONITOR_DELETE)
POLICY_OPS = (POLICY_PUT, POLICY_DELETE)


@dataclass(frozen=True, slots=True)
class Command:
    """A configuration change, produced by the web API to the commands topic (key = app) and applied by
    the agent that owns the app's partition (see agents/alerts.py for why)."""

    id: str
    op: str
    app: str
    monitor: MonitorConfig | None = None
    monitor_id: str = ""
    policy: PolicyConfig | None = None
    process_type: str = ""

    def to_bytes(self) -> bytes:
        rec: dict[str, Any] = {"v": 1, "id": self.id, "op": self.op, "app": self.app}
        if self.monitor is not None:
            rec["monitor"] = self.monitor.to_record()
        if self.monitor_id:
            rec["monitor_id"] = self.monitor_id
        if self.policy is not None:
            rec["policy"] = self.policy.to_record()
        if self.process_type:
            rec["process_type"] = self.process_type
        return orjson.dumps(rec)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Command":
        """ValueError when the message is not a valid command (it is then skipped and counted)."""
        try:
            rec = orjson.loads(raw)
            op = rec["op"]
            if rec.get("v") != 1 or op not in MONITOR_OPS + POLICY_OPS or not models.valid_app(rec["app"]):
                raise ValueError(f"bad command header {rec.get('v')!r} {op!r}")
            monitor = MonitorConfig.from_record(rec["monitor"]) if "monitor" in rec else None
            policy = PolicyConfig.from_record(rec["policy"]) if "policy" in rec else None
            cmd = cls(str(rec["id"]), op, rec["app"], monitor, str(rec.get("monitor_id", "")), policy,
                      str(rec.get("process_type", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed command: {exc!r}") from None
        if op in (MONITOR_CREATE, MONITOR_REPLACE) and monitor is None:
            raise ValueError(f"{op} without monitor")
        if op == MONITOR_DELETE and not cmd.monitor_id:
            raise ValueError(f"{op} without monitor_id")
        if op == POLICY_PUT and policy is None:
            raise ValueError(f"{op} without policy")
        if op == POLICY_DELETE and not cmd.process_type:
            raise ValueError(f"{op} without process_type")
        return cmd


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying a command did, as the HTTP status and body the API answers with."""

    status: int
    body: dict[str, Any] | None = None


def apply_monitor_command(doc: AppMonitors, cmd: Command, *, max_monitors: int) -> Outcome:
    """Create/replace/delete a monitor in ``doc``. Idempotent: a redelivered command has the same effect."""
    if cmd.op == MONITOR_CREATE:
        assert cmd.monitor is not None
        if cmd.monitor.id in doc.monitors:  # redelivered create
            return Outcome(201, doc.monitors[cmd.monitor.id].public())
        if len(doc.monitors) >= max_monitors:
            return Outcome(409, {"error": {"code": "too_many_monitors",
                                           "message": f"an app has at most {max_monitors} monitors"}})
        return Outcome(201, doc.put(cmd.monitor).public())
    if cmd.op == MONITOR_REPLACE:
        assert cmd.monitor is not None
        old = doc.monitors.get(cmd.monitor.id)
        if old is None:
            return _not_found("monitor", cmd.monitor.id)
        if (old.config.metric, old.config.process_type) != (cmd.monitor.metric, cmd.monitor.process_type):
            return Outcome(400, {"error": {"code": "immutable_field",
                                           "message": "metric and process_type cannot change; create a new "
                                                      "monitor instead"}})
        return Outcome(200, doc.put(cmd.monitor).public())
    if doc.monitors.pop(cmd.monitor_id, None) is None:
        return _not_found("monitor", cmd.monitor_id)
    return Outcome(204)


def apply_policy_command(doc: AppPolicies, cmd: Command) -> Outcome:
    if cmd.op == POLICY_PUT:
        assert cmd.policy is not None
        created = cmd.policy.process_type not in doc.policies
        return Outcome(201 if created else 200, doc.put(cmd.policy).public())
    if doc.policies.pop(cmd.process_type, None) is None:
        return _not_found("autoscaling policy", cmd.process_type)
    return Outcome(204)


def _not_found(what: str, name: str) -> Outcome:
    return Outcome(404, {"error": {"code": "not_found", "message": f"no {what} {name!r}"}})


__all__ = ["AlertEvent", "AppMonitors", "AppPolicies", "Autoscaler", "AutoscaleParams", "Command", "Decision",
           "Estimate", "Minute", "Monitor", "MonitorConfig", "MonitorState", "Outcome", "PolicyConfig",
           "PolicyState", "Targets", "ValidationError", "Webhook", "apply_monitor_command",
           "apply_policy_command", "estimate", "parse_monitor", "parse_policy"]
