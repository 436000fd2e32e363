"""The migration state in Kafka: a compacted one-partition topic every process follows.

``python -m app migration <command>`` appends the next state (app/migration/state.py); every worker, writer,
web and ingest process reads the topic from the start and keeps the newest value, so a restart resumes the
phase and a change reaches every process within about a second. Compaction keeps only the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from app.errors import RetriableError
from app.migration.state import MigrationState, initial
from app.ops import kafka
from app.ops.stats import Counters
from app.settings import PREFIX, Settings

log = logging.getLogger(__name__)

KEY = b"state"
POLL_MS = 500


async def ensure_topic(settings: Settings) -> None:
    """Create the state topic (1 partition, compacted) when missing."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap(settings.kafka),
                                **kafka.client_kwargs(settings.kafka))
    await admin.start()
    try:
        if settings.migration.topic not in set(await admin.list_topics()):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(settings.migration.topic, 1, settings.kafka.replication_factor,
                                                    topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


class MigrationControl:
    """Follows the state topic in the background; ``current()`` is the newest state read (the configured
    store alone until one is). ``on_change`` runs in the event loop after each new state."""

    def __init__(self, settings: Settings, *, counters: Counters | None = None,
                 on_change: Callable[[MigrationState], None] | None = None) -> None:
        self.settings = settings
        self.counters = counters
        self.on_change = on_change
        self._state = initial(settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()

    def current(self) -> MigrationState:
        return self._state

    async def start(self) -> None:
        """Start following; returns once the topic was read to its end, or after ``migration_wait_s``
        (then the configured store serves until Kafka answers; logged)."""
        self._task = asyncio.ensure_future(self._follow())
        try:
            await asyncio.wait_for(self.caught_up.wait(), self.settings.migration.wait_s)
        except TimeoutError:
            log.error("migration state not read within %.0f s: serving from %s until Kafka answers (check "
                      "%sBROKER_URL)", self.settings.migration.wait_s, self._state.source, PREFIX)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _follow(self) -> None:
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  Kafka away: keep the last state, try again
                log.warning("following %s failed (%s); retrying in 2 s", self.settings.migration.topic, exc)
                await asyncio.sleep(2)

    async def _consume(self) -> None:
        s = self.settings
        await ensure_topic(s)
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap(s.kafka), enable_auto_commit=False,
                                    group_id=None, **kafka.client_kwargs(s.kafka))
        await consumer.start()
        try:
            tp = TopicPartition(s.migration.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while True:
                batch = await consumer.getmany(tp, timeout_ms=POLL_MS)
                for record in batch.get(tp, []):
                    self._apply(record.value)
                if not self.caught_up.is_set() and await consumer.position(tp) >= end:
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def _apply(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            state = MigrationState.from_json(orjson.loads(value))
        except (ValueError, TypeError) as exc:
            log.error("ignoring an unreadable migration state record (%s): %r", exc, value[:200])
            return
        if state == self._state:
            return
        previous, self._state = self._state, state
        if self.counters is not None:
            self.counters.set("migration_state_version", state.version)
        log.info("migration state: %s (version %d, was %s)", state.label, state.version, previous.label)
        if self.on_change is not None:
            self.on_change(state)


async def read_state(settings: Settings) -> MigrationState:
    """The current state, read once (the CLI)."""
    control = MigrationControl(settings)
    try:
        await control.start()
        if not control.caught_up.is_set():
            raise RetriableError(f"could not read {settings.migration.topic}",
                                 action=f"check that Kafka is reachable ({PREFIX}BROKER_URL)")
        return control.current()
    finally:
        await control.stop()


async def publish(settings: Settings, state: MigrationState) -> None:
    """Append ``state`` to the topic (acknowledged by every in-sync replica)."""
    await ensure_topic(settings)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap(settings.kafka), acks="all",
                                **kafka.client_kwargs(settings.kafka))
    await producer.start()
    try:
        await producer.send_and_wait(settings.migration.topic, orjson.dumps(state.to_json()), key=KEY, partition=0)
    except KafkaError as exc:
        raise RetriableError(f"could not write {settings.migration.topic}: {exc}",
                             action="check Kafka and run the command again") from exc
    finally:
        await producer.stop()
