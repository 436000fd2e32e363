"""The whole pipeline on real parts: Apache Kafka -> worker process -> dynalite -> HTTP query. Worker and broker
faults: test_worker_faults.py and test_broker_faults.py."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.traffic import Generator, produce
from tests.integration.pipeline import Pipeline, check_against_truth, wait_stored

pytestmark = pytest.mark.integration


def minute_floor_ms(t_ms: int) -> int:
    return t_ms - t_ms % 60_000


def test_generated_traffic_is_stored_exactly(broker: KafkaBroker, dynamo: DynamoServer,
                                             tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    start_ms = minute_floor_ms(int(time.time() * 1000)) - 6 * 60_000
    gen = Generator(apps=3, dynos=3, seed=7, start_ms=start_ms, keep_truth=True)
    msgs = gen.messages(per_message=500, span_ms=10_000)
    batch = [next(msgs) for _ in range(3 * 6 * 4)]  # 3 apps x 4 minutes of 6 x 10 s messages
    # Bad input next to good input: none of it may cost a valid observation.
    bad = [(b"app-0", b"{oops"), (b"app-1", orjson.dumps([{"kind": "router", "app": "app-1"}]))]
    p.start(data_dir=tmp_path / "state")
    try:
        asyncio.run(produce(broker.address, p.settings.kafka.observations_topic, batch + bad))
        assert gen.truth is not None
        n_obs = sum(len(orjson.loads(v)) for _, v in batch)
        expected_minutes = len(set(gen.truth.service_ms) | set(gen.truth.rss_max))
        stats = p.wait_stats(lambda s: s["observations_accepted"] >= n_obs and
                             s["sink_items_written"] >= expected_minutes, 120, "all minutes in DynamoDB")
        assert stats["observations_accepted"] == n_obs
        assert stats["observations_rejected"] == 2
        assert stats["minutes_emitted"] == expected_minutes
        stored = p.stored(gen.apps, ["web", "worker"], start_ms // 1000, start_ms // 1000 + 3600)
        check_against_truth(stored, gen.truth)
        # The HTTP view answers from DynamoDB with the documented shape.
        body = p.get(f"/v1/apps/app-0/metrics?process_type=web&since={start_ms // 1000}"
                     f"&until={start_ms // 1000 + 3600}&resolution=1m", token=p.read_token("app-0"))
        assert body["resolution_s"] == 60 and len(body["points"]) == 4
        first = body["points"][0]
        assert first["ts"] == start_ms // 1000
        assert set(first["response_ms"]) == {"p50", "p95", "p99", "max", "min", "mean"}
        assert first["requests"] == len(gen.truth.service_ms[("app-0", "web", start_ms)])
        assert {"rss_mean", "rss_max", "quota"} <= set(first["memory_mb"])
        # Operational endpoints on a real worker: ready (broker, recovery, DynamoDB) and Prometheus text.
        deadline = time.monotonic() + 30  # readiness is eventual: each check has a 2 s budget
        while True:
            try:
                ready = p.get("/readyz")
                break
            except urllib.error.HTTPError as exc:
                assert time.monotonic() < deadline, exc.read()
                time.sleep(0.5)
        # the worker's own checks and those its stream jobs register (agents/sink.py, agents/events.py)
        assert ready == {"status": "ready", "checks": {"broker": "ok", "recovery": "ok", "store": "ok",
                                                       "sink": "ok", "events": "ok"}}
        with urllib.request.urlopen(f"{p.url}/readyz", timeout=5) as r:  # the tenants' port: the status alone
            assert json.load(r) == {"status": "ready"}
        for path in ("/metrics", "/v1/stats"):  # operator data is on the admin port only
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{p.url}{path}", timeout=5)
            err.value.close()
            assert err.value.code == 404, path

        with urllib.request.urlopen(f"{p.admin_url()}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f"minutely_observations_accepted_total {float(n_obs)}" in text
        assert "# HELP minutely_observations_rejected_total" in text and "minutely_windows_open" in text
    finally:
        p.stop()


def test_minutes_emitted_but_not_stored_survive_a_worker_kill(broker: KafkaBroker, tmp_path: Path) -> None:
    """The case behind the old "consumer starts past uncommitted records" anomaly, made deterministic.

    DynamoDB is down, so the sink cannot store (and does not acknowledge) the minutes the aggregator emits.
    Closed minutes are not kept in the window table (``closed_keep_s`` = 0), so after a SIGKILL and a
    restart on an empty state directory only metrics-1m has them: the restarted sink must start from its
    committed offset (none: the beginning), before them, and store every one exactly. Without
    app/faust_patches.py it stored none of them."""
    dynamo = DynamoServer(data_dir=tmp_path / "dynamodb")  # own server: it is stopped mid-test
    dynamo.start()
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="3", METRICS_CLOSED_KEEP_S="0")
    start_ms = minute_floor_ms(int(time.time() * 1000)) - 8 * 60_000
    gen = Generator(apps=2, dynos=2, seed=19, start_ms=start_ms, keep_truth=True)
    msgs = gen.messages(per_message=300, span_ms=15_000)
    batch = [next(msgs) for _ in range(2 * 4 * 4)]  # four whole minutes per app
    assert gen.truth is not None
    minutes = len(set(gen.truth.service_ms) | set(gen.truth.rss_max))
    try:
        p.start(data_dir=tmp_path / "state-1")
        p.wait_stats(lambda s: True, 30, "the worker's stats")
        dynamo.stop()
        asyncio.run(produce(broker.address, p.settings.kafka.observations_topic, batch))
        # Emitted to metrics-1m (idle close) and forgotten by the window table; none stored.
        p.wait_stats(lambda s: s["minutes_emitted"] >= minutes, 90, "every minute emitted")
        assert p.stats()["sink_items_written"] == 0
        time.sleep(2)  # the deletes reach the changelog with the next flush
        p.kill()
        dynamo.start()  # same directory: the table is still there
        p.start(data_dir=tmp_path / "state-2")
        stored = wait_stored(p, gen.apps, start_ms, minutes)
        assert len(stored) == minutes
        check_against_truth(stored, gen.truth)
        assert p.stats()["minutes_resent"] == 0  # nothing came back from the windows table
    finally:
        p.stop()
        dynamo.stop()
