"""Configuration changes: the :class:`Command` wire format (the ``policy-commands`` topic) and what applying
one to an app's monitors or policies did (:class:`Outcome`). How an outcome is answered over HTTP is the
API's business (app/api/policies.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from app import models
from app.alerting.autoscale import AppPolicies, PolicyConfig
from app.alerting.monitors import AppMonitors, MonitorConfig

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
    def from_bytes(cls, raw: bytes) -> Command:
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


class Result(enum.StrEnum):
    CREATED = "created"
    """Also the answer to a redelivered create: the monitor it made."""
    REPLACED = "replaced"
    DELETED = "deleted"
    NOT_FOUND = "not_found"
    LIMIT_REACHED = "limit_reached"
    """The app has ``max_monitors`` monitors already."""
    IMMUTABLE = "immutable"
    """A replace tried to change what a monitor watches (its metric or process type)."""


APPLIED = (Result.CREATED, Result.REPLACED, Result.DELETED)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying a command did: the monitor or policy as its writer sees it (``value``, when created or
    replaced), or why nothing changed (``message``)."""

    result: Result
    value: dict[str, Any] | None = None
    message: str = ""

    @property
    def applied(self) -> bool:
        """The command changed (or, redelivered, had already changed) the app's document."""
        return self.result in APPLIED


def apply_monitor_command(doc: AppMonitors, cmd: Command, *, max_monitors: int) -> Outcome:
    """Create/replace/delete a monitor in ``doc``. Idempotent: a redelivered command has the same effect."""
    if cmd.op == MONITOR_CREATE:
        assert cmd.monitor is not None
        if cmd.monitor.id in doc.monitors:  # redelivered create
            return Outcome(Result.CREATED, doc.monitors[cmd.monitor.id].public())
        if len(doc.monitors) >= max_monitors:
            return Outcome(Result.LIMIT_REACHED, message=f"an app has at most {max_monitors} monitors")
        return Outcome(Result.CREATED, doc.put(cmd.monitor).public())
    if cmd.op == MONITOR_REPLACE:
        assert cmd.monitor is not None
        old = doc.monitors.get(cmd.monitor.id)
        if old is None:
            return _not_found("monitor", cmd.monitor.id)
        if (old.config.metric, old.config.process_type) != (cmd.monitor.metric, cmd.monitor.process_type):
            return Outcome(Result.IMMUTABLE,
                           message="metric and process_type cannot change; create a new monitor instead")
        return Outcome(Result.REPLACED, doc.put(cmd.monitor).public())
    if doc.monitors.pop(cmd.monitor_id, None) is None:
        return _not_found("monitor", cmd.monitor_id)
    return Outcome(Result.DELETED)


def apply_policy_command(doc: AppPolicies, cmd: Command) -> Outcome:
    """Put (create or replace) or delete the policy of a process type in ``doc``; idempotent."""
    if cmd.op == POLICY_PUT:
        assert cmd.policy is not None
        created = cmd.policy.process_type not in doc.policies
        return Outcome(Result.CREATED if created else Result.REPLACED, doc.put(cmd.policy).public())
    if doc.policies.pop(cmd.process_type, None) is None:
        return _not_found("autoscaling policy", cmd.process_type)
    return Outcome(Result.DELETED)


def _not_found(what: str, name: str) -> Outcome:
    return Outcome(Result.NOT_FOUND, message=f"no {what} {name!r}")
