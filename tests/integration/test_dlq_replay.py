"""``python -m app dlq replay`` (app/ops/dlq.py): what each dead-letter record replays to, and on the real
broker with a worker's sink: replayed minutes reach the store once, and a second run replays nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from agents.aggregate import dead_letter_record as observation_dead_letter
from agents.sink import dead_letter_record
from app import models
from app.cli import worker_env
from app.local.embedded import DynamoServer, KafkaBroker
from app.ops.dlq import read_entry
from app.settings import Settings
from tables.aggregate import Aggregate, BucketKey
from tables.windows import Rejected
from tests.integration.pipeline import Pipeline

SETTINGS = Settings()


def minute(app: str, start_ms: int, requests: int = 1) -> bytes:
    agg = Aggregate(BucketKey(app, "web", start_ms), max_centroids=50)
    for _ in range(requests):
        agg.add_request(200, 5.0, None)
    return orjson.dumps(agg.to_record())


# --- what each record replays to ------------------------------------------------------------------------


def test_a_dead_lettered_minute_replays_to_its_topic_keyed_by_app() -> None:
    value = minute("shop", 1_764_000_060_000)
    _, rec = dead_letter_record(value, "AccessDenied", topic="m1", max_bytes=1_000_000)
    e = read_entry(rec, SETTINGS.kafka)
    assert (e.topic, e.key, e.value, e.unreplayable) == ("m1", b"shop", value, "")
    assert e.selected(None) and e.selected("Access") and not e.selected("throttl")
    # The record format before this change (no topic): back to METRICS_METRICS_TOPIC.
    old = read_entry(orjson.dumps({"reason": "x", "record": value.decode()}), SETTINGS.kafka)
    assert old.topic == SETTINGS.kafka.metrics_topic and old.value == value


def test_truncated_and_garbage_minutes_are_not_replayable() -> None:
    _, rec = dead_letter_record(minute("shop", 0) + b" " * 5000, "big", topic="m1", max_bytes=4000)
    assert "truncated" in read_entry(rec, SETTINGS.kafka).unreplayable
    _, rec = dead_letter_record(b"\xffnope", "not a metrics-1m record", topic="m1", max_bytes=4000)
    assert read_entry(rec, SETTINGS.kafka).unreplayable and not read_entry(rec, SETTINGS.kafka).selected("not")
    assert read_entry(b"{", SETTINGS.kafka).unreplayable


def test_observations_replay_only_when_their_reason_can_pass_or_is_chosen() -> None:
    obs = models.Router(app="shop", dyno="web.1", ts=1_764_000_000_123, status=200, service_ms=12.0)
    echoed = models.echo(obs)
    future = observation_dead_letter("obs", 3, Rejected("rejected", "ts is more than 300000 ms ahead of the wall "
                                                                    "clock", echoed, 41, 0, "shop"))
    e = read_entry(future, SETTINGS.kafka)
    assert e.topic == "obs" and e.key == b"shop" and e.selected(None)
    decoded = models.decode(e.value, 1 << 20)  # a valid one-observation message again
    assert isinstance(decoded, models.Decoded) and decoded.observations == [obs]
    late = read_entry(observation_dead_letter("obs", 3, Rejected("late", "minute already closed: ts 1 < 2",
                                                                 echoed, 42, 0, "shop")), SETTINGS.kafka)
    assert not late.unreplayable and not late.selected(None) and late.selected("already closed")
    prefix = read_entry(observation_dead_letter("obs", 3, Rejected("rejected", "malformed JSON", "{\"kind\":",
                                                                   43, -1, None)), SETTINGS.kafka)
    assert prefix.unreplayable and not prefix.selected("malformed")


# --- on the real broker ---------------------------------------------------------------------------------


async def _produce(broker: KafkaBroker, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=broker.address, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, key=key, value=value)
    finally:
        await producer.stop()


async def _end_offsets(broker: KafkaBroker, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=broker.address)
    producer = AIOKafkaProducer(bootstrap_servers=broker.address)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()
        await producer.stop()


def _replay(p: Pipeline, *args: str) -> str:
    env = worker_env(p.broker.url, p.dynamo.endpoint, data_dir=str(p.tmp), web_port=p.web_port,
                     extra=p.env_overrides)
    done = subprocess.run([sys.executable, "-m", "app", "dlq", "replay", *args], env=env, capture_output=True,
                          timeout=120, cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_replayed_minutes_are_stored_once_and_a_second_run_replays_nothing(
        broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    s = p.settings
    t0_ms = (int(time.time()) // 60 - 120) * 60_000  # two hours ago: inside retention, long closed
    apps = ["a1", "a2", "a3"]
    minutes = [minute(app, t0_ms + i * 60_000, requests=i + 1) for app in apps for i in range(2)]
    bounded = 900_000
    dead = [dead_letter_record(v, "DynamoDB BatchWriteItem failed: AccessDeniedException", topic=s.kafka.metrics_topic,
                               max_bytes=bounded) for v in minutes]
    dead.append(dead_letter_record(b"\xffgarbage", "not a metrics-1m record", topic=s.kafka.metrics_topic,
                                   max_bytes=bounded))
    dead.append(dead_letter_record(minute("a1", t0_ms + 600_000) + b" " * 5000, "too large",
                                   topic=s.kafka.metrics_topic, max_bytes=4000))  # truncated: traced, not replayable
    asyncio.run(_produce(broker, s.kafka.sink_dlq_topic, dead))
    p.start(data_dir=tmp_path / "worker")
    try:
        out = _replay(p, "--dry-run")
        assert "dry run: 6 would be replayed, 0 would be requeued (not selected), 2 unreplayable" in out, out
        assert asyncio.run(_end_offsets(broker, s.kafka.metrics_topic)) == 0  # a dry run sends nothing

        out = _replay(p)
        assert "6 replayed, 0 requeued (not selected), 2 unreplayable" in out, out
        assert asyncio.run(_end_offsets(broker, s.kafka.metrics_topic)) == 6
        want = {(app, "web", t0_ms + i * 60_000) for app in apps for i in range(2)}
        since_s = t0_ms // 1000
        _wait(lambda: set(p.stored(apps, ["web"], since_s, since_s + 3600)) == want, 90, "the replayed minutes")
        assert p.stored(apps, ["web"], since_s, since_s + 3600)[("a1", "web", t0_ms)] == orjson.loads(minutes[0])

        # Twice: nothing is sent again (the group committed past the replayed records) ...
        out = _replay(p)
        assert "0 replayed, 0 requeued (not selected), 0 unreplayable" in out, out
        assert asyncio.run(_end_offsets(broker, s.kafka.metrics_topic)) == 6
        # ... and a minute stored again anyway (a crash between send and commit) overwrites its item.
        again = minute("a1", t0_ms, requests=7)
        asyncio.run(_produce(broker, s.kafka.metrics_topic, [(b"a1", again)]))
        _wait(lambda: p.stored(["a1"], ["web"], since_s, since_s + 60).get(("a1", "web", t0_ms))
              == orjson.loads(again), 60, "the overwrite")
        assert len(p.stored(apps, ["web"], since_s, since_s + 3600)) == 6
    finally:
        p.stop()
