"""``migration status`` from what Kafka and the stores report (app/migration/cli.py :func:`describe`), and
the commands' dispatch."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from app.migration import cli
from app.migration import state as sm
from app.migration.cli import StoreView, WriterView, describe
from app.settings import STORES, Settings
from app.storage.backends import BACKENDS, backend
from app.writer import writer_settings

S = Settings.of(partitions=4)
T0 = 1_800_000_000_000
A, B = "dynamodb:minutely-metrics", "cassandra:minutely"
DUAL = sm.start(sm.initial(S), S, "cassandra", backfill=False, now_ms=T0)
HOME = WriterView(A, "minutely", members=2, consumed=True, lag=3)


def lines(writers: list[WriterView], stores: dict[str, StoreView], *, now_ms: int = T0 + 600_000) -> str:
    return "\n".join(describe(DUAL, S, writers, stores, now_ms=now_ms))


def test_a_writer_that_never_ran_is_said_to_have_never_run_not_to_lag_zero() -> None:
    never = WriterView(B, sm.writer_group(S, B), members=0, consumed=False, lag=0)  # offsets only from `start`
    out = lines([HOME, never], {A: StoreView(A, T0 + 540_000, 4, T0 + 599_000), B: StoreView(B, None, 0)})
    writer = next(line for line in out.splitlines() if line.startswith("writer:") and B in line)
    assert "never ran" in writer and "lag" not in writer and f"writer --store {B}" in writer
    assert "running (2 members), lag 3 records" in out
    assert f"store:    {B:<32} holds nothing yet" in out
    assert "both stores hold" not in out and f"not yet: {B} holds no minute since" in out


def test_a_writer_that_stopped_is_not_running_with_its_lag() -> None:
    gone = WriterView(B, sm.writer_group(S, B), members=0, consumed=True, lag=120)
    out = lines([HOME, gone], {A: StoreView(A, T0 + 540_000, 4), B: StoreView(B, T0 + 120_000, 4)})
    assert "not running (no member in the group); 120 records behind" in out


def test_an_unreachable_store_says_so_and_claims_nothing_in_sync() -> None:
    down = StoreView(B, None, 0, error="Cassandra at 127.0.0.1:9042 did not answer: refused")
    out = lines([HOME], {A: StoreView(A, T0 + 540_000, 4), B: down})
    assert f"store:    {B:<32} unreachable: Cassandra at 127.0.0.1:9042" in out
    assert "both stores hold" not in out and "cannot be read" in out


def test_a_target_behind_the_source_shows_how_far_and_only_the_range_both_hold() -> None:
    out = lines([HOME], {A: StoreView(A, T0 + 540_000, 4), B: StoreView(B, T0 + 300_000, 4)})
    assert f"from {sm.iso(DUAL.both_since_ms)} to {sm.iso(T0 + 300_000)}" in out
    assert f"{B} is 240 s behind {A}" in out and "finish refused before then" in out


def view(spec: str, through_ms: dict[int, int]) -> StoreView:
    return StoreView(spec, min(through_ms.values(), default=None), len(through_ms), T0, watermarks=through_ms)


def test_a_partition_the_other_store_has_minutes_in_and_this_one_lacks_is_no_watermark() -> None:
    out = lines([HOME], {A: view(A, dict.fromkeys(range(4), T0 + 540_000)),
                         B: view(B, dict.fromkeys(range(3), T0 + 540_000))})
    assert "watermarks in 3 of 4 partitions only: none for partition 3" in out and "both stores hold" not in out


def test_a_partition_no_store_has_minutes_in_is_idle_not_missing() -> None:
    """Three apps hash to two of four partitions: the other two never get a minute, in either store."""
    out = lines([HOME], {A: view(A, {0: T0 + 540_000, 2: T0 + 540_000}),
                         B: view(B, {0: T0 + 300_000, 2: T0 + 360_000})})
    assert f"store:    {A:<32} stored through {sm.iso(T0 + 540_000)}" in out
    assert "2 of 4 partitions have had no minute yet" in out
    assert f"to {sm.iso(T0 + 300_000)}" in out and f"{B} is 240 s behind {A}" in out


def test_an_unknown_command_is_refused_before_anything_is_read_or_published(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command is its own click command: a misspelt one is a usage error, never the nearest step."""
    async def never(*_: object) -> None:
        raise AssertionError("read or published")

    monkeypatch.setattr(cli, "read_state", never)
    monkeypatch.setattr(cli, "publish", never)
    result = CliRunner().invoke(cli.migration, ["finsh", "--force"])
    assert result.exit_code == 2 and "No such command 'finsh'" in result.output
    assert sorted(cli.migration.commands) == ["copy-tokens", "cutover", "finish", "rollback", "shadow", "start",
                                              "status", "verify"]


def test_each_command_runs_its_own_transition(monkeypatch: pytest.MonkeyPatch) -> None:
    published: list[sm.MigrationState] = []

    async def state(_: Settings) -> sm.MigrationState:
        return replace(DUAL, phase="shadow", shadow_pct=100)

    async def publish(_: Settings, st: sm.MigrationState) -> None:
        published.append(st)

    monkeypatch.setattr(cli, "read_state", state)
    monkeypatch.setattr(cli, "publish", publish)
    assert CliRunner().invoke(cli.migration, ["cutover", "10"]).exit_code == 0
    assert CliRunner().invoke(cli.migration, ["rollback"]).exit_code == 0
    assert CliRunner().invoke(cli.migration, ["shadow", "50", "--aa"]).exit_code == 0
    assert [(s.phase, s.shadow_pct, s.cutover_pct, s.aa) for s in published] == [
        ("cutover", 100, 10, False), ("dual_write", 0, 0, False), ("shadow", 50, 0, True)]
    refused = CliRunner().invoke(cli.migration, ["finish"])  # from shadow: refused, with the reason, exit 2
    assert refused.exit_code == 2 and refused.stderr.startswith("error: ") and len(published) == 3
    assert CliRunner().invoke(cli.migration, ["cutover", "ten"]).exit_code == 2


def test_the_registry_names_every_store_and_its_namespace() -> None:
    assert tuple(BACKENDS) == STORES
    dynamodb = backend("dynamodb")
    assert dynamodb.namespace(S) == "minutely-metrics" and dynamodb.namespace_env == "METRICS_TABLE_NAME"
    assert backend("cassandra").settings_for(S, "ks2").cassandra.keyspace == "ks2"
    assert sm.home_spec(backend("cassandra").settings_for(S)) == "cassandra:minutely"


def test_a_writers_settings_name_its_store_and_namespace_through_the_registry() -> None:
    w = writer_settings(S, "cassandra:ks2")
    assert (w.storage.backend, w.cassandra.keyspace, w.dynamodb.table_name) == ("cassandra", "ks2",
                                                                               S.dynamodb.table_name)
    assert w.kafka.app_id == "minutely-writer-cassandra-ks2"
    assert w.windows.data_dir.endswith("minutely-writer-cassandra-ks2")
