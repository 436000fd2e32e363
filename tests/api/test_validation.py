"""Validation of monitor and policy definitions (app/api/validation.py): every refusal names its field."""

from __future__ import annotations

from typing import Any

import pytest

from app.alerting.autoscale import PolicyConfig
from app.alerting.monitors import MonitorConfig
from app.api.validation import ValidationError, parse_monitor, parse_policy, valid_monitor_id

MID = "mon_000000000001"


# --- monitors ----------------------------------------------------------------------------------------------------

VALID: dict[str, Any] = {"metric": "LATENCY", "threshold": 500, "sensitivity_min": 5, "notify_every_min": 60}


@pytest.mark.parametrize("change, field", [
    ({"metric": "CPU"}, "metric"),
    ({"threshold": 49}, "threshold"),
    ({"threshold": "500"}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"metric": "ERROR_RATE", "threshold": 0.001}, "threshold"),
    ({"metric": "ERROR_RATE", "threshold": 1.5}, "threshold"),
    ({"sensitivity_min": 3}, "sensitivity_min"),
    ({"sensitivity_min": 5.0}, "sensitivity_min"),
    ({"notify_every_min": 30}, "notify_every_min"),
    ({"process_type": "web 1"}, "process_type"),
    ({"email": ["not-an-address"]}, "email"),
    ({"email": "ops@example.com"}, "email"),
    ({"email": ["a@example.com\r\nBcc: x@example.com"]}, "email"),
    ({"email": ["ops@example.com\n"]}, "email"),  # "$" accepted it: a blank line ending the headers
    ({"email": ["ops@example.com\r\n"]}, "email"),
    ({"email": ["öps@example.com"]}, "email"),
    ({"email": ["ops team@example.com"]}, "email"),
    ({"email": ["\"ops\"@example.com"]}, "email"),
    ({"webhooks": [{"url": "ftp://example.com/x", "secret": "s" * 16}]}, "webhooks.url"),
    ({"webhooks": [{"url": "https://example.com/x", "secret": "short"}]}, "webhooks.secret"),
    ({"webhooks": [{"url": "https://example.com/x"}]}, "secret"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_definitions_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_monitor({**VALID, **change}, monitor_id=MID)
    assert info.value.field == field


def test_missing_fields_and_defaults() -> None:
    with pytest.raises(ValidationError) as info:
        parse_monitor({"metric": "LATENCY"}, monitor_id=MID)
    assert info.value.field == "notify_every_min"
    cfg = parse_monitor({**VALID, "metric": "ERROR_RATE", "threshold": 0.005,
                         "email": ["ops@example.com", "ops@example.com"],
                         "webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": "s" * 16}]}, monitor_id=MID)
    assert cfg.process_type == "web" and cfg.targets.email == ("ops@example.com",)
    assert cfg.public()["webhooks"] == [{"url": "http://127.0.0.1:9/hook", "secret_set": True}]
    assert MonitorConfig.from_record(cfg.to_record()) == cfg


@pytest.mark.parametrize("address", ["ops@example.com", "first.last+alerts@mail.example.co.uk",
                                     "o'brien_ops-1@example.io", "x!#$%&*/=?^`{|}~@example.com"])
def test_ascii_addresses_are_accepted(address: str) -> None:
    assert parse_monitor({**VALID, "email": [address]}, monitor_id=MID).targets.email == (address,)


# --- autoscaling policies --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"min_dynos": 0, "max_dynos": 3, "p95_target_ms": 300}, "min_dynos"),
    ({"min_dynos": 3, "max_dynos": 2, "p95_target_ms": 300}, "max_dynos"),
    ({"min_dynos": 1, "max_dynos": 2000, "p95_target_ms": 300}, "max_dynos"),
    ({"min_dynos": 1, "max_dynos": 3, "p95_target_ms": 10}, "p95_target_ms"),
    ({"min_dynos": 1, "max_dynos": 3}, "p95_target_ms"),
    ({"min_dynos": "1", "max_dynos": 3, "p95_target_ms": 300}, "min_dynos"),
    ({"min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300, "current_dynos": -1}, "current_dynos"),
    ({"min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300, "step": 2}, "step"),
])
def test_invalid_policies_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_policy(body, process_type="web")
    assert info.value.field == field


def test_policies_are_for_web_only() -> None:
    with pytest.raises(ValidationError) as info:
        parse_policy({"min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300}, process_type="worker")
    assert info.value.field == "process_type"
    cfg = parse_policy({"min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300, "current_dynos": 2,
                        "email": ["ops@example.com"]}, process_type="web")
    assert PolicyConfig.from_record(cfg.to_record()) == cfg and cfg.current_dynos == 2


def test_monitor_ids_are_the_apis_own() -> None:
    assert valid_monitor_id(MID) and not valid_monitor_id("not-an-id") and not valid_monitor_id(MID + "\n")
