"""Configuration commands (app/alerting/commands.py): the wire format, idempotent application and the
outcomes, and webhook secrets at rest in commands and table values."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from app.alerting.autoscale import AppPolicies, PolicyConfig
from app.alerting.commands import (
    MONITOR_CREATE,
    MONITOR_DELETE,
    MONITOR_REPLACE,
    POLICY_DELETE,
    POLICY_PUT,
    Command,
    Result,
    apply_monitor_command,
    apply_policy_command,
)
from app.alerting.monitors import ERROR_RATE, LATENCY, AppMonitors, MonitorConfig
from app.alerting.targets import Targets
from app.sealing import SealedSecret, SecretBox, key_id, use_secrets_key
from tests.alerting.secrets import HOOKS, KEY, PLAIN

MID = "mon_000000000001"


def latency(threshold: float = 500, sensitivity: int = 5, every: int = 5, *, mid: str = MID,
            targets: Targets | None = None) -> MonitorConfig:
    return MonitorConfig(mid, "web", LATENCY, threshold, sensitivity, every, targets or Targets())


def test_commands_round_trip_and_apply_idempotently() -> None:
    doc = AppMonitors()
    create = Command("c1", MONITOR_CREATE, "shop", monitor=latency())
    assert Command.from_bytes(create.to_bytes()) == create
    assert apply_monitor_command(doc, create, max_monitors=2).result is Result.CREATED
    assert apply_monitor_command(doc, create, max_monitors=2).result is Result.CREATED  # redelivered: same monitor
    assert list(doc.monitors) == [MID]
    other = Command("c2", MONITOR_CREATE, "shop", monitor=latency(mid="mon_000000000002"))
    third = Command("c3", MONITOR_CREATE, "shop", monitor=latency(mid="mon_000000000003"))
    assert apply_monitor_command(doc, other, max_monitors=2).result is Result.CREATED
    assert apply_monitor_command(doc, third, max_monitors=2).result is Result.LIMIT_REACHED
    changed = Command("c4", MONITOR_REPLACE, "shop", monitor=MonitorConfig(MID, "web", ERROR_RATE, 0.1, 1, 5))
    assert apply_monitor_command(doc, changed, max_monitors=2).result is Result.IMMUTABLE
    unknown = Command("c5", MONITOR_REPLACE, "shop", monitor=latency(mid="mon_00000000000f"))
    assert apply_monitor_command(doc, unknown, max_monitors=2).result is Result.NOT_FOUND
    delete = Command("c6", MONITOR_DELETE, "shop", monitor_id=MID)
    assert apply_monitor_command(doc, delete, max_monitors=2).result is Result.DELETED
    assert apply_monitor_command(doc, delete, max_monitors=2).result is Result.NOT_FOUND
    for bad in (b"{", b'{"v":1,"op":"monitor.create","app":"shop","id":"x"}', b'{"v":2}', b"[]"):
        with pytest.raises(ValueError):
            Command.from_bytes(bad)


def test_outcomes_carry_the_value_or_the_reason() -> None:
    doc = AppMonitors()
    created = apply_monitor_command(doc, Command("c1", MONITOR_CREATE, "shop", monitor=latency()), max_monitors=1)
    assert created.applied and created.value == doc.monitors[MID].public() and created.message == ""
    full = apply_monitor_command(doc, Command("c2", MONITOR_CREATE, "shop", monitor=latency(mid="mon_000000000002")),
                                 max_monitors=1)
    assert not full.applied and full.value is None and full.message == "an app has at most 1 monitors"
    replaced = apply_monitor_command(doc, Command("c3", MONITOR_REPLACE, "shop", monitor=latency(900)),
                                     max_monitors=1)
    assert replaced.result is Result.REPLACED and replaced.value is not None and replaced.value["threshold"] == 900


def test_policy_commands_create_replace_and_delete() -> None:
    doc = AppPolicies()
    put = Command("p1", POLICY_PUT, "shop", policy=PolicyConfig("web", 1, 4, 300.0))
    assert Command.from_bytes(put.to_bytes()) == put
    assert apply_policy_command(doc, put).result is Result.CREATED
    again = apply_policy_command(doc, Command("p2", POLICY_PUT, "shop", policy=PolicyConfig("web", 1, 6, 300.0)))
    assert again.result is Result.REPLACED and again.value is not None and again.value["max_dynos"] == 6
    delete = Command("p3", POLICY_DELETE, "shop", process_type="web")
    assert apply_policy_command(doc, delete).result is Result.DELETED
    gone = apply_policy_command(doc, delete)
    assert gone.result is Result.NOT_FOUND and gone.message == "no autoscaling policy 'web'"


# --- webhook secrets at rest (METRICS_SECRETS_KEY) ------------------------------------------------------------



def test_with_a_key_commands_and_table_values_never_hold_the_plaintext(keyed: SecretBox) -> None:
    raw = Command("c1", MONITOR_CREATE, "shop", monitor=latency(targets=HOOKS)).to_bytes()  # policy-commands
    assert PLAIN.encode() not in raw and b'"secret_enc"' in raw and b'"secret":' not in raw
    cmd = Command.from_bytes(raw)
    assert cmd.monitor is not None
    sealed = cmd.monitor.targets.webhooks[0].secret
    assert isinstance(sealed, SealedSecret) and sealed.key_id == key_id(KEY) and keyed.open(sealed) == PLAIN
    doc = AppMonitors()
    assert apply_monitor_command(doc, cmd, max_monitors=2).result is Result.CREATED
    stored = doc.to_bytes()  # the monitors changelog and RocksDB
    assert PLAIN.encode() not in stored and b'"secret":' not in stored
    assert AppMonitors.from_bytes(stored).to_bytes() == stored  # sealed once, not re-encrypted every minute
    assert PLAIN not in orjson.dumps(doc.monitors[MID].public()).decode()
    policy = PolicyConfig("web", 1, 4, 300.0, targets=HOOKS)  # autoscaling policies' webhooks alike
    policies = AppPolicies()
    policies.put(policy)
    for raw in (policies.to_bytes(), Command("c2", "policy.put", "shop", policy=policy).to_bytes()):
        assert PLAIN.encode() not in raw and b'"secret_enc"' in raw


def test_old_plaintext_monitor_records_still_read_and_are_sealed_when_written_again() -> None:
    old_cmd = Command("c1", MONITOR_CREATE, "shop", monitor=latency(targets=HOOKS)).to_bytes()
    doc = AppMonitors()
    doc.put(latency(targets=HOOKS))
    old_doc = doc.to_bytes()
    assert PLAIN.encode() in old_doc and PLAIN.encode() in old_cmd  # no key: stored as before
    box = use_secrets_key(KEY)
    try:
        cmd = Command.from_bytes(old_cmd)
        assert cmd.monitor is not None and box.open(cmd.monitor.targets.webhooks[0].secret) == PLAIN
        back = AppMonitors.from_bytes(old_doc)
        assert box.open(back.monitors[MID].config.targets.webhooks[0].secret) == PLAIN
        assert PLAIN.encode() not in back.to_bytes()
    finally:
        use_secrets_key("")


# --- stored and produced records, byte for byte ---------------------------------------------------------------

HOOK = '"webhooks":[{"url":"https://hooks.example.com/x","secret":"whsec_0123456789abcdef"}]'
MONITOR_REC = ('{"id":"mon_000000000001","process_type":"web","metric":"LATENCY","threshold":500.0,"sensitivity_min":5,'
               '"notify_every_min":60,"email":["ops@example.com"],' + HOOK + '}')
POLICY_REC = ('{"process_type":"web","min_dynos":1,"max_dynos":4,"p95_target_ms":300.0,"current_dynos":2,'
              '"email":["ops@example.com"],' + HOOK + '}')
RECORDS = {
    "monitors table": '{"v":1,"monitors":[{"cfg":' + MONITOR_REC + ',"st":{"status":"firing","streak":5,'
                      '"last_minute_ms":1764000300000,"firing_since_ms":1764000240000,'
                      '"last_notified_ms":1764000240000,"last_value":800.0}}]}',
    "autoscale table": '{"v":1,"policies":[{"cfg":' + POLICY_REC + ',"st":{"dynos":4,"last_minute_ms":1764000120000,'
                       '"last_step_ms":1764000120000,"down_streak":0,"pinned_notified_ms":null,"history":'
                       '[[1764000000000,200,250.0,2],[1764000060000,300,350.0,2],[1764000120000,400,450.0,3]]}}]}',
    "monitor.create": '{"v":1,"id":"c1","op":"monitor.create","app":"shop","monitor":' + MONITOR_REC + '}',
    "monitor.delete": '{"v":1,"id":"c2","op":"monitor.delete","app":"shop","monitor_id":"mon_000000000001"}',
    "policy.put": '{"v":1,"id":"c3","op":"policy.put","app":"shop","policy":' + POLICY_REC + '}',
    "policy.delete": '{"v":1,"id":"c4","op":"policy.delete","app":"shop","process_type":"web"}',
}
"""Written by the code before app/alerting existed (tables/monitors.py): changelogs, RocksDB and the
policy-commands topic hold such records, so they must decode, and encode again to the same bytes."""


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_records_written_before_keep_their_bytes(kind: str) -> None:
    raw = RECORDS[kind].encode()
    decoders: dict[str, Callable[[bytes], AppMonitors | AppPolicies | Command]] = {
        "monitors table": AppMonitors.from_bytes, "autoscale table": AppPolicies.from_bytes}
    assert decoders.get(kind, Command.from_bytes)(raw).to_bytes() == raw
