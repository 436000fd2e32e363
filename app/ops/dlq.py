"""``python -m app dlq replay``: send dead-lettered records back to their topic once the cause is fixed.

Reads in its own consumer group up to the end offsets taken at start and commits after the brokers
acknowledged what it sent, so each record is replayed (or moved back to the end) once, never twice.
Reference: docs/ingest.md#dead-letters-and-replaying-them-python-m-app-dlq-replay
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

import click
import orjson

from app.settings import WINDOW_S, KafkaSettings, Settings

RETRIABLE_OBSERVATION_REASONS = ("ahead of the wall clock",)
"""Observation dead-letter reasons that may pass when sent again unchanged (see the module docstring)."""
CHUNK_RECORDS = 500
GROUP_SUFFIX = "-dlq-replay"


@dataclass(frozen=True, slots=True)
class Entry:
    """One dead-letter record, read: where it would go back to, or why it cannot."""

    reason: str
    topic: str | None = None
    key: bytes | None = None
    value: bytes | None = None
    retriable: bool = False
    unreplayable: str = ""
    """Why the original cannot be rebuilt; empty when it can."""

    def selected(self, reason_filter: str | None) -> bool:
        if self.unreplayable:
            return False
        return reason_filter in self.reason if reason_filter is not None else self.retriable


def read_entry(value: bytes | None, kafka: KafkaSettings) -> Entry:
    """A record of either dead-letter topic -> the original record and where it goes (module docstring)."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return Entry("", unreplayable="not a dead-letter record (not JSON)")
    if not isinstance(doc, dict):
        return Entry("", unreplayable="not a dead-letter record (not a JSON object)")
    reason = str(doc.get("reason", ""))
    source = doc.get("source")
    if isinstance(source, dict):  # observations-dlq
        rec = doc.get("record")
        topic = source.get("topic") or kafka.observations_topic
        if not (isinstance(rec, dict) and isinstance(rec.get("app"), str)):
            return Entry(reason, unreplayable="the observation was not kept whole (a message prefix or an echo "
                                              "cut at 2 KB)")
        return Entry(reason, str(topic), rec["app"].encode(), orjson.dumps(rec),
                     retriable=any(r in reason for r in RETRIABLE_OBSERVATION_REASONS))
    if doc.get("truncated"):
        return Entry(reason, unreplayable="truncated: the minute was too large for the broker (identity, size "
                                          "and SHA-256 kept)")
    rec_text = doc.get("record")
    if not isinstance(rec_text, str):
        return Entry(reason, unreplayable="no record")
    raw = rec_text.encode()
    app = _minute_app(raw)
    if app is None:
        return Entry(reason, unreplayable="never a metrics-1m record")
    # Re-storing a minute overwrites its item: every minute may be replayed.
    return Entry(reason, str(doc.get("topic") or kafka.metrics_topic), app.encode(), raw, retriable=True)


def _minute_app(raw: bytes) -> str | None:
    """The app of a ``metrics-1m`` record, None when the sink would not take it (agents/sink.py
    ``decode_minute``; repeated here because ops sits below the agents)."""
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    app, proc, start_ms = rec.get("app"), rec.get("proc"), rec.get("start_ms")
    if isinstance(app, str) and isinstance(proc, str) and type(start_ms) is int and rec.get("res_s") == WINDOW_S:
        return app
    return None


def reason_class(reason: str) -> str:
    """A reason without its numbers, so counts group by cause rather than by record."""
    return re.sub(r"\d+", "N", reason)[:160] or "(no reason)"


@dataclass
class Summary:
    counts: Counter[tuple[str, str]]
    """(outcome, reason class) -> records; outcome: replayed, requeued, unreplayable (or "would ..." dry)."""
    ranges: dict[int, tuple[int, int]]
    """partition -> (first offset read, offset read up to, exclusive)."""

    def total(self, outcome: str) -> int:
        return sum(n for (o, _), n in self.counts.items() if o == outcome)


