"""Autoscaling model and rules (app/alerting/autoscale.py).

Each timeline lists its minutes and expects the exact decisions that change something: (minute index,
action, from dynos, to dynos). The expected values are worked out from the model in the comments.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import pytest

from app.alerting.autoscale import AppPolicies, AutoscaleParams, Autoscaler, Decision, PolicyConfig, estimate
from app.alerting.minute import Minute
from app.errors import ConfigError
from app.settings import Settings

T0 = 1_764_000_000_000 - 1_764_000_000_000 % 60_000
P = AutoscaleParams.from_settings(Settings().autoscale)
"""The settings' defaults: history 60 min, min_requests 20, up cooldown 1, down cooldown 5, stable 5,
headroom 0.2, pinned notice once a day."""


def m(i: int, requests: int, p95: float | None, proc: str = "web") -> Minute:
    return Minute("shop", proc, T0 + i * 60_000, requests, 0, p95 if requests else None)


def policy(lo: int = 1, hi: int = 4, target: float = 300, current: int | None = None) -> PolicyConfig:
    return PolicyConfig("web", lo, hi, target, current)


def steps(a: Autoscaler, minutes: Sequence[Minute], params: AutoscaleParams = P) -> list[tuple[int, str, int, int]]:
    out = []
    for mi in minutes:
        d = a.observe("shop", mi, params)
        if d is not None and d.changed:
            out.append(((mi.start_ms - T0) // 60_000, d.action, d.from_dynos, d.to_dynos))
    return out


def decisions(a: Autoscaler, minutes: Sequence[Minute], params: AutoscaleParams = P) -> list[Decision]:
    out = []
    for mi in minutes:
        d = a.observe("shop", mi, params)
        assert d is not None
        out.append(d)
    return out


# --- the model ----------------------------------------------------------------------------------------------

def test_estimate_capacity_from_the_hour() -> None:
    # (start, requests, p95, dynos): per-dyno 100 met the target, 200 and 150 did not.
    hist: list[tuple[int, int, float | None, int]] = [(0, 100, 200.0, 1), (1, 200, 400.0, 1), (2, 300, 450.0, 2),
                                                      (3, 10, 900.0, 1)]  # too few requests: ignored
    e = estimate(hist, requests=300, p95_ms=450.0, dynos=2, target_ms=300, params=P)
    assert e.capacity_per_dyno == 100.0 and e.needed == 3 and e.needed_with_headroom == 4 and e.breach
    # A good minute above the lowest bad one is not trusted (noise): capacity stays below 150.
    hist.append((4, 160, 250.0, 1))
    assert estimate(hist, requests=300, p95_ms=250.0, dynos=3, target_ms=300, params=P).capacity_per_dyno == 100.0
    # Nothing measurable: hold, or one more while the target is missed; no traffic needs one dyno.
    assert estimate([], requests=50, p95_ms=200.0, dynos=3, target_ms=300, params=P).needed == 3
    assert estimate([], requests=50, p95_ms=400.0, dynos=3, target_ms=300, params=P).needed == 4
    assert estimate([], requests=0, p95_ms=None, dynos=3, target_ms=300, params=P).needed == 1


# --- scaling up ----------------------------------------------------------------------------------------------

def test_rising_latency_scales_up_one_dyno_per_minute_then_pins_at_max() -> None:
    a = Autoscaler(policy(1, 4, 300, current=1))
    timeline = [m(0, 100, 200), m(1, 200, 400), m(2, 300, 450), m(3, 400, 500), m(4, 500, 600), m(5, 500, 600)]
    ds = decisions(a, timeline)
    # m0: 100/dyno met the target -> capacity 100, 1 needed. m1: 200 > capacity: ceil(200/100)=2.
    # m2: 300 at 2 dynos: ceil(300/100)=3. m3: 4. m4: 5 > max 4: pinned, notified once.
    assert [(d.action, d.from_dynos, d.to_dynos, d.needed_dynos) for d in ds] == [
        ("hold", 1, 1, 1), ("up", 1, 2, 2), ("up", 2, 3, 3), ("up", 3, 4, 4), ("hold", 4, 4, 5), ("hold", 4, 4, 5)]
    assert [(d.pinned_at_max, d.notify_pinned) for d in ds[3:]] == [(False, False), (True, True), (True, False)]
    assert ds[1].reason == "p95 above target" and ds[4].reason == "at max_dynos"
    assert ds[2].capacity_per_dyno == 100.0
    # Still pinned a day later: notified again (at most once a day).
    later = decisions(a, [m(4 + 1439, 500, 600), m(4 + 1440, 500, 600)])
    assert [(d.pinned_at_max, d.notify_pinned) for d in later] == [(True, False), (True, True)]


def test_up_cooldown_is_respected() -> None:
    a = Autoscaler(policy(1, 4, 300, current=1))
    slow = replace(P, up_cooldown_min=2)
    timeline = [m(0, 100, 200), m(1, 200, 400), m(2, 300, 450), m(3, 400, 500), m(4, 400, 500)]
    ds = decisions(a, timeline, slow)
    assert [(d.action, d.to_dynos, d.reason) for d in ds] == [
        ("hold", 1, "within target"), ("up", 2, "p95 above target"), ("hold", 2, "up cooldown"),
        ("up", 3, "p95 above target"), ("hold", 3, "up cooldown")]


# --- scaling down -----------------------------------------------------------------------------------------------

def test_scales_down_only_after_sustained_headroom() -> None:
    a = Autoscaler(policy(1, 4, 300, current=4))
    busy = [m(i, 400, 200) for i in range(3)]      # 100/dyno within target: capacity 100, 4 needed
    quiet = [m(i, 100, 150) for i in range(3, 21)]  # 100 requests: 1 needed, 2 with 20 % headroom
    # Down after 5 consecutive minutes with headroom (m3..m7), again after 5 more and 5 since the last
    # step (m8..m12); then 2 dynos are what 20 % headroom needs: it stays.
    assert steps(a, busy + quiet) == [(7, "down", 4, 3), (12, "down", 3, 2)]
    assert a.state.dynos == 2


def test_a_minute_without_headroom_restarts_the_count() -> None:
    a = Autoscaler(policy(1, 4, 300, current=4))
    timeline = [m(0, 400, 200), m(1, 100, 150), m(2, 100, 150), m(3, 100, 150), m(4, 400, 200)]
    timeline += [m(i, 100, 150) for i in range(5, 12)]
    assert steps(a, timeline) == [(9, "down", 4, 3)]


def test_down_waits_for_the_cooldown_after_an_up_step() -> None:
    a = Autoscaler(policy(1, 4, 300, current=1))
    quick = replace(P, down_stable_min=2, down_cooldown_min=5)
    timeline = [m(0, 100, 200), m(1, 200, 400)] + [m(i, 20, 100) for i in range(2, 9)]
    # Up at m1; headroom from m2 (2 stable minutes by m3) but the cooldown holds until m6.
    ds = decisions(a, timeline, quick)
    assert [(i, d.action, d.reason) for i, d in enumerate(ds) if d.action != "hold" or "cooldown" in d.reason] == [
        (1, "up", "p95 above target"), (3, "hold", "down cooldown"), (4, "hold", "down cooldown"),
        (5, "hold", "down cooldown"), (6, "down", "sustained headroom")]


def test_no_traffic_scales_down_to_min() -> None:
    a = Autoscaler(policy(1, 4, 300, current=3))
    assert steps(a, [m(i, 0, None) for i in range(15)]) == [(4, "down", 3, 2), (9, "down", 2, 1)]


# --- bounds -------------------------------------------------------------------------------------------------------

def test_a_count_outside_the_bounds_moves_to_the_bound_at_once() -> None:
    assert steps(Autoscaler(policy(1, 4, current=7)), [m(0, 100, 100)]) == [(0, "down", 7, 4)]
    assert steps(Autoscaler(policy(3, 5, current=1)), [m(0, 100, 100)]) == [(0, "up", 1, 3)]
    # Without a configured count the policy starts at min_dynos.
    assert Autoscaler(policy(2, 5)).state.dynos == 2


def test_never_outside_min_max_and_one_dyno_per_step() -> None:
    rng = random.Random(4)
    lo, hi = 2, 6
    a = Autoscaler(policy(lo, hi, 250, current=3))
    last_step: int | None = None
    for i in range(3000):
        requests = rng.choice([0, 5, rng.randint(20, 3000)])
        x = requests / a.state.dynos
        p95 = 80 + (x / 150) ** 3 * 100 + rng.uniform(-20, 20)
        d = a.observe("shop", m(i, requests, max(1.0, p95)), P)
        assert d is not None and lo <= d.to_dynos <= hi
        assert abs(d.to_dynos - d.from_dynos) <= 1
        if d.changed:
            assert last_step is None or i - last_step >= (P.down_cooldown_min if d.action == "down"
                                                          else P.up_cooldown_min)
            last_step = i


def test_closed_loop_settles_on_the_count_the_load_needs() -> None:
    """A simulated app: p95 is 100 ms up to 150 requests/min per dyno and rises 10 ms per request above."""
    a = Autoscaler(policy(1, 8, 300, current=1))
    trajectory = []
    for i in range(100):
        requests = 900 if 30 <= i < 60 else 300
        x = requests / a.state.dynos
        d = a.observe("shop", m(i, requests, 100 + max(0.0, x - 150) * 10), P)
        assert d is not None
        trajectory.append(d.to_dynos)
    # 300/min: 2 dynos (150 each). 900/min: one dyno per minute up to 6 (5 dynos = 180 each still misses).
    # Back to 300/min: down every 5 minutes while 20 % headroom allows: 3 dynos (300 / (150 * 0.8) = 2.5).
    assert trajectory[:3] == [2, 2, 2] and set(trajectory[3:30]) == {2}
    assert trajectory[30:35] == [3, 4, 5, 6, 6] and set(trajectory[34:60]) == {6}
    assert trajectory[60:65] == [6, 6, 6, 6, 5] and trajectory[69] == 4 and trajectory[74] == 3
    assert set(trajectory[74:]) == {3}


# --- at-least-once, restart ----------------------------------------------------------------------------------------

def test_replays_other_process_types_and_restart() -> None:
    timeline = [m(0, 100, 200), m(1, 200, 400), m(2, 300, 450), m(3, 400, 500), m(4, 500, 600),
                m(5, 100, 100), m(6, 100, 100)] + [m(i, 100, 100) for i in range(7, 16)]
    reference = AppPolicies({"web": Autoscaler(policy(1, 4, 300, current=1))})
    expected = [reference.observe(mi, P) for mi in timeline]
    doc = AppPolicies({"web": Autoscaler(policy(1, 4, 300, current=1))})
    got = [doc.observe(mi, P) for mi in timeline[:4]]
    assert doc.observe(m(3, 400, 500), P) is None  # redelivered
    assert doc.observe(m(9, 400, 500, proc="worker"), P) is None  # no policy for worker
    restored = AppPolicies.from_bytes(doc.to_bytes())
    got += [d for mi in timeline[2:] if (d := restored.observe(mi, P)) is not None]
    assert got == expected
    assert [(d.action, d.to_dynos) for d in got if d is not None and d.changed] == [
        ("up", 2), ("up", 3), ("up", 4), ("down", 3), ("down", 2)]


def test_reconfigure_keeps_history_and_honours_a_new_current_count() -> None:
    doc = AppPolicies()
    doc.put(policy(1, 4, 300, current=2))
    doc.observe(m(0, 100, 100), P)
    doc.put(policy(1, 6, 300, current=2))
    assert doc.policies["web"].state.dynos == 2 and len(doc.policies["web"].state.history) == 1
    doc.put(policy(1, 6, 300, current=5))  # scaled by hand to 5
    assert doc.policies["web"].state.dynos == 5


# --- the model's constants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [{"autoscale_up_cooldown_min": 0}, {"autoscale_down_headroom": 1.0},
                                    {"autoscale_down_headroom": -0.1}, {"autoscale_min_requests": 0},
                                    {"autoscale_pinned_notify_every_min": 0}])
def test_nonsensical_model_settings_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        AutoscaleParams.from_settings(Settings.of(**change).autoscale)
    assert f"METRICS_{next(iter(change)).upper()}" in str(info.value)  # names the variable to fix
    with pytest.raises(ConfigError):
        replace(P, **{k.removeprefix("autoscale_"): v for k, v in change.items()})  # checked however built


def test_every_constant_is_a_setting_with_its_only_default() -> None:
    defaults = Settings()
    assert {f.name: getattr(P, f.name) for f in fields(P)} == {
        f.name: getattr(defaults.autoscale, f.name) for f in fields(AutoscaleParams)}
    assert P.pinned_notify_every_min == 1440 and P.history_min == 60
    assert AutoscaleParams.from_settings(Settings.of(autoscale_history_min=30).autoscale).history_min == 30
