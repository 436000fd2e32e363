"""Worker faults on the real stack (docs/reliability.md): a worker SIGKILLed every 20-40 s and restarted, on
its own state directory or on an empty one, and one of two workers lost for good. Both message forms are in
the stream (tests/integration/pipeline.py FastTraffic). Every stored minute equals the generator's truth:
nothing lost, nothing doubled, max exact, percentiles within 1 %. ``MINUTELY_CHAOS=1`` (``make chaos``)
runs the long versions."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from tests.integration.pipeline import FastTraffic, Pipeline, check_against_truth, env_flag, wait_truth_stored

pytestmark = pytest.mark.integration

CHAOS = env_flag("MINUTELY_CHAOS")
CRASH_LOOP_S = 300.0 if CHAOS else 60.0
LIFE_S = (20.0, 40.0) if CHAOS else (20.0, 26.0)
"""How long each worker lives before its SIGKILL (short version: two kills in the minute)."""
SPEEDUP = 2.0 if CHAOS else 5.0
"""Event time per wall time: the short minute of traffic carries five minutes of data."""
PAIR_S = 180.0 if CHAOS else 60.0


@pytest.mark.parametrize("state", ["own", "empty"])
def test_crash_loop_loses_and_doubles_nothing(broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path,
                                              state: str) -> None:
    """Restarted on its own state directory (RocksDB as the killed process left it) or on an empty one (the
    window table comes back from its changelog)."""
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="8")
    rng = random.Random(29)
    kills, restart_s = 0, []
    p.start(data_dir=tmp_path / "state-0")
    traffic = FastTraffic(broker, p.settings.kafka.observations_topic, duration_s=CRASH_LOOP_S, speedup=SPEEDUP,
                          seed=31 if state == "own" else 37)
    try:
        while True:
            life_s = rng.uniform(*LIFE_S)
            if time.monotonic() - traffic.t0 + life_s > CRASH_LOOP_S:
                break
            time.sleep(life_s)
            p.kill()
            kills += 1
            t_kill = time.monotonic()
            p.start(data_dir=tmp_path / ("state-0" if state == "own" else f"state-{kills}"))
            restart_s.append(time.monotonic() - t_kill)
        traffic.wait(CRASH_LOOP_S + 60)
        t_end = time.monotonic()
        stored = wait_truth_stored(p, traffic.truth, traffic.start_ms, 180)
        worst = check_against_truth(stored, traffic.truth)
        assert set(stored) == traffic.truth.keys(), sorted(set(stored) - traffic.truth.keys())[:5]
        assert kills >= 2
        print(f"\ncrash loop ({state} state): {kills} SIGKILLs in {CRASH_LOOP_S:.0f} s, each restart healthy in "
              f"{min(restart_s):.1f}-{max(restart_s):.1f} s; {traffic.observations} observations in "
              f"{(traffic.messages + 1) // 2} arrays and {traffic.singles} single-observation messages -> "
              f"{len(stored)} minutes, every one equal to the truth (0 lost, 0 doubled, worst percentile error "
              f"{100 * worst:.2f} %); all stored {time.monotonic() - t_end:.0f} s after the traffic ended")
    finally:
        p.stop()


def test_two_workers_one_killed_loses_and_doubles_nothing(broker: KafkaBroker, dynamo: DynamoServer,
                                                          tmp_path: Path) -> None:
    """A second worker joins a third of the way in (its partitions and their open minutes move through the
    changelog); two thirds in, the first is SIGKILLed and not restarted: the survivor takes every partition
    once the dead one's session expires."""
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="8")
    p.start(data_dir=tmp_path / "a")
    traffic = FastTraffic(broker, p.settings.kafka.observations_topic, duration_s=PAIR_S, speedup=SPEEDUP, seed=41)
    try:
        time.sleep(PAIR_S / 3)
        _, url_b = p.start_second_worker(data_dir=tmp_path / "b")
        time.sleep(max(0.0, traffic.t0 + 2 * PAIR_S / 3 - time.monotonic()))
        emitted_a = p.stats()["minutes_emitted"]
        p.kill()
        traffic.wait(PAIR_S + 60)
        stored = wait_truth_stored(p, traffic.truth, traffic.start_ms, 180)
        worst = check_against_truth(stored, traffic.truth)
        assert set(stored) == traffic.truth.keys(), sorted(set(stored) - traffic.truth.keys())[:5]
        emitted_b = p.stats(url_b)["minutes_emitted"]
        assert emitted_a > 0 and emitted_b > 0, (emitted_a, emitted_b)
        print(f"\ntwo workers, one killed: {len(stored)} minutes equal to the truth (0 lost, 0 doubled, worst "
              f"percentile error {100 * worst:.2f} %); the killed one had emitted {emitted_a}, the survivor "
              f"{emitted_b}")
    finally:
        p.stop()
