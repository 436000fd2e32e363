"""Validation of monitor and policy definitions sent to the API: the accepted values of each field, and
:class:`ValidationError` (HTTP 400) naming the field at fault."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from app import models
from app.alerting.autoscale import PolicyConfig
from app.alerting.monitors import ERROR_RATE, LATENCY, METRICS, MonitorConfig
from app.alerting.targets import Targets, Webhook

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
MONITOR_FIELDS = {"process_type", "metric", "threshold", "sensitivity_min", "notify_every_min", "email",
                  "webhooks"}
POLICY_FIELDS = {"min_dynos", "max_dynos", "p95_target_ms", "current_dynos", "email", "webhooks"}

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
"""Matched whole (``fullmatch``: ``$`` would accept a trailing newline, which ends the mail's headers).
The local part is RFC 5322 ``atext`` and dots: ASCII, no space, quote, comma, semicolon or angle bracket."""
_MONITOR_ID = re.compile(r"mon_[0-9a-f]{12}")


class ValidationError(ValueError):
    """A monitor or policy definition is invalid; ``field`` names the offending field (HTTP 400)."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


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


def valid_monitor_id(monitor_id: str) -> bool:
    return bool(_MONITOR_ID.fullmatch(monitor_id))


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


def parse_policy(body: Any, *, process_type: str) -> PolicyConfig:
    """A policy definition from an API body; raises :class:`ValidationError` with the field at fault."""
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

