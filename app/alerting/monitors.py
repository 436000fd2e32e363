"""Threshold monitors: a state machine per monitor over the closed minutes of its process type.

``LATENCY`` (p95) or ``ERROR_RATE`` at or over the threshold for ``sensitivity_min`` consecutive minutes
fires, reminders go at most every ``notify_every_min``, and the first minute under resolves; every transition
is an :class:`AlertEvent`. The accepted values are checked by app/api/validation.py.
Reference: docs/alerting.md#monitors
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.alerting.minute import WINDOW_MS, Minute
from app.alerting.targets import Targets

LATENCY = "LATENCY"
ERROR_RATE = "ERROR_RATE"
METRICS = (LATENCY, ERROR_RATE)

OK = "ok"
FIRING = "firing"
RESOLVED = "resolved"
MONITOR_DELETED = "monitor_deleted"
"""``reason`` of the ``resolved`` event of a monitor deleted while firing."""


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
    def from_record(cls, rec: Mapping[str, Any]) -> MonitorConfig:
        return cls(rec["id"], rec["process_type"], rec["metric"], float(rec["threshold"]),
                   int(rec["sensitivity_min"]), int(rec["notify_every_min"]), Targets.from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "process_type": self.process_type, "metric": self.metric,
                "threshold": self.threshold, "sensitivity_min": self.sensitivity_min,
                "notify_every_min": self.notify_every_min, **self.targets.public()}


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
    def from_record(cls, rec: Mapping[str, Any]) -> MonitorState:
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
    def from_record(cls, rec: Mapping[str, Any]) -> Monitor:
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
    def from_bytes(cls, raw: bytes) -> AppMonitors:
        rec = orjson.loads(raw)
        if rec.get("v") != cls.VERSION:
            raise ValueError(f"unsupported monitors record version {rec.get('v')!r}")
        monitors = [Monitor.from_record(r) for r in rec["monitors"]]
        return cls({m.config.id: m for m in monitors})

