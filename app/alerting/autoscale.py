"""Web-dyno autoscaling: the capacity model (:func:`estimate`) and its rules (:class:`Autoscaler`).

One policy per app for its ``web`` process: ``min_dynos`` >= 1, ``max_dynos``, a desired p95. Every closed
minute of that process is one :class:`Decision` (up, down or hold); the agent (agents/autoscale.py)
publishes it and calls the platform's formation API when the count changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from app.alerting.minute import WINDOW_MS, Minute
from app.alerting.targets import Targets
from app.errors import ConfigError
from app.settings import PREFIX, AutoscaleSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoscaleParams:
    """The model's constants. They have no defaults of their own: each is the setting
    ``settings.autoscale.<name>`` (``METRICS_AUTOSCALE_<NAME>``, explained in app/settings.py), read by
    :meth:`from_settings`, and checked here, in one place."""

    history_min: int
    min_requests: int
    up_cooldown_min: int
    down_cooldown_min: int
    down_stable_min: int
    down_headroom: float
    pinned_notify_every_min: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "down_headroom":
                if not 0 <= value < 1:
                    raise ConfigError(f"autoscale_down_headroom must be within [0, 1), got {value!r}",
                                      action=f"set {PREFIX}AUTOSCALE_DOWN_HEADROOM")
            elif value < 1:
                raise ConfigError(f"autoscale_{f.name} must be >= 1 (steps are at least a minute apart), got "
                                  f"{value!r}", action=f"set {PREFIX}AUTOSCALE_{f.name.upper()}")

    @classmethod
    def from_settings(cls, autoscale: AutoscaleSettings) -> AutoscaleParams:
        """ConfigError when the settings make no sense."""
        return cls(**{f.name: getattr(autoscale, f.name) for f in fields(cls)})


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
    def from_record(cls, rec: Mapping[str, Any]) -> PolicyConfig:
        return cls(rec["process_type"], int(rec["min_dynos"]), int(rec["max_dynos"]),
                   float(rec["p95_target_ms"]), rec.get("current_dynos"), Targets.from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"process_type": self.process_type, "min_dynos": self.min_dynos, "max_dynos": self.max_dynos,
                "p95_target_ms": self.p95_target_ms, "current_dynos": self.current_dynos,
                **self.targets.public()}


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
    def from_record(cls, rec: Mapping[str, Any]) -> PolicyState:
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
    def from_record(cls, rec: Mapping[str, Any]) -> Autoscaler:
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
    def from_bytes(cls, raw: bytes) -> AppPolicies:
        rec = orjson.loads(raw)
        if rec.get("v") != cls.VERSION:
            raise ValueError(f"unsupported policies record version {rec.get('v')!r}")
        policies = [Autoscaler.from_record(r) for r in rec["policies"]]
        return cls({a.config.process_type: a for a in policies})

