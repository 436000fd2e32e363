"""The migration's phases and what each one makes processes do (app/migration/state.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.errors import ConfigError
from app.migration import state as sm
from app.migration.state import MigrationError, MigrationState
from app.settings import Settings

S = Settings.of(store="cassandra")
T0 = 1_800_000_000_000
A, B = "cassandra:minutely", "dynamodb:minutely-metrics"


def walk() -> list[MigrationState]:
    st = sm.initial(S)
    out = [st]
    st = sm.start(st, S, "dynamodb", backfill=False, now_ms=T0 + 30_000)
    out.append(st)
    st = sm.shadow(st, 10, aa=False, now_ms=T0 + 60_000)
    out.append(st)
    st = sm.cutover(st, 50, now_ms=T0 + 120_000)
    out.append(st)
    return out


def test_the_phases_in_order_and_what_each_writes_and_serves() -> None:
    single, dual, shadow, cutover = walk()
    assert single.label == f"single({A})" and single.writes == (A,) and single.serving("x") == A
    assert dual.writes == (A, B) and dual.serving("x") == A and dual.shadow("x") is None
    assert dual.both_since_ms == T0  # the minute under way at start is the first in both
    assert [st.version for st in (single, dual, shadow, cutover)] == [0, 1, 2, 3]
    apps = [f"app-{i}" for i in range(2000)]
    shadowed = [a for a in apps if shadow.shadow(a) == B]
    assert 150 <= len(shadowed) <= 250 and all(shadow.serving(a) == A for a in apps)
    served_b = {a for a in apps if cutover.serving(a, T0 // 1000) == B}
    assert 900 <= len(served_b) <= 1100
    # The shadowed apps are the first cut over; a cut-over app's shadow is the old store.
    assert set(shadowed) <= served_b and all(cutover.shadow(a, T0 // 1000) == A for a in shadowed)
    # A range starting before both stores hold every minute stays on the old store.
    assert all(cutover.serving(a, T0 // 1000 - 60) == A for a in served_b)


def test_selection_is_sticky_per_app() -> None:
    *_, cutover = walk()
    # A fixed hash (not Python's salted hash()): every process, and every restart, puts an app in one bucket.
    assert [sm.app_bucket(f"app-{i}") for i in range(4)] == [93, 42, 94, 9]
    more = sm.cutover(cutover, 80, now_ms=T0 + 200_000)
    for a in (f"app-{i}" for i in range(500)):
        if cutover.serving(a) == B:
            assert more.serving(a) == B  # raising N never moves an app back


def test_rollback_goes_one_phase_back_each_time() -> None:
    _, _dual, _shadow, cutover = walk()
    back = sm.rollback(cutover, now_ms=T0 + 300_000)
    assert back.phase == "shadow" and back.cutover_pct == 0 and back.shadow_pct == 10
    back = sm.rollback(back, now_ms=T0 + 301_000)
    assert back.phase == "dual_write" and back.shadow_pct == 0 and back.writes == (A, B)
    back = sm.rollback(back, now_ms=T0 + 302_000)
    assert back.phase == "single" and back.writes == (A,) and back.target == ""
    with pytest.raises(MigrationError):
        sm.rollback(back, now_ms=T0 + 303_000)


def test_finish_waits_for_the_retention_and_a_rollback_after_it_resumes_the_old_writer() -> None:
    *_, cutover = walk()
    with pytest.raises(MigrationError, match="finish needs cutover 100"):
        sm.finish(cutover, S, now_ms=T0 + 10**12)
    full = sm.cutover(cutover, 100, now_ms=T0 + 400_000)
    with pytest.raises(MigrationError, match="ages out at"):
        sm.finish(full, S, now_ms=T0 + 400_000)
    assert sm.finish(full, S, now_ms=T0 + 400_000, force=True).label == f"single({B})"
    done = sm.finish(full, S, now_ms=T0 + S.storage.ttl_s * 1000)
    assert done.phase == "single" and done.source == B and done.writes == (B,)
    # The phase before finish: cutover 100 % with both writers (the old one resumes from its offsets) ...
    back = sm.rollback(done, now_ms=T0 + S.storage.ttl_s * 1000 + 1)
    assert back.phase == "cutover" and back.writes == (A, B) and back.cutover_pct == 100
    assert back.serving("anything", T0 // 1000) == B
    # ... and one more step serves everything from the old store again.
    assert sm.rollback(back, now_ms=T0 + S.storage.ttl_s * 1000 + 2).serving("anything", T0 // 1000) == A


def test_commands_that_do_not_apply_say_what_would() -> None:
    single, dual, shadow, _ = walk()
    with pytest.raises(MigrationError, match="already the store"):
        sm.start(single, S, "cassandra", backfill=False, now_ms=T0)
    with pytest.raises(MigrationError, match="already under way"):
        sm.start(dual, S, "dynamodb:other", backfill=False, now_ms=T0)
    with pytest.raises(MigrationError, match="no migration under way"):
        sm.shadow(single, 10, aa=False, now_ms=T0)
    with pytest.raises(MigrationError, match="needs shadow reads first"):
        sm.cutover(dual, 10, now_ms=T0)
    with pytest.raises(MigrationError, match="percentage"):
        sm.shadow(dual, 101, aa=False, now_ms=T0)
    assert sm.cutover(sm.cutover(shadow, 10, now_ms=T0), 0, now_ms=T0).phase == "shadow"
    with pytest.raises(Exception, match="unknown store"):
        sm.start(single, S, "postgres", backfill=False, now_ms=T0)


def test_a_move_between_two_dynamodb_tables_and_aa_mode() -> None:
    s = Settings.of(store="dynamodb")
    st = sm.start(sm.initial(s), s, "dynamodb:metrics-v2", backfill=False, now_ms=T0)
    assert st.writes == ("dynamodb:minutely-metrics", "dynamodb:metrics-v2")
    assert sm.store_settings(s, st.target).dynamodb.table_name == "metrics-v2"
    assert sm.writer_group(s, st.target) == "minutely-writer-dynamodb-metrics-v2"
    aa = sm.shadow(st, 100, aa=True, now_ms=T0)
    assert aa.shadow("x") == aa.serving("x") == "dynamodb:minutely-metrics"


def test_state_round_trips_through_json_and_backfill_sets_the_sync_horizon() -> None:
    st = sm.start(sm.initial(S), S, "dynamodb", backfill=True, now_ms=T0, earliest_ms=T0 - 3 * 86_400_000 + 5)
    assert st.both_since_ms == T0 - 3 * 86_400_000 and st.backfill
    assert MigrationState.from_json(st.to_json()) == st
    with pytest.raises(ValueError):
        MigrationState.from_json({**st.to_json(), "phase": "sideways"})


@pytest.mark.parametrize("spec", ["cassandra:minutely;DROP KEYSPACE x", "cassandra:1ks", "cassandra:a.b",
                                  "cassandra:" + "k" * 49, "mysql:x", ""])
def test_a_bad_spec_is_a_config_error_with_the_operators_action(spec: str) -> None:
    with pytest.raises(sm.InvalidSpec) as info:
        sm.store_settings(S, spec)
    assert isinstance(info.value, ConfigError) and ":<keyspace>" in info.value.action
    with pytest.raises(ConfigError):
        sm.start(sm.initial(S), S, spec, backfill=False, now_ms=T0)


def test_a_good_keyspace_spec_points_the_settings_there() -> None:
    assert sm.store_settings(S, "cassandra:metrics_v2").cassandra.keyspace == "metrics_v2"


@pytest.mark.parametrize("field", ["source", "target"])
def test_a_state_record_carrying_a_bad_keyspace_is_refused_like_an_unreadable_one(field: str) -> None:
    _, dual, *_ = walk()
    doc = dual.to_json() | {field: "cassandra:x WITH replication = {'class': 'SimpleStrategy'}"}
    # A ValueError too: app/migration/control.py ignores the record (logged) and keeps the last state.
    with pytest.raises(ValueError) as info:
        MigrationState.from_json(doc)
    assert isinstance(info.value, ConfigError) and "ACLs" in info.value.action
    assert MigrationState.from_json(dual.to_json()) == dual
    finished = replace(dual, phase="single", source=B, target=A)
    assert MigrationState.from_json(finished.to_json()) == finished