async def replay(kafka: KafkaSettings, dlq_topic: str, *, dry_run: bool = False, reason: str | None = None,
                 until_offset: int | None = None, group: str | None = None) -> Summary:
    """Replay ``dlq_topic`` from the group's committed offsets to the end offsets at start (or
    ``until_offset``); returns what was done (module docstring)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from app.ops.kafka import bootstrap, client_kwargs

    servers = bootstrap(kafka)
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, group_id=group or kafka.app_id + GROUP_SUFFIX,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed", **client_kwargs(kafka))
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True,
                                max_request_size=8 * 1024 * 1024, **client_kwargs(kafka))
    await consumer.start()
    await producer.start()
    summary = Summary(Counter(), {})
    try:
        parts = await producer.partitions_for(dlq_topic)  # waits for the topic's metadata
        if not parts:
            raise SystemExit(f"error: topic {dlq_topic!r} does not exist (or has no partitions)")
        tps = [TopicPartition(dlq_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        stop: dict[Any, int] = {}
        for tp in tps:
            committed = await consumer.committed(tp)
            start = max(begins[tp], committed if committed is not None else begins[tp])
            stop[tp] = ends[tp] if until_offset is None else min(ends[tp], until_offset)
            consumer.seek(tp, start)
            summary.ranges[tp.partition] = (start, max(start, stop[tp]))
        pending = {tp for tp in tps if summary.ranges[tp.partition][0] < stop[tp]}
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=2000, max_records=CHUNK_RECORDS)
            sends: list[asyncio.Future[Any]] = []
            commit: dict[Any, int] = {}
            for tp, records in batches.items():
                for rec in records:
                    if rec.offset >= stop[tp]:
                        break
                    entry = read_entry(rec.value, kafka)
                    if entry.unreplayable:
                        outcome = "unreplayable"
                    elif entry.selected(reason):
                        outcome = "replayed"
                        if not dry_run:
                            assert entry.topic is not None
                            sends.append(await producer.send(entry.topic, key=entry.key, value=entry.value))
                    else:
                        outcome = "requeued"
                        if not dry_run:
                            sends.append(await producer.send(dlq_topic, key=rec.key, value=rec.value))
                    summary.counts[(outcome, reason_class(entry.reason) if not entry.unreplayable
                                    else f"{reason_class(entry.reason)} [{entry.unreplayable}]")] += 1
                    commit[tp] = rec.offset + 1
            for tp in list(pending):
                if await consumer.position(tp) >= stop[tp] or commit.get(tp, 0) >= stop[tp]:
                    pending.discard(tp)
            if dry_run or not commit:
                continue
            await asyncio.gather(*sends)  # acknowledged by the brokers before the offsets move past them
            await consumer.commit(commit)
    finally:
        await consumer.stop()
        await producer.stop()
    return summary


def print_summary(summary: Summary, dlq_topic: str, *, dry_run: bool, out: TextIO) -> None:
    verb = "would be " if dry_run else ""
    for p, (first, last) in sorted(summary.ranges.items()):
        print(f"{dlq_topic}[{p}]: offsets {first}..{last}", file=out)
    for (outcome, why), n in sorted(summary.counts.items()):
        print(f"{n:8d}  {verb}{outcome}  {why}", file=out)
    print(f"{'dry run: ' if dry_run else ''}{summary.total('replayed')} {verb}replayed, "
          f"{summary.total('requeued')} {verb}requeued (not selected), "
          f"{summary.total('unreplayable')} unreplayable", file=out)


@click.group()
def dlq() -> None:
    """Dead-lettered records (docs/ingest.md, "Dead letters": what each topic holds and what replays)."""


@dlq.command("replay")
@click.option("--topic", help="the dead-letter topic to read: METRICS_SINK_DLQ_TOPIC (metrics-1m-dlq, the default) "
                              "or METRICS_DLQ_TOPIC (observations-dlq)")
@click.option("--dry-run", is_flag=True, help="print counts by reason and outcome; send and commit nothing")
@click.option("--reason", help="replay only records whose reason contains this text (also selects observations "
                               "whose reason is not retriable)")
@click.option("--until-offset", type=int, help="stop before this offset in every partition (default: the end "
                                               "offsets when the run starts)")
def replay_command(topic: str | None, dry_run: bool, reason: str | None, until_offset: int | None) -> None:
    """Send dead-lettered records back to the topic they came from, each once."""
    settings = Settings.from_env()
    topic = topic or settings.kafka.sink_dlq_topic
    summary = asyncio.run(replay(settings.kafka, topic, dry_run=dry_run, reason=reason, until_offset=until_offset))
    print_summary(summary, topic, dry_run=dry_run, out=sys.stdout)
